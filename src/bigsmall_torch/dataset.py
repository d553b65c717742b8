"""``BigSmallDataset``: the reservoir engine as a sharded ``torch.utils.data.IterableDataset``."""

from __future__ import annotations

import copy
import logging
import os
import pickle
import time
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any, ClassVar

import torch

from ._engine.batching import batch_count, batched_quota
from ._engine.messages import MessageBoard
from ._engine.reservoir import OnError, Reservoir
from ._engine.sharding import Topology, assign_shards, split_evenly
from ._engine.streaming import Live, StreamingDataset
from ._paths import RemotePath
from ._validate import choice, positive_int
from .chunks import BigChunkLoader, SmallChunkCollector
from .data import Dataset
from .errors import ConfigError, SlideError
from .io.slide import Backend, SlideCache
from .schedulers import LabelBalancedScheduler, LeastVisitedScheduler, Scheduler

_PREFETCH = 2  # big chunks loaded ahead per worker
_REMOTE_PREFETCH = 4  # ... when a slide is read over the network

__all__ = ["BigSmallDataset", "Sharding", "available_memory"]

logger = logging.getLogger(__name__)

#: Relative decode time of one pixel by codec (``SlideInfo.codec``), JPEG = 1. JPEG 2000 from
#: ``python -m benchmarks.bench_read --quick`` (fast path, 2048x2048 reads: 146.7 vs 12.8 MP/s with
#: one thread, 282.1 vs 25.3 with two); the others are estimates; codecs not listed count as JPEG.
#: Decoded plain images are read from memory.
CODEC_COST = {"jpeg": 1.0, "jpeg2000": 11.0, "none": 0.3, "lzw": 1.5, "deflate": 1.5,
              "png": 0.1, "bmp": 0.1}  # fmt: skip


class Sharding(str, Enum):
    """How patients are dealt to the (rank, worker) shards each epoch.

    ``COST``: by their expected cost per big chunk (codec and chunk size, read at construction), so
    that workers finish together (see :func:`~bigsmall_torch._engine.sharding.assign_shards`);
    ``COUNT``: round-robin, the same number of patients each.
    """

    COST = "cost"
    COUNT = "count"

@dataclass(frozen=True)
class _Resuming:
    """The front end's part of a live iteration: the reservoir state it resumed from (None: the
    start of the epoch) and, once streaming, the running reservoir."""

    resume: dict[str, Any] | None
    reservoir: Reservoir | None = None
    cohort: bytes | None = None  # the pickled _Cohort the shards were dealt from


