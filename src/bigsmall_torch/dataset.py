"""``BigSmallDataset``: the reservoir engine as a sharded ``torch.utils.data.IterableDataset``."""

from __future__ import annotations

import copy
import logging
import os
import pickle
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ._engine.batching import batch_count, batched_quota
from ._engine.messages import MessageBoard
from ._engine.reservoir import OnError, Reservoir
from ._engine.sharding import Topology, assign_shards, split_evenly
from ._engine.streaming import Live, StreamingDataset
from ._validate import positive_int
from .chunks import BigChunkLoader, SmallChunkCollector
from .data import Dataset
from .errors import ConfigError, SlideError
from .io.slide import Backend, SlideCache
from .schedulers import LabelBalancedScheduler, LeastVisitedScheduler, Scheduler

__all__ = ["BigSmallDataset", "available_memory"]

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class _Resuming:
    """The front end's part of a live iteration: the reservoir state it resumed from (None: the
    start of the epoch) and, once streaming, the running reservoir."""

    resume: dict[str, Any] | None
    reservoir: Reservoir | None = None


def available_memory() -> int | None:
    """Bytes of memory available to new allocations (Linux ``MemAvailable``; elsewhere the physical
    memory), or None when unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, OSError, ValueError):
        return None


class BigSmallDataset(StreamingDataset):
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
            into a reusable shared-memory slot of the worker (see :mod:`bigsmall_torch._engine.batch_ring`;
            the slot is handed back when the main process frees the batch), metadata are collated
            tensors/lists, ``transform`` gets the whole batch tensor, and ``len()`` counts batches.
            Same samples as per-sample mode for the same seed (when each worker's share is a whole
            number of batches).

    Each epoch every patient belongs to exactly one (rank, worker) shard, dealt from a permutation of
    (seed, epoch). With fewer patients than shards, a patient is shared by several shards, each owning
    a disjoint band of the slide (see :func:`~bigsmall_torch.loaders.part_bounds`).
    """

    kind: ClassVar[str] = "BigSmallDataset"

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
        if scheduler is not None and not isinstance(scheduler, Scheduler):
            raise ConfigError(f"scheduler must be a bigsmall_torch.Scheduler, got {type(scheduler).__name__}")
        self.scheduler = scheduler if scheduler is not None else LeastVisitedScheduler()
        if isinstance(self.scheduler, LabelBalancedScheduler):
            missing = [p.id for p in dataset.patients if p.label is None]
            if missing:
                raise ConfigError(f"LabelBalancedScheduler needs a label on every patient; unlabelled: {missing[:10]}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ConfigError(f"seed must be an int >= 0, got {seed!r}")
        self.seed = seed
        self._setup_stream(
            batch_size=batch_size, transform=transform, on_error=on_error, backend=backend,
            max_open_slides=max_open_slides, decode_threads=decode_threads, rank=rank,
            world_size=world_size,
        )  # fmt: skip
        self.board = MessageBoard()
        self._check_sizes()
        self._check_memory(1)
        if validate:
            self._validate_patients()
        self._check_epoch_split()
        # Shared memory, so set_epoch reaches workers that are already running (persistent workers).
        self._epoch = torch.zeros(1, dtype=torch.int64).share_memory_()
        self._states: dict[Any, dict[str, Any]] = {}
        self._memory_checked = 0  # the pid that checked the memory of all workers

    def _check_sizes(self) -> None:
        chunk, patch = self.loader.chunk_size, self.collector.patch_size
        if chunk is not None and patch is not None and (patch[0] > chunk[0] or patch[1] > chunk[1]):
            raise ConfigError(
                f"the collector's patch size {patch[0]}x{patch[1]} is larger than the loader's big "
                f"chunks ({chunk[0]}x{chunk[1]})"
            )

    def chunk_bytes(self) -> int | None:
        """Bytes of one big chunk (3 channels of uint8 at the loader's chunk size), when known."""
        size = self.loader.chunk_size
        return None if size is None else size[0] * size[1] * 3

    def _check_memory(self, workers: int) -> None:
        """Refuse a configuration whose resident and prefetched big chunks cannot fit in memory:
        ``(buffer_size + prefetch + 1) x chunk bytes x workers`` against the memory available."""
        chunk = self.chunk_bytes()
        available = available_memory()
        if chunk is None or available is None:
            return
        per_worker = (self.buffer_size + self.prefetch + 1) * chunk
        need = per_worker * max(1, workers)
        if need > available:
            gib = 1 << 30
            raise ConfigError(
                f"BigSmallDataset: buffer_size={self.buffer_size} and prefetch={self.prefetch} with "
                f"big chunks of {chunk / (1 << 20):.1f} MiB need (buffer_size + prefetch + 1) x chunk "
                f"x {max(1, workers)} worker(s) = {need / gib:.1f} GiB, but this machine has "
                f"{available / gib:.1f} GiB available; lower buffer_size, prefetch, the chunk size "
                "or num_workers"
            )

    def _validate_patients(self) -> None:
        """Check every patient's slide (in threads) and apply ``on_error``: a slide that cannot be
        opened, lacks the asked resolution, or is smaller than the patch is left out with
        ``"skip"`` (listed in :attr:`skipped`), or raised with ``"raise"`` (several at once: one
        :class:`~bigsmall_torch.UnusableSlidesError` naming them all). A slide smaller than the big chunk
        is fine: its chunks are clipped to it."""
        slides = SlideCache(16, backend=self.slides.backend, decode_threads=1)
        patch = self.collector.patch_size
        extent = getattr(self.loader, "extent", None)
        record_key = getattr(self.loader, "record_key", "wsi")

        def check(patient: Any) -> None:
            self.loader.validate(patient, slides)
            if patch is None or extent is None:
                return
            info = slides.get(patient.record(record_key).path).info
            width, height = extent(info)
            if patch[0] > width or patch[1] > height:
                raise SlideError(
                    info.path,
                    f"is {width}x{height} pixels at the asked resolution, smaller than the "
                    f"{patch[0]}x{patch[1]} patch",
                )

        try:
            self.dataset = self._refuse_bad_patients(self.dataset, check)
        finally:
            slides.close()

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

    def shard_quota(self, topo: Topology) -> int | None:
        """Samples the shard ``topo`` yields this epoch (None: endless).

        Per-sample mode splits the rank's samples evenly over its workers; batched mode deals them
        in whole batches (:func:`~bigsmall_torch._engine.batching.batched_quota`), so that ``len()`` counts
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

    def _identity(self) -> dict[str, Any]:
        return {"seed": self.seed, "samples_per_epoch": self.samples_per_epoch, "buffer_size": self.buffer_size}

    def _extra_state(self, live: Live | None) -> dict[str, Any]:
        """The recipes of the resident big chunks (patient and generator state of each read, so
        they can be read again), the generators and the scheduler, and the per-patient states.
        Messages and weights sent from the training loop are not saved: send them again."""
        reservoir = None
        if live is not None and isinstance(live.extra, _Resuming) and not live.finished:
            running = live.extra.reservoir
            reservoir = running.state() if running is not None else None
            if reservoir is None:  # not started, or still re-reading the resumed chunks
                reservoir = live.extra.resume
        return {"reservoir": reservoir, "states": pickle.dumps(self._states)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume from :meth:`state_dict` at the next iteration; also selects the saved epoch
        (see :meth:`~bigsmall_torch._engine.streaming.StreamingDataset.load_state_dict`)."""
        super().load_state_dict(state)
        self._epoch[0] = int(state["epoch"])

    def __iter__(self) -> Iterator[Any]:
        # Not a generator: the iteration's state exists as soon as iter() returns, because
        # torchdata's StatefulDataLoader calls state_dict() right after iter() in each worker.
        self._check_epoch_split()
        topo, live, pending = self._begin()
        resume: dict[str, Any] | None = None
        if pending is not None:
            self._states = pickle.loads(pending["states"])  # our own checkpoint
            resume = pending["reservoir"]
        live.extra = _Resuming(resume)
        quota = self.shard_quota(topo)
        if quota is not None:
            quota -= live.yielded
        if (quota is not None and quota <= 0) or live.finished:
            live.finished = True
            return iter(())
        if self._memory_checked != os.getpid() and topo.worker == 0:
            # Once, in the first worker (the others start with it): later epochs reuse the memory.
            self._memory_checked = os.getpid()
            self._check_memory(topo.num_workers)
        return self._stream(topo, live, quota, resume)

    def _stream(
        self, topo: Topology, live: Live, quota: int | None, resume: dict[str, Any] | None
    ) -> Iterator[Any]:
        reservoir = self.make_reservoir(topo, epoch=live.epoch)
        live.extra = _Resuming(resume, reservoir)
        live.skipped = reservoir.stats.skipped
        self.last_stats = reservoir.stats
        self.slides.acquire()
        stream = reservoir.stream(resume)
        try:
            yield from self._output(stream, live, quota)
            live.finished = True
        finally:
            stream.close()
            self.slides.release()

    def __repr__(self) -> str:
        return (
            f"BigSmallDataset(dataset={self.dataset!r}, loader={self.loader!r}, "
            f"collector={self.collector!r}, buffer_size={self.buffer_size}, "
            f"smallchunks_per_bigchunk={self.smallchunks_per_bigchunk}, "
            f"samples_per_epoch={self.samples_per_epoch}, seed={self.seed})"
        )
