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

__all__ = ["Topology", "assign_shards", "derive_rng", "derive_seed", "split_evenly"]


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
) -> list[list[tuple[int, int, int]]]:
    """Which patients each shard owns in ``epoch``.

    Returns, per shard, a list of ``(patient_index, part, parts)``. The patients are permuted from
    ``(seed, epoch)`` and dealt round-robin, so each patient belongs to exactly one shard and the
    assignment changes every epoch. With ``labels`` (one per patient) the permutation is grouped by
    label before dealing, so every shard gets a share of each label. With fewer patients than shards, patient ``p`` is shared by the
    ``parts`` shards dealt to it, each owning a disjoint part (``part`` of ``parts``) of its slide.
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
    if num_patients >= num_shards:
        for position, patient in enumerate(order):
            shards[position % num_shards].append((int(patient), 0, 1))
        return shards
    for shard in range(num_shards):
        position = shard % num_patients
        parts = split_evenly(num_shards, num_patients, position)
        shards[shard].append((int(order[position]), shard // num_patients, parts))
    return shards