@dataclass(frozen=True)
class _Cohort:
    """What the shards of an epoch are dealt from (saved with every state, so a resume deals them
    the same way even when slides were refused since)."""

    ids: list[Any]
    costs: list[float] | None
    max_parts: list[int] | None


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
        prefetch: big chunks each worker loads ahead in its background thread. None: 2, or 4 when
            a record is a URL (a slide in object storage or on a web server), so that the requests'
            latency and its spikes stay hidden behind the chunks already loaded.
        on_error: ``"raise"`` (default) or ``"skip"``: what to do with a slide that cannot be used.
            At construction (``validate``) every slide is checked: ``"skip"`` leaves the bad ones
            out (:attr:`skipped`, one warning), ``"raise"`` raises one error naming them all.
            While streaming, ``"skip"`` leaves a failing patient out for the rest of the epoch in
            that worker (a warning; :attr:`skipped` and :meth:`epoch_report` in the main process);
            the worker's quota is served by its other patients, or, when none is left, by the rest
            of the cohort, so an epoch is never shortened while good slides remain.
        skip_errors: exception types raised by the user's loader or collector that
            ``on_error="skip"`` handles like a slide error (:class:`~bigsmall_torch.SlideError` always
            is); other exceptions always propagate.
        sharding: how patients are dealt to workers (:class:`Sharding`): ``"cost"`` (default;
            needs ``validate``) balances the expected decode time per worker, ``"count"`` deals
            round-robin.
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
        prefetch: int | None = None,
        on_error: str | OnError = "raise",
        backend: str | Backend = "auto",
        max_open_slides: int = 16,
        decode_threads: int = 2,
        validate: bool = True,
        rank: int | None = None,
        world_size: int | None = None,
        batch_size: int | None = None,
        scheduler: Scheduler | None = None,
        skip_errors: tuple[type[Exception], ...] = (),
        sharding: str | Sharding = "cost",
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
        if prefetch is None:
            remote = any(
                isinstance(r.path, RemotePath) for p in getattr(dataset, "patients", ()) for r in p.records.values()
            )
            prefetch = _REMOTE_PREFETCH if remote else _PREFETCH
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
        self.skip_errors = self._check_skip_errors(skip_errors)
        self.sharding = choice("BigSmallDataset: sharding", sharding, Sharding)
        self._costs: dict[Any, float] = {}  # patient id -> expected cost of a big chunk
        self._max_parts: dict[Any, int] = {}  # patient id -> bands that still hold a patch
        self._refused_patients: dict[Any, Any] = {}  # left out at construction (on_error="skip")
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

    def _check_skip_errors(self, skip_errors: Any) -> tuple[type[Exception], ...]:
        given = skip_errors if isinstance(skip_errors, tuple) else (skip_errors,)
        if not all(isinstance(t, type) and issubclass(t, Exception) for t in given):
            raise ConfigError(
                f"BigSmallDataset: skip_errors must be a tuple of Exception subclasses, got {skip_errors!r}"
            )
        if given and self.on_error is not OnError.SKIP:
            raise ConfigError(
                f"BigSmallDataset: skip_errors={skip_errors!r} only applies with on_error='skip', "
                f"got on_error={self.on_error.value!r}"
            )
        return given

    def _check_sizes(self) -> None:
        chunk, patch = self.loader.chunk_size, self.collector.patch_size
        if chunk is not None and patch is not None and (patch[0] > chunk[0] or patch[1] > chunk[1]):
            raise ConfigError(
                f"the collector's patch size {patch[0]}x{patch[1]} is larger than the loader's big "
                f"chunks ({chunk[0]}x{chunk[1]})"
            )
        if getattr(self.collector, "needs_labels", False) and getattr(self.loader, "gives_labels", None) is False:
            raise ConfigError(
                f"{self.collector!r} needs big chunks with labels (masks=True or min_coverage > 0), "
                f"but {self.loader!r} gives none: pass annotations= and classes= to the loader"
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
            record = patient.record(record_key)
            info = slides.get(record.path, mpp=record.info.get("mpp")).info
            width, height = extent(info)
            if patch[0] > width or patch[1] > height:
                raise SlideError(
                    info.path,
                    f"is {width}x{height} pixels at the asked resolution, smaller than the "
                    f"{patch[0]}x{patch[1]} patch",
                )
            chunk = self.loader.chunk_size or (width, height)
            pixels = min(chunk[0], width) * min(chunk[1], height)
            self._costs[patient.id] = CODEC_COST.get(getattr(info, "codec", None) or "", 1.0) * pixels
            # Bands cut the longer side (loaders.part_bounds); each must still hold a patch.
            self._max_parts[patient.id] = width // patch[0] if width >= height else height // patch[1]

        before = self.dataset.patients
        try:
            self.dataset = self._refuse_bad_patients(self.dataset, check)
        finally:
            slides.close()
        kept = {p.id for p in self.dataset.patients}
        self._refused_patients = {p.id: p for p in before if p.id not in kept}

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

    def _cohort(self) -> _Cohort:
        """What the shards are dealt from: the patient ids in order, and their costs when
        ``sharding="cost"`` and every one is known."""
        ids = [p.id for p in self.dataset.patients]
        if self.sharding is Sharding.COST and all(i in self._costs for i in ids):
            return _Cohort(ids, [self._costs[i] for i in ids], [self._max_parts[i] for i in ids])
        return _Cohort(ids, None, None)

    def make_reservoir(
        self, topo: Topology, *, epoch: int | None = None, cohort: _Cohort | None = None
    ) -> Reservoir:
        """The reservoir of shard ``topo`` for ``epoch`` (default: the current epoch).

        ``cohort`` (from a saved state) deals the shards as they were dealt when the state was
        saved; its patients that are no longer in the dataset (refused at this construction:
        their slides became unusable since) are never scheduled.
        """
        epoch = self.epoch if epoch is None else epoch
        cohort = self._cohort() if cohort is None else cohort
        known = {p.id: p for p in self.dataset.patients}
        unusable = [i for i in cohort.ids if i not in known]
        known.update(self._refused_patients)
        lost = [i for i in cohort.ids if i not in known]
        if lost:
            raise ConfigError(
                f"BigSmallDataset: cannot resume: the state was saved over patients {lost[:10]} "
                "that this dataset does not have; resume with the same dataset"
            )
        patients = [known[i] for i in cohort.ids]
        labels = [p.label for p in patients]
        stratify = all(label is not None and isinstance(label, Hashable) for label in labels)
        costs, max_parts = cohort.costs, cohort.max_parts
        shards = assign_shards(
            len(patients), topo.num_shards, seed=self.seed, epoch=epoch,
            labels=labels if stratify else None, costs=costs, max_parts=max_parts,
        )
        owned = [(patients[i], (part, parts)) for i, part, parts in shards[topo.shard]]
        mine = {i for i, _, _ in shards[topo.shard]}
        dealt = dict.fromkeys(i for shard in shards for i, _, _ in shard)  # once each, in order
        reserve = [(patients[i], (0, 1)) for i in dealt if i not in mine]
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
            reserve=reserve,
            skip_errors=self.skip_errors,
            unusable=unusable,
        )

    # -- checkpointing (torchdata's StatefulDataLoader) --------------------------------------------

    def _identity(self) -> dict[str, Any]:
        return {"seed": self.seed, "samples_per_epoch": self.samples_per_epoch,
                "buffer_size": self.buffer_size, "sharding": self.sharding.value}  # fmt: skip

    def _extra_state(self, live: Live | None) -> dict[str, Any]:
        """The recipes of the resident big chunks (patient and generator state of each read, so
        they can be read again), the generators and the scheduler, and the per-patient states.
        Messages and weights sent from the training loop are not saved: send them again."""
        reservoir = None
        cohort = None
        if live is not None and isinstance(live.extra, _Resuming):
            cohort = live.extra.cohort
            if not live.finished:
                running = live.extra.reservoir
                reservoir = running.state() if running is not None else None
                if reservoir is None:  # not started, or still re-reading the resumed chunks
                    reservoir = live.extra.resume
        if cohort is None:
            cohort = pickle.dumps(self._cohort())
        return {"reservoir": reservoir, "states": pickle.dumps(self._states), "cohort": cohort}

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
        cohort: bytes | None = None
        if pending is not None:
            self._states = pickle.loads(pending["states"])  # our own checkpoint
            resume = pending["reservoir"]
            cohort = pending.get("cohort")
        live.extra = _Resuming(resume, None, cohort or pickle.dumps(self._cohort()))
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
        assert isinstance(live.extra, _Resuming)
        cohort = live.extra.cohort
        saved = pickle.loads(cohort) if cohort is not None else None  # our own checkpoint
        reservoir = self.make_reservoir(topo, epoch=live.epoch, cohort=saved)
        live.extra = _Resuming(resume, reservoir, cohort)
        live.skipped = reservoir.stats.skipped
        self.last_stats = reservoir.stats
        self.slides.acquire()
        stream = reservoir.stream(resume)
        started = time.perf_counter()
        try:
            yield from self._output(stream, live, quota)
            live.finished = True
        finally:
            stream.close()
            self.slides.release()
            reservoir.stats.elapsed_s += time.perf_counter() - started
            self._report(live, busy=reservoir.stats.busy_fraction)

    def __repr__(self) -> str:
        return (
            f"BigSmallDataset(dataset={self.dataset!r}, loader={self.loader!r}, "
            f"collector={self.collector!r}, buffer_size={self.buffer_size}, "
            f"smallchunks_per_bigchunk={self.smallchunks_per_bigchunk}, "
            f"samples_per_epoch={self.samples_per_epoch}, seed={self.seed})"
        )
