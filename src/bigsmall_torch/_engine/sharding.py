"""Sharding and seeding: tiny pure functions (tests call them directly).

A *shard* is what one (rank, worker) pair owns in one epoch. Shards are numbered
``rank * num_workers + worker``.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import ConfigError

# Domain tags: the first key of every seed sequence, so streams for different purposes never collide.
_SHARDS = 1
RESERVOIR = 2

__all__ = ["IMBALANCE", "Topology", "assign_shards", "derive_rng", "derive_seed", "split_evenly"]

#: With costs, when the dealt shards' mean cost per big chunk differs by more than this factor,
#: every patient is shared by every shard instead (see :func:`assign_shards`).
IMBALANCE = 1.5


@dataclass(frozen=True)
class Topology:
    """Where the current process stands: distributed rank/world size and DataLoader worker."""

    rank: int = 0
    world_size: int = 1
    worker: int = 0
    num_workers: int = 1

    @property
    def shard(self) -> int:
        return self.rank * self.num_workers + self.worker

    @property
    def num_shards(self) -> int:
        return self.world_size * self.num_workers


def distributed_rank_and_world(
    rank: int | None = None, world_size: int | None = None
) -> tuple[int, int]:
    """Explicit ``rank``/``world_size`` if given, else torch.distributed's when initialised, else (0, 1)."""
    if rank is None or world_size is None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            rank = torch.distributed.get_rank() if rank is None else rank
            world_size = torch.distributed.get_world_size() if world_size is None else world_size
        else:
            rank = 0 if rank is None else rank
            world_size = 1 if world_size is None else world_size
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
    return rank, world_size


def current_topology(rank: int, world_size: int) -> Topology:
    """The topology of the calling process: ``rank``/``world_size`` plus torch's worker info."""
    info = torch.utils.data.get_worker_info()
    if info is None:
        return Topology(rank, world_size, 0, 1)
    return Topology(rank, world_size, info.id, info.num_workers)


def derive_seed(*keys: int) -> np.random.SeedSequence:
    """``SeedSequence(keys)``, with the number of keys appended (a bare SeedSequence treats
    trailing zeros as absent, so ``(s, e, 0)`` and ``(s, e)`` would collide)."""
    return np.random.SeedSequence([int(k) for k in keys] + [len(keys)])


def derive_rng(*keys: int) -> np.random.Generator:
    """A generator seeded from :func:`derive_seed`: the only source of randomness of the package."""
    return np.random.default_rng(derive_seed(*keys))


def split_evenly(total: int, parts: int, index: int) -> int:
    """How many of ``total`` items part ``index`` of ``parts`` gets (the first ``total % parts`` get one more)."""
    return total // parts + (1 if index < total % parts else 0)


def assign_shards(
    num_patients: int,
    num_shards: int,
    *,
    seed: int,
    epoch: int,
    labels: Sequence[Hashable] | None = None,
    costs: Sequence[float] | None = None,
    max_parts: Sequence[int] | None = None,
) -> list[list[tuple[int, int, int]]]:
    """Which patients each shard owns in ``epoch``.

    Returns, per shard, a list of ``(patient_index, part, parts)``. The patients are permuted from
    ``(seed, epoch)`` and dealt round-robin, so each patient belongs to exactly one shard and the
    assignment changes every epoch. With ``labels`` (one per patient) the permutation is grouped by
    label before dealing, so every shard gets a share of each label. With fewer patients than
    shards, patient ``p`` is shared by the ``parts`` shards dealt to it, each owning a disjoint part
    (``part`` of ``parts``) of its slide.

    ``costs`` (one per patient: the expected time to load one of its big chunks) make shards finish
    together. Unequal costs are dealt in snake order, most expensive first (within each label),
    so every shard keeps the same number of patients (each patient its share of samples) and a
    similar total cost. When that still leaves the shards' mean cost more than :data:`IMBALANCE`
    apart (a few patients of very different cost, e.g. one JPEG 2000 slide among JPEG ones), every
    patient is shared by every shard, each owning one band of it (part ``shard`` of ``num_shards``),
    provided every patient can be cut into that many bands (``max_parts``, one per patient, says
    how many bands still hold a patch; without it, banding is not used).
    """
    if num_patients < 1:
        raise ConfigError(f"cannot shard {num_patients} patients: need at least one")
    order = derive_rng(_SHARDS, seed, epoch).permutation(num_patients)
    if labels is not None:
        if len(labels) != num_patients:
            raise ConfigError(f"labels has {len(labels)} entries for {num_patients} patients")
        groups = sorted({labels[i] for i in order}, key=repr)
        rank = {label: g for g, label in enumerate(groups)}
        order = np.array(sorted(order, key=lambda i: rank[labels[i]]), dtype=int)  # stable sort
    shards: list[list[tuple[int, int, int]]] = [[] for _ in range(num_shards)]
    if costs is not None:
        if len(costs) != num_patients or not all(c > 0 for c in costs):
            raise ConfigError(f"costs must be {num_patients} numbers > 0, got {list(costs)[:10]}")
        if max(costs) > min(costs) * (1 + 1e-9) and num_patients >= num_shards:
            return _deal_by_cost(order, num_shards, labels, costs, max_parts)
    if num_patients >= num_shards:
        for position, patient in enumerate(order):
            shards[position % num_shards].append((int(patient), 0, 1))
        return shards
    for shard in range(num_shards):
        position = shard % num_patients
        parts = split_evenly(num_shards, num_patients, position)
        shards[shard].append((int(order[position]), shard // num_patients, parts))
    return shards


def _deal_by_cost(
    order: np.ndarray,
    num_shards: int,
    labels: Sequence[Hashable] | None,
    costs: Sequence[float],
    max_parts: Sequence[int] | None,
) -> list[list[tuple[int, int, int]]]:
    """Snake dealing by descending cost (see :func:`assign_shards`), or every patient banded over
    every shard when the snake leaves the shards more than :data:`IMBALANCE` apart."""
    group = {label: g for g, label in enumerate(sorted({labels[i] for i in order}, key=repr))} if labels else {}
    ranked = sorted(
        (int(i) for i in order), key=lambda i: (group.get(labels[i], 0) if labels else 0, -costs[i])
    )  # stable: equal costs keep the permutation's order
    shards: list[list[tuple[int, int, int]]] = [[] for _ in range(num_shards)]
    for position, patient in enumerate(ranked):
        lap, seat = divmod(position, num_shards)
        shards[seat if lap % 2 == 0 else num_shards - 1 - seat].append((patient, 0, 1))
    means = [sum(costs[p] for p, _, _ in shard) / len(shard) for shard in shards]
    bandable = max_parts is not None and all(int(n) >= num_shards for n in max_parts)
    if max(means) <= IMBALANCE * min(means) or not bandable:
        return shards
    return [[(int(p), shard, num_shards) for p in order] for shard in range(num_shards)]
