"""The streaming core every dataset of the package is a front end of.

:class:`StreamingDataset` owns what the training stream (:class:`~bigsmall_torch.BigSmallDataset`),
sliding-window inference (:class:`~bigsmall_torch.SlidingWindowDataset`) and the PyDmed layer
(``LightDL``) have in common, written once:

- the **topology**: rank and world size (explicit, or read from ``torch.distributed`` in the main
  process at construction, ``len()``, ``set_epoch`` and each iteration), worker and ``num_workers``;
- **one versioned state schema** for ``state_dict`` / ``load_state_dict`` (torchdata's
  ``StatefulDataLoader``): the topology the state was saved under (a resume under another one is
  refused, naming both values), the epoch, the samples yielded, the stream *position* committed
  with the last output (the front end's own unit: windows consumed, skipped ones included, for
  sliding windows), and the front end's extra state;
- **output**: per-sample dicts or whole batches built in the worker (shared-memory slots), the
  ``transform``, quotas, and the position committed only with what was actually yielded (a batch
  being filled is not yet consumed);
- the **skip report** of ``on_error="skip"`` (:attr:`StreamingDataset.skipped`) and the
  per-patient sample counts, carried from the workers to the main process
  (:meth:`StreamingDataset.epoch_report`, :mod:`bigsmall_torch._engine.reports`), and the slide cache
  shared by the iterations of one process (closed when the last one ends).

A front end implements :meth:`StreamingDataset._stream` (small chunks, setting ``live.cursor`` to the
position after each one when its position is not simply the samples yielded) and, when it keeps
more state, :meth:`_identity` and :meth:`_extra_state`.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch.utils.data import IterableDataset

from .._validate import choice, optional_callable, positive_int
from ..chunks import SmallChunk, WindowRun, image_array
from ..data import Dataset, Patient
from ..errors import ConfigError, DatasetError, SlideError, UnusableSlidesError
from ..io.slide import Backend, SlideCache
from .batch_ring import InlineDict, apply_transform
from .batching import BatchBuilder
from .reports import EpochReport, ReportBox, WorkerReport
from .reservoir import OnError, ReservoirStats
from .sharding import Topology, current_topology, distributed_rank_and_world

__all__ = ["STATE_VERSION", "Live", "StreamingDataset", "check_resume_topology", "to_sample"]

logger = logging.getLogger(__name__)


def _outcome(check: Callable[[Patient], None], patient: Patient) -> BaseException | None:
    """None when ``check(patient)`` passes; the per-slide error it raised otherwise."""
    try:
        check(patient)
    except SlideError as exc:
        return exc
    return None

#: Version of the state schema of :meth:`StreamingDataset.state_dict`.
STATE_VERSION = 2
#: Threads that check slides at construction (opening a header is mostly waiting on the disk).
CHECK_THREADS = 8


def loader_workers() -> int:
    """The DataLoader's ``num_workers`` as the user gave it (0 in the main process)."""
    info = torch.utils.data.get_worker_info()
    return 0 if info is None else info.num_workers


def check_resume_topology(what: str, saved: Mapping[str, Any], current: Mapping[str, Any]) -> None:
    """Raise :class:`~bigsmall_torch.ConfigError` when a saved state's version or topology differs
    from the current one (keys ``num_workers``, ``worker``, ``rank``, ``world_size``, ``batch_size``,
    and the front end's identity keys)."""
    if saved.get("version") != STATE_VERSION:
        raise ConfigError(
            f"{what}: state version {saved.get('version')!r} is not {STATE_VERSION} (a state saved by "
            "another version of bigsmall_torch; start the epoch afresh)"
        )
    for key, value in current.items():
        if saved.get(key) != value:
            raise ConfigError(
                f"{what}: cannot resume with {key}={value!r}: the state was saved with "
                f"{key}={saved.get(key)!r}; resume with the same DataLoader num_workers, batch_size, "
                "rank and world size (or start the epoch afresh without load_state_dict)"
            )


def to_sample(small: SmallChunk) -> dict[str, Any]:
    """The sample dict of a small chunk: ``image`` as a CHW tensor (a view, no copy, dtype kept),
    the patient id, its label when set, and every entry of the small chunk's ``info``."""
    image = torch.from_numpy(image_array(small))
    if image.ndim == 3:
        image = image.permute(2, 0, 1)
    sample: dict[str, Any] = InlineDict(image=image, patient_id=small.patient.id)
    if small.patient.label is not None:
        sample["label"] = small.patient.label
    sample.update(small.info)
    return sample


