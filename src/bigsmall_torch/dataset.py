"""``BigSmallDataset``: the reservoir engine as a sharded ``torch.utils.data.IterableDataset``."""

from __future__ import annotations

import copy
import logging
import os
import pickle
import time
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch.utils.data import IterableDataset

from ._batch_ring import InlineDict, apply_transform
from ._batching import BatchBuilder, batch_count, batched_quota
from ._sharding import (
    Topology,
    assign_shards,
    current_topology,
    distributed_rank_and_world,
    split_evenly,
)
from ._types import Sample
from ._validate import choice, optional_callable, positive_int
from .chunks import BigChunkLoader, SmallChunk, SmallChunkCollector
from .data import Dataset
from .errors import ConfigError
from .messages import MessageBoard
from .reservoir import OnError, Reservoir, ReservoirStats
from .schedulers import LabelBalancedScheduler, LeastVisitedScheduler, Scheduler
from .slide import Backend, SlideCache

__all__ = ["BigSmallDataset", "check_resume_topology", "to_sample"]

logger = logging.getLogger(__name__)

_STATE_VERSION = 1


def _loader_workers() -> int:
    """The DataLoader's ``num_workers`` as the user gave it (0 in the main process)."""
    info = torch.utils.data.get_worker_info()
    return 0 if info is None else info.num_workers


def check_resume_topology(what: str, saved: Mapping[str, Any], current: Mapping[str, Any]) -> None:
    """Raise :class:`~bigsmall_torch.ConfigError` when a saved state's topology differs from the
    current one (keys ``num_workers``, ``worker``, ``rank``, ``world_size``, ``batch_size``...)."""
    if saved.get("version") != _STATE_VERSION:
        raise ConfigError(f"{what}: state version {saved.get('version')!r} is not {_STATE_VERSION}")
    for key, value in current.items():
        if saved.get(key) != value:
            raise ConfigError(
                f"{what}: cannot resume with {key}={value!r}: the state was saved with "
                f"{key}={saved.get(key)!r}; resume with the same DataLoader num_workers, batch_size, "
                "rank and world size (or start the epoch afresh without load_state_dict)"
            )


class _Live:
    """The position of the running iteration (what :meth:`BigSmallDataset.state_dict` reads)."""

    def __init__(self, epoch: int, topology: dict[str, Any], yielded: int = 0) -> None:
        self.epoch = epoch
        self.topology = topology
        self.yielded = yielded
        self.finished = False
        self.reservoir: Reservoir | None = None
        self.pid = os.getpid()  # a forked worker ignores its parent's iteration


def to_sample(small: SmallChunk) -> Sample:
    """The sample dict of a small chunk: ``image`` as a CHW uint8 tensor (a view, no copy), the
    patient id, its label when set, and every entry of the small chunk's ``info``."""
    data = small.data
    image = torch.from_numpy(data)
    if image.ndim == 3:
        image = image.permute(2, 0, 1)
    sample: dict[str, Any] = InlineDict(image=image, patient_id=small.patient.id)
    if small.patient.label is not None:
        sample["label"] = small.patient.label
    sample.update(small.info)
    return sample  # type: ignore[return-value]


class BigSmallDataset(IterableDataset[Sample]):
    """Patches streamed from big chunks held in RAM, sharded over DataLoader workers and ranks.

    Args:
        dataset: the patients to stream from.
        loader: loads big chunks (e.g. :class:`~bigsmall_torch.RandomRegionLoader`).
        collector: collects small chunks from them (e.g. :class:`~bigsmall_torch.RandomCropCollector`).
        buffer_size: big chunks resident per worker; samples are drawn from a random resident chunk.
        smallchunks_per_bigchunk: a big chunk retires after this many samples (or when the collector
            returns None).
        samples_per_epoch: total samples of one epoch across all workers and ranks (each rank gets
            ``samples_per_epoch / world_size``; it must divide evenly). None streams endlessly.
        transform: applied in the worker to each sample's ``image`` (a CHW uint8 tensor); in batched
            mode to the batch's ``image`` (``[n, C, H, W]``).
        seed: every random draw derives from (seed, epoch, rank, worker).
        prefetch: big chunks each worker loads ahead in its background thread.
        on_error: ``"raise"`` (default) or ``"skip"``: what to do when a slide fails to read while
            streaming. Skipped slides are logged (warning) and counted per worker.
        backend: slide reading backend (``"auto"``, ``"openslide"``, ``"tiffslide"``).
        max_open_slides: per-worker LRU size of open slide handles.
        decode_threads: threads that decode the JPEG tiles of one big chunk (per worker).
        validate: check every patient with ``loader.validate`` at construction (opens each slide's
            header once in this process).
        rank, world_size: the distributed position; by default read from torch.distributed when it is
            initialised (at construction, :meth:`set_epoch` and ``len()``), else 0 and 1.
        scheduler: picks the patient of each next big chunk, per worker (default
            :class:`~bigsmall_torch.LeastVisitedScheduler`; also :class:`~bigsmall_torch.LabelBalancedScheduler`,
            :class:`~bigsmall_torch.WeightedScheduler`, or a subclass of :class:`~bigsmall_torch.Scheduler`).
        batch_size: batched mode: yield whole batches built in the worker (use
            ``DataLoader(ds, batch_size=None)``): ``image`` is one ``[n, C, H, W]`` uint8 tensor written
            into a reusable shared-memory slot of the worker (see :mod:`bigsmall_torch._batch_ring`;
            the slot is handed back when the main process frees the batch), metadata are collated
            tensors/lists, ``transform`` gets the whole batch tensor, and ``len()`` counts batches.
            Same samples as per-sample mode for the same seed (when each worker's share is a whole
            number of batches).

    Each epoch every patient belongs to exactly one (rank, worker) shard, dealt from a permutation of
    (seed, epoch). With fewer patients than shards, a patient is shared by several shards, each owning
    a disjoint band of the slide (see :func:`~bigsmall_torch.loaders.part_bounds`).
    """

    def __init__(
        self,
        dataset: Dataset,
        loader: BigChunkLoader,
        collector: SmallChunkCollector,
        *,
        buffer_size: int,
        smallchunks_per_bigchunk: int,
        samples_per_epoch: int | None = None,
        transform: Callable[[torch.Tensor], Any] | None = None,
        seed: int = 0,
        prefetch: int = 2,
        on_error: str | OnError = "raise",
        backend: str | Backend = "auto",
        max_open_slides: int = 16,
        decode_threads: int = 2,
        validate: bool = True,
        rank: int | None = None,
        world_size: int | None = None,
        batch_size: int | None = None,
        scheduler: Scheduler | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(dataset, Dataset):
            raise ConfigError(f"dataset must be a bigsmall_torch.Dataset, got {type(dataset).__name__}")
        if len(dataset) == 0:
            raise ConfigError(f"dataset {dataset.name!r} has no patients")
        if not isinstance(loader, BigChunkLoader):
            raise ConfigError(f"loader must be a BigChunkLoader, got {type(loader).__name__}")
        if not isinstance(collector, SmallChunkCollector):
            raise ConfigError(f"collector must be a SmallChunkCollector, got {type(collector).__name__}")
        self.dataset = dataset
        self.loader = loader
        self.collector = collector
        self.buffer_size = positive_int("buffer_size", buffer_size)
        self.smallchunks_per_bigchunk = positive_int("smallchunks_per_bigchunk", smallchunks_per_bigchunk)
        self.samples_per_epoch = (
            None if samples_per_epoch is None else positive_int("samples_per_epoch", samples_per_epoch)
        )
        self.prefetch = positive_int("prefetch", prefetch)
        self.batch_size = None if batch_size is None else positive_int("batch_size", batch_size)
        if scheduler is not None and not isinstance(scheduler, Scheduler):
            raise ConfigError(f"scheduler must be a bigsmall_torch.Scheduler, got {type(scheduler).__name__}")
        self.scheduler = scheduler if scheduler is not None else LeastVisitedScheduler()
        if isinstance(self.scheduler, LabelBalancedScheduler):
            missing = [p.id for p in dataset.patients if p.label is None]
            if missing:
                raise ConfigError(f"LabelBalancedScheduler needs a label on every patient; unlabelled: {missing[:10]}")
        self.board = MessageBoard()
        self.transform = optional_callable("transform", transform)
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ConfigError(f"seed must be an int >= 0, got {seed!r}")
        self.seed = seed
        self.on_error = choice("on_error", on_error, OnError)
        self.slides = SlideCache(
            positive_int("max_open_slides", max_open_slides), backend=backend, decode_threads=decode_threads
        )
        self._explicit_topology = (rank, world_size)
        self.rank, self.world_size = distributed_rank_and_world(rank, world_size)
        self._check_sizes()
        if validate:
            self._validate_patients()
        self._check_epoch_split()
        # Shared memory, so set_epoch reaches workers that are already running (persistent workers).
        self._epoch = torch.zeros(1, dtype=torch.int64).share_memory_()
        self._states: dict[Any, dict[str, Any]] = {}
        self.last_stats = ReservoirStats()  # of the latest iteration in this process
        self._live: _Live | None = None  # the running iteration
        self._pending: dict[str, Any] | None = None  # a loaded state the next __iter__ resumes

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_live"] = None  # holds a reservoir (threads): never sent to workers
        return state

    def _check_sizes(self) -> None:
        chunk, patch = self.loader.chunk_size, self.collector.patch_size
        if chunk is not None and patch is not None and (patch[0] > chunk[0] or patch[1] > chunk[1]):
            raise ConfigError(
                f"the collector's patch size {patch[0]}x{patch[1]} is larger than the loader's big "
                f"chunks ({chunk[0]}x{chunk[1]})"
            )

    def _validate_patients(self) -> None:
        slides = SlideCache(4, backend=self.slides.backend)
        try:
            for patient in self.dataset.patients:
                self.loader.validate(patient, slides)
        finally:
            slides.close()

    def _refresh_topology(self) -> None:
        """Re-read rank/world size (main process only: workers keep what they were given)."""
        if torch.utils.data.get_worker_info() is None:
            self.rank, self.world_size = distributed_rank_and_world(*self._explicit_topology)

    def _check_epoch_split(self) -> None:
        if self.samples_per_epoch is not None and self.samples_per_epoch % self.world_size:
            raise ConfigError(
                f"samples_per_epoch={self.samples_per_epoch} must be divisible by the world size "
                f"{self.world_size}, so that every rank gets the same number of samples"
            )

    # -- messages from the training loop ----------------------------------------------------------

    def _check_ids(self, ids: Iterable[Any], what: str) -> None:
        known = {p.id for p in self.dataset.patients}
        unknown = [i for i in ids if i not in known]
        if unknown:
            raise ConfigError(f"{what}: unknown patient ids {unknown[:10]}")

    def send_message(self, patient_id: Any, message: Any) -> None:
        """Send ``message`` (any picklable object) about a patient to the running loaders.

        The last message per patient wins. Collectors see it at their next call
        (``ctx.message``); loaders at the next big chunk they start loading (chunks already
        prefetched were loaded with the message they saw). It reaches workers that are running,
        persistent or not, forked or spawned, without restarting them.
        """
        self.send_messages({patient_id: message})

    def send_messages(self, messages: Mapping[Any, Any]) -> None:
        """Several :meth:`send_message` at once (one write)."""
        self._check_ids(messages, "send_messages")
        self.board.send(messages)

    def set_weights(self, weights: Mapping[Any, float]) -> None:
        """Per-patient sampling weights (patient id -> weight >= 0) for the scheduler, while running.

        :class:`~bigsmall_torch.WeightedScheduler` draws patients in proportion to them; every
        built-in scheduler skips patients of weight 0. Seen at the next big chunk each worker schedules.
        """
        self._check_ids(weights, "set_weights")
        for key, value in weights.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ConfigError(f"set_weights: weight of {key!r} must be a number >= 0, got {value!r}")
        self.board.set_weights(weights)

    @property
    def epoch(self) -> int:
        return int(self._epoch[0])

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch: reshuffles the shard assignment and every random stream. Reaches
        persistent workers (the epoch lives in shared memory)."""
        self._epoch[0] = positive_int("epoch", epoch, minimum=0)
        self._refresh_topology()

    def __len__(self) -> int:
        """Samples (batched mode: batches) this rank yields per epoch; a TypeError when endless."""
        if self.samples_per_epoch is None:
            raise TypeError("BigSmallDataset without samples_per_epoch is endless and has no len()")
        self._refresh_topology()
        self._check_epoch_split()
        per_rank = self.samples_per_epoch // self.world_size
        return per_rank if self.batch_size is None else batch_count(per_rank, self.batch_size)

    def topology(self) -> Topology:
        """The (rank, world size, worker, num_workers) of the calling process."""
        return current_topology(self.rank, self.world_size)

    def shard_quota(self, topo: Topology) -> int | None:
        """Samples the shard ``topo`` yields this epoch (None: endless).

        Per-sample mode splits the rank's samples evenly over its workers; batched mode deals them
        in whole batches (:func:`~bigsmall_torch._batching.batched_quota`), so that ``len()`` counts
        batches exactly. Both give the same split when every worker's share is a whole number of
        batches.
        """
        if self.samples_per_epoch is None:
            return None
        per_rank = self.samples_per_epoch // topo.world_size
        if self.batch_size is not None:
            return batched_quota(per_rank, self.batch_size, topo.num_workers, topo.worker)
        return split_evenly(per_rank, topo.num_workers, topo.worker)

    def make_reservoir(self, topo: Topology, *, epoch: int | None = None) -> Reservoir:
        """The reservoir of shard ``topo`` for ``epoch`` (default: the current epoch)."""
        epoch = self.epoch if epoch is None else epoch
        labels = [p.label for p in self.dataset.patients]
        stratify = all(label is not None and isinstance(label, Hashable) for label in labels)
        shards = assign_shards(
            len(self.dataset), topo.num_shards, seed=self.seed, epoch=epoch,
            labels=labels if stratify else None,
        )
        owned = [(self.dataset.patients[i], (part, parts)) for i, part, parts in shards[topo.shard]]
        return Reservoir(
            owned,
            self.loader,
            self.collector,
            buffer_size=self.buffer_size,
            smallchunks_per_bigchunk=self.smallchunks_per_bigchunk,
            prefetch=self.prefetch,
            seeds=(self.seed, epoch, topo.rank, topo.worker),
            states=self._states,
            slides=self.slides,
            on_error=self.on_error,
            scheduler=copy.deepcopy(self.scheduler),
            board=self.board,
        )

    # -- checkpointing (torchdata's StatefulDataLoader) --------------------------------------------

    def _topology_state(self, topo: Topology) -> dict[str, Any]:
        return {
            "version": _STATE_VERSION, "seed": self.seed, "rank": topo.rank, "world_size": topo.world_size,
            "num_workers": _loader_workers(), "worker": topo.worker, "batch_size": self.batch_size,
            "samples_per_epoch": self.samples_per_epoch, "buffer_size": self.buffer_size,
        }

    def state_dict(self) -> dict[str, Any]:
        """Where this worker's stream stands, for ``torchdata.stateful_dataloader.StatefulDataLoader``.

        Called in each DataLoader worker (in the main process with ``num_workers=0``) between
        batches. The state (plain types, numpy generator states and pickled bytes) holds the epoch,
        the topology, the samples yielded, the recipes of the resident big chunks (patient and
        generator state of each read, so they can be read again), the generators and the scheduler,
        and the per-patient states. Before an iteration starts it means "the start of the epoch".

        Resuming: ``StatefulDataLoader.load_state_dict`` passes it back to :meth:`load_state_dict`
        in a fresh process; the stream then goes on sample for sample as if it had never stopped.
        Messages and weights sent from the training loop are not saved: send them again.
        """
        live = self._live
        if live is not None and live.pid == os.getpid():
            state: dict[str, Any] = dict(live.topology, epoch=live.epoch, samples=live.yielded,
                                         finished=live.finished, reservoir=None)  # fmt: skip
            if live.reservoir is not None and not live.finished:
                state["reservoir"] = live.reservoir.state()
                if state["reservoir"] is None:  # resident chunks not loaded yet: nothing yielded
                    state["samples"] = 0
        elif self._pending is not None:
            return self._pending
        else:
            topo = self.topology()
            state = dict(self._topology_state(topo), epoch=self.epoch, samples=0, finished=False, reservoir=None)
        state["states"] = pickle.dumps(self._states)
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume from :meth:`state_dict` at the next iteration (``StatefulDataLoader`` calls it in each
        worker before ``iter``). Also selects the saved epoch.

        The DataLoader must have the same ``num_workers`` (and the dataset the same ``batch_size``,
        seed, rank and world size) as when the state was saved: a different ``num_workers`` raises
        :class:`~bigsmall_torch.ConfigError` naming both values when the iteration starts
        (``StatefulDataLoader`` itself refuses a state saved with another number of workers with an
        ``AssertionError`` before the dataset sees it).
        """
        if not isinstance(state, Mapping) or "epoch" not in state or "samples" not in state:
            raise ConfigError(f"load_state_dict: not a BigSmallDataset state: {type(state).__name__}")
        self._pending = dict(state)
        self._epoch[0] = int(state["epoch"])
        self._live = None

    def __iter__(self) -> Iterator[Any]:
        self._refresh_topology()
        self._check_epoch_split()
        topo = self.topology()
        pending, self._pending = self._pending, None
        live = _Live(self.epoch, self._topology_state(topo))
        resume: dict[str, Any] | None = None
        if pending is not None:
            check_resume_topology("BigSmallDataset", pending, live.topology)
            live.epoch = int(pending["epoch"])
            live.yielded = int(pending["samples"])
            self._states = pickle.loads(pending["states"])  # our own checkpoint
            resume = pending["reservoir"]
        self._live = live
        quota = self.shard_quota(topo)
        if quota is not None:
            quota -= live.yielded
        if (quota is not None and quota <= 0) or (pending is not None and pending["finished"]):
            live.finished = True
            return
        reservoir = self.make_reservoir(topo, epoch=live.epoch)
        live.reservoir = reservoir
        self.last_stats = reservoir.stats
        stream = reservoir.stream(resume)
        try:
            if self.batch_size is None:
                yield from self._samples(stream, quota, live)
            else:
                yield from self._batches(stream, quota, self.batch_size, live)
            live.finished = True
        finally:
            stream.close()
            self.slides.close()

    def _samples(self, stream: Iterator[SmallChunk], quota: int | None, live: _Live) -> Iterator[Sample]:
        stats, clock = self.last_stats, time.perf_counter
        for count, small in enumerate(stream, start=1):
            t0 = clock()
            sample = to_sample(small)
            t1 = clock()
            if self.transform is not None:
                sample["image"] = self.transform(sample["image"])
            t2 = clock()
            stats.emit_s += t1 - t0
            stats.transform_s += t2 - t1
            live.yielded += 1
            if quota is not None and count >= quota:
                live.finished = True
            yield sample
            stats.outside_s += clock() - t2
            if quota is not None and count >= quota:
                return

    def _batches(
        self, stream: Iterator[SmallChunk], quota: int | None, batch_size: int, live: _Live
    ) -> Iterator[dict[str, Any]]:
        builder = BatchBuilder(batch_size)
        stats, clock = self.last_stats, time.perf_counter
        for count, small in enumerate(stream, start=1):
            t0 = clock()
            builder.add(small)
            last = quota is not None and count >= quota
            if len(builder) == batch_size or last:
                batch = builder.build()
                t1 = clock()
                if self.transform is not None:
                    apply_transform(batch, self.transform)
                t2 = clock()
                stats.emit_s += t1 - t0
                stats.transform_s += t2 - t1
                live.yielded += len(batch["patient_id"])
                live.finished = last
                yield batch
                stats.outside_s += clock() - t2
            else:
                stats.emit_s += clock() - t0
            if last:
                return

    def __repr__(self) -> str:
        return (
            f"BigSmallDataset(dataset={self.dataset!r}, loader={self.loader!r}, "
            f"collector={self.collector!r}, buffer_size={self.buffer_size}, "
            f"smallchunks_per_bigchunk={self.smallchunks_per_bigchunk}, "
            f"samples_per_epoch={self.samples_per_epoch}, seed={self.seed})"
        )