@dataclass
class Live:
    """The running iteration of one process (what :meth:`StreamingDataset.state_dict` reads)."""

    epoch: int
    topology: dict[str, Any]
    yielded: int = 0  # samples handed out
    position: int = 0  # the stream position committed with the last output
    cursor: int = 0  # the position after the last small chunk drawn (set by the front end)
    finished: bool = False
    skipped: list[tuple[str, str]] = field(default_factory=list)
    samples: Counter[Any] = field(default_factory=Counter)  # per patient id, this iteration
    reported: int = -1  # len(skipped) when the last report was written
    extra: Any = None  # the front end's (e.g. the reservoir)
    pid: int = field(default_factory=os.getpid)  # a forked worker ignores its parent's iteration
    started: int = field(default_factory=time.time_ns)  # orders the iterations' reports


class StreamingDataset(IterableDataset[Any]):
    """Base of the package's iterable datasets (see the module docstring); not used directly."""

    #: Names the front end in messages and in its states.
    kind: ClassVar[str] = "StreamingDataset"
    #: Batched mode stores images ``n, H, W, C`` (torch's channels_last) instead of ``n, C, H, W``.
    _channels_last: bool = False

    def _setup_stream(
        self,
        *,
        batch_size: int | None,
        transform: Callable[[torch.Tensor], Any] | None,
        on_error: str | OnError,
        backend: str | Backend,
        max_open_slides: int,
        decode_threads: int,
        rank: int | None,
        world_size: int | None,
    ) -> None:
        """Check and keep the arguments every front end shares."""
        kind = self.kind
        self.batch_size = None if batch_size is None else positive_int(f"{kind}: batch_size", batch_size)
        self.transform = optional_callable(f"{kind}: transform", transform)
        self.on_error = choice(f"{kind}: on_error", on_error, OnError)
        self.slides = SlideCache(
            positive_int(f"{kind}: max_open_slides", max_open_slides),
            backend=backend,
            decode_threads=positive_int(f"{kind}: decode_threads", decode_threads),
        )
        for name, value, minimum in (("rank", rank, 0), ("world_size", world_size, 1)):
            if value is not None:
                positive_int(f"{kind}: {name}", value, minimum=minimum)
        self._explicit_topology = (rank, world_size)
        self.rank, self.world_size = distributed_rank_and_world(rank, world_size)
        self._live: Live | None = None
        self._pending: dict[str, Any] | None = None
        self._refused: dict[Any, str] = {}  # patients left out at construction (on_error="skip")
        self._reports = ReportBox()
        self.last_stats = ReservoirStats()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_live"] = None  # may hold threads: never sent to workers
        return state

    # -- topology --------------------------------------------------------------------------------

    def _refresh_topology(self) -> None:
        """Re-read rank/world size (main process only: workers keep what they were given)."""
        if torch.utils.data.get_worker_info() is None:
            self.rank, self.world_size = distributed_rank_and_world(*self._explicit_topology)

    def topology(self) -> Topology:
        """The (rank, world size, worker, num_workers) of the calling process."""
        return current_topology(self.rank, self.world_size)

    def _topology_state(self, topo: Topology) -> dict[str, Any]:
        return {
            "version": STATE_VERSION, "kind": self.kind, "rank": topo.rank,
            "world_size": topo.world_size, "num_workers": loader_workers(), "worker": topo.worker,
            "batch_size": self.batch_size, **self._identity(),
        }  # fmt: skip

    def _identity(self) -> dict[str, Any]:
        """Front-end settings a state must have been saved under to be resumed (e.g. the seed)."""
        return {}

    # -- state -----------------------------------------------------------------------------------

    @property
    def epoch(self) -> int:
        return 0

    def state_dict(self) -> dict[str, Any]:
        """Where this worker's stream stands, for ``torchdata.stateful_dataloader.StatefulDataLoader``.

        Called in each DataLoader worker (in the main process with ``num_workers=0``) between
        outputs. Before an iteration starts it means "the start of the epoch". Resuming:
        ``StatefulDataLoader.load_state_dict`` passes it back to :meth:`load_state_dict` in a fresh
        process, and the stream goes on as if it had never stopped.
        """
        live = self._live
        if live is not None and live.pid == os.getpid():
            state = dict(live.topology, epoch=live.epoch, samples=live.yielded,
                         position=live.position, finished=live.finished)  # fmt: skip
            state.update(self._extra_state(live))
            return state
        if self._pending is not None:
            return self._pending
        state = dict(self._topology_state(self.topology()), epoch=self.epoch, samples=0, position=0,
                     finished=False)  # fmt: skip
        state.update(self._extra_state(None))
        return state

    def _extra_state(self, live: Live | None) -> dict[str, Any]:
        """The front end's part of the state (``live`` None: the start of the epoch)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume from :meth:`state_dict` at the next iteration (``StatefulDataLoader`` calls it in
        each worker before ``iter``).

        The DataLoader must have the same ``num_workers`` (and the dataset the same ``batch_size``,
        rank, world size and settings) as when the state was saved: a difference raises
        :class:`~bigsmall_torch.ConfigError` naming both values when the iteration starts.
        """
        if not isinstance(state, Mapping) or state.get("kind") != self.kind or "position" not in state:
            got = state.get("kind") if isinstance(state, Mapping) else type(state).__name__
            raise ConfigError(f"load_state_dict: not a {self.kind} state (got {got!r})")
        self._pending = dict(state)
        self._live = None

    def _begin(self) -> tuple[Topology, Live, dict[str, Any] | None]:
        """Start an iteration: the topology, its :class:`Live` record and the loaded state, if any
        (checked against the current topology)."""
        self._refresh_topology()
        topo = self.topology()
        pending, self._pending = self._pending, None
        live = Live(self.epoch, self._topology_state(topo))
        if pending is not None:
            check_resume_topology(self.kind, pending, live.topology)
            live.epoch = int(pending["epoch"])
            live.yielded = int(pending["samples"])
            live.position = live.cursor = int(pending["position"])
            live.finished = bool(pending["finished"])
        self._live = live
        return topo, live, pending

    @property
    def skipped(self) -> dict[Any, str]:
        """What ``on_error="skip"`` left out, with a one-line reason each: the patients refused at
        construction (patient id -> reason), and what the latest iteration of the current epoch
        skipped while streaming (a slide's path, or a window as
        ``"patient 'x' window (row r, col c)"``), in this process or in its DataLoader workers
        (each worker reports a skip as it happens and again when its stream ends; see
        :meth:`epoch_report`)."""
        report = dict(self._refused)
        report.update(self._reports.epoch_report(self.epoch).skipped)
        live = self._live
        if live is not None and live.pid == os.getpid():
            report.update(live.skipped)
        return report

    def epoch_report(self, epoch: int | None = None) -> EpochReport:
        """What the workers of the latest iteration of ``epoch`` (default: the current one)
        reported: samples per patient id, what they skipped while streaming and why, and each
        worker's own report (its samples, skips, loading-thread busy fraction, whether it finished).

        Read in the main process after (or during) an epoch; workers report when they skip and
        when their stream ends, so a finished epoch is complete (``report.complete``). Covers this
        rank's workers (each rank has its own dataset). Construction-time skips are in
        :attr:`skipped`, not here.
        """
        return self._reports.epoch_report(self.epoch if epoch is None else int(epoch))

    def _count(self, live: Live, small: SmallChunk | WindowRun, samples: int = 1) -> None:
        """Count ``samples`` of ``small`` for its patient, and report skips that happened since the
        last report."""
        live.samples[small.patient.id] += samples
        if len(live.skipped) != live.reported:
            self._report(live)

    def _report(self, live: Live, *, busy: float | None = None) -> None:
        """Write this worker's report of ``live`` (see :mod:`bigsmall_torch._engine.reports`)."""
        live.reported = len(live.skipped)
        info = torch.utils.data.get_worker_info()
        topo = live.topology
        self._reports.write(WorkerReport(
            rank=int(topo["rank"]), worker=int(topo["worker"]), num_workers=int(topo["num_workers"]),
            epoch=live.epoch, iteration=None if info is None else int(info.seed) - int(info.id),
            started=live.started, samples=dict(live.samples), skipped=dict(live.skipped),
            busy=busy, finished=live.finished,
        ))  # fmt: skip

    def _refuse_bad_patients(self, dataset: Dataset, check: Callable[[Patient], None]) -> Dataset:
        """Run ``check`` on every patient (threads: slide headers are I/O) and apply ``on_error``:
        ``"raise"``: one bad patient raises its own error, several an
        :class:`~bigsmall_torch.UnusableSlidesError` naming every one; ``"skip"``: the dataset without
        them, each listed in :attr:`skipped`, and one warning. Other exceptions propagate."""
        patients = list(dataset.patients)
        with concurrent.futures.ThreadPoolExecutor(
            max(1, min(CHECK_THREADS, len(patients))), thread_name_prefix="bigsmall-check"
        ) as pool:
            outcomes = list(pool.map(lambda p: _outcome(check, p), patients))
        bad = {p.id: exc for p, exc in zip(patients, outcomes, strict=True) if exc is not None}
        if not bad:
            return dataset
        first = next(iter(bad.values()))
        if self.on_error is OnError.RAISE:
            if len(bad) == 1:
                raise first
            lines = "; ".join(f"{pid!r}: {exc}" for pid, exc in bad.items())
            raise UnusableSlidesError(
                f"{self.kind}: {len(bad)} of {len(patients)} slides cannot be used "
                f"(on_error='skip' would leave them out): {lines}",
                bad,
            ) from first
        good = [p for p in patients if p.id not in bad]
        if not good:
            error = DatasetError(
                f"{self.kind}: every one of the {len(patients)} slides was skipped: "
                + "; ".join(f"{pid!r}: {exc}" for pid, exc in list(bad.items())[:5])
            )
            error.errors = bad  # type: ignore[attr-defined]  # patient id -> its slide's error
            raise error
        self._refused = {pid: str(exc) for pid, exc in bad.items()}
        names = ", ".join(repr(pid) for pid in list(bad)[:5])
        logger.warning(
            "%s: skipping %d of %d slides that cannot be used (%s%s); see .skipped for the reasons",
            self.kind, len(bad), len(patients), names, ", ..." if len(bad) > 5 else "",
        )  # fmt: skip
        return Dataset(dataset.name, good)

    # -- output ----------------------------------------------------------------------------------

    def _emit(self, small: SmallChunk) -> Any:
        """The per-sample output of one small chunk (before the transform)."""
        return to_sample(small)

    def _output(
        self, smalls: Iterator[Any], live: Live, quota: int | None
    ) -> Iterator[Any]:
        """Samples or batches of ``smalls`` (small chunks; in batched mode also
        :class:`~bigsmall_torch.chunks.WindowRun` s) (at most ``quota`` samples), the transform
        applied, the position committed with each output."""
        if self.batch_size is not None:
            yield from self._batches(smalls, live, quota, self.batch_size)
            return
        stats, clock = self.last_stats, time.perf_counter
        for count, small in enumerate(smalls, start=1):
            t0 = clock()
            self._count(live, small)
            sample = self._emit(small)
            t1 = clock()
            if self.transform is not None:
                sample["image"] = self.transform(sample["image"])
            t2 = clock()
            stats.emit_s += t1 - t0
            stats.transform_s += t2 - t1
            live.yielded += 1
            live.position = live.cursor
            last = quota is not None and count >= quota
            live.finished = last
            yield sample
            stats.outside_s += clock() - t2
            if last:
                return

    def _batches(
        self, smalls: Iterator[SmallChunk | WindowRun], live: Live, quota: int | None, batch_size: int
    ) -> Iterator[dict[str, Any]]:
        """Batches of ``smalls``; a :class:`~bigsmall_torch.chunks.WindowRun` among them is taken
        as its samples, as many at a time as the batch has room for (``live.cursor`` moved past
        each part: the run's ``cursor`` plus the samples taken)."""
        builder = BatchBuilder(batch_size, channels_last=self._channels_last)
        stats, clock = self.last_stats, time.perf_counter
        count = 0
        for item in smalls:
            taken, total = 0, len(item) if isinstance(item, WindowRun) else 1
            while taken < total:
                t0 = clock()
                if isinstance(item, WindowRun):
                    room = batch_size - len(builder)
                    part = min(room if quota is None else min(room, quota - count), total - taken)
                    builder.add_run(item, taken, taken + part)
                    live.cursor = item.cursor + taken + part
                else:
                    part = 1
                    builder.add(item)
                self._count(live, item, part)
                taken += part
                count += part
                last = quota is not None and count >= quota
                if len(builder) == batch_size or last:
                    yield from self._flush(builder, live, last, t0)
                else:
                    stats.emit_s += clock() - t0
                if last:
                    return
        if len(builder):  # the stream ended before a quota (e.g. the last windows of a range)
            yield from self._flush(builder, live, False, clock())

    def _flush(self, builder: BatchBuilder, live: Live, last: bool, t0: float) -> Iterator[Any]:
        stats, clock = self.last_stats, time.perf_counter
        batch = builder.build()
        t1 = clock()
        if self.transform is not None:
            apply_transform(batch, self.transform)
        t2 = clock()
        stats.emit_s += t1 - t0
        stats.transform_s += t2 - t1
        live.yielded += len(batch["patient_id"])
        live.position = live.cursor
        live.finished = last
        yield batch
        stats.outside_s += clock() - t2
