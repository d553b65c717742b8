"""The reservoir engine: a worker's resident big chunks, refilled by a background loading thread.

One :class:`Reservoir` runs per DataLoader worker (or in the main process with ``num_workers=0``).
A background thread asks the loader for the next big chunks, in an order fixed by a seeded scheduler,
and hands them over through a bounded queue; the consuming thread keeps ``buffer_size`` chunks resident
and draws every small chunk from a randomly chosen resident chunk. The chunk order and every random
draw depend only on the seeds, never on timing, so equal seeds give equal streams.

Resuming: every big chunk travels with its *recipe* (which candidate, and the loader generator's
state just before it was read) and a snapshot of the loading thread taken right after it was read.
:meth:`Reservoir.state` records the recipes of the resident chunks, how many samples each gave, the
collector generator and the snapshot of the last chunk taken; :meth:`Reservoir.stream` given that
state re-reads the resident chunks from their recipes and restarts the loading thread from the
snapshot, so the stream goes on exactly as if it had never stopped.
"""

from __future__ import annotations

import logging
import pickle
import queue
import threading
import time
from collections.abc import Collection, Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import numpy as np

from ..chunks import BigChunk, BigChunkLoader, ChunkContext, SmallChunk, SmallChunkCollector
from ..data import Patient
from ..errors import ExtractorError, SlideError, StreamError
from ..io.slide import SlideCache
from ..schedulers import Candidate, LeastVisitedScheduler, Scheduler
from .messages import MessageBoard
from .sharding import RESERVOIR, derive_seed

__all__ = ["OnError", "Reservoir", "ReservoirStats"]

RngState = Mapping[str, Any]  # ``numpy.random.Generator.bit_generator.state``

logger = logging.getLogger(__name__)

_POLL_S = 0.1  # how often blocked threads look at the stop flag


class OnError(str, Enum):
    """What to do when a slide cannot be read while streaming."""

    RAISE = "raise"
    SKIP = "skip"


@dataclass
class ReservoirStats:
    """Counters and timings (seconds) of one reservoir (one worker).

    ``load_s`` is spent in the loading thread (in ``extract_bigchunk``: reading and decoding big
    chunks), concurrently with the rest; ``wait_s`` is the consuming thread blocked for a big chunk
    (starvation); ``collect_s`` is in ``extract_smallchunk`` (crops); ``emit_s`` turns small chunks into
    samples or batch rows (the copy in batched mode); ``transform_s`` runs the transform;
    ``outside_s`` is the time between two samples spent outside the dataset (``default_collate``,
    sending to the main process, and in ``num_workers=0`` the caller's own work); ``elapsed_s`` the
    stream's wall time, and :attr:`busy_fraction` the loading thread's share of it.
    """

    chunks_loaded: int = 0
    chunks_retired: int = 0
    samples: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path or patient, reason)
    load_s: float = 0.0
    wait_s: float = 0.0
    collect_s: float = 0.0
    emit_s: float = 0.0
    transform_s: float = 0.0
    outside_s: float = 0.0
    elapsed_s: float = 0.0  # wall time of the stream, set when it ends

    @property
    def busy_fraction(self) -> float | None:
        """The share of the stream's wall time the loading thread spent reading and decoding big
        chunks (``load_s / elapsed_s``): near 1, the worker is bound by decoding; low, it mostly
        waits (for the DataLoader to take its output). None before the stream ended."""
        return None if self.elapsed_s <= 0 else min(1.0, self.load_s / self.elapsed_s)

    def breakdown(self) -> dict[str, float]:
        """Seconds per stage (``load_s`` overlaps the others: it runs in the loading thread)."""
        return {
            "load (loading thread)": self.load_s,
            "wait for a big chunk": self.wait_s,
            "crop (collector)": self.collect_s,
            "to sample / batch copy": self.emit_s,
            "transform": self.transform_s,
            "collate + IPC + caller": self.outside_s,
        }


@dataclass
class _Failure:
    error: BaseException


class _Done:
    pass


@dataclass
class _Loaded:
    """A big chunk with what it takes to read it again and to restart the loading thread after it."""

    chunk: BigChunk
    recipe: tuple[int, RngState]  # candidate index, loader generator state before the read
    producer: dict[str, Any]  # the loading thread's snapshot right after the read


def _generator(state: RngState) -> np.random.Generator:
    """A generator whose bit generator has the state ``state``."""
    rng = np.random.default_rng()
    rng.bit_generator.state = state
    return rng


class _LoaderThread(threading.Thread):
    """Loads big chunks in scheduler order and puts them into a bounded queue."""

    def __init__(self, reservoir: Reservoir, resume: dict[str, Any] | None = None) -> None:
        super().__init__(name="bigsmall-loader", daemon=True)
        self.r = reservoir
        self.out: queue.Queue[_Loaded | _Failure | _Done] = queue.Queue(maxsize=reservoir.prefetch)
        self.stop = threading.Event()
        self._initial: list[Candidate] = []
        self._initial_done = False
        self._warned_weights = False
        self.empty_in_a_row = 0
        if resume is not None:
            self._restore(resume)

    def snapshot(self) -> dict[str, Any]:
        """What the loading thread needs to go on from here (plain types and bytes)."""
        r = self.r
        index = {id(c): i for i, c in enumerate(r.candidates)}
        return {
            "loader_rng": r.loader_rng.bit_generator.state,
            "scheduler": pickle.dumps(r.scheduler),
            "candidates": [(c.visits, c.weight) for c in r.candidates],
            "initial": [index[id(c)] for c in self._initial],
            "initial_done": self._initial_done,
            "empty_in_a_row": self.empty_in_a_row,
            "skipped_ids": pickle.dumps(sorted(r.skipped_ids, key=repr)),
            "adopted": r.adopted,
        }

    def _restore(self, snap: dict[str, Any]) -> None:
        r = self.r
        if snap.get("adopted") and not r.adopted:
            r.adopt()
        r.loader_rng.bit_generator.state = snap["loader_rng"]
        r.scheduler = pickle.loads(snap["scheduler"])  # our own checkpoint
        for candidate, (visits, weight) in zip(r.candidates, snap["candidates"], strict=True):
            candidate.visits, candidate.weight = int(visits), float(weight)
        self._initial = [r.candidates[i] for i in snap["initial"]]
        self._initial_done = bool(snap["initial_done"])
        self.empty_in_a_row = int(snap["empty_in_a_row"])
        r.skipped_ids = set(pickle.loads(snap["skipped_ids"])) | r.unusable

    def _put(self, item: _Loaded | _Failure | _Done) -> bool:
        while not self.stop.is_set():
            try:
                self.out.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def _next(self) -> Candidate | None:
        r = self.r
        live = [c for c in r.candidates if not r.is_skipped(c)]
        if not live and r.reserve and not r.adopted:
            r.adopt()
            live = [c for c in r.candidates if not r.is_skipped(c)]
            logger.warning(
                "every patient of this worker's shard was skipped after read errors (%s); its "
                "quota is served from the other %d patients of the cohort",
                ", ".join(repr(pid) for pid in sorted(r.skipped_ids, key=repr)[:5]), len(live),
            )
        if r.board is not None:
            weights = r.board.weights()
            for c in live:
                c.weight = float(weights.get(c.patient.id, r.default_weight(c)))
        if live and not any(c.weight > 0 for c in live):
            # Every patient this worker owns weighs 0: the worker cannot stop mid-epoch (that would
            # shorten it) nor wait (a hang), so it ignores the weights until one is positive.
            if not self._warned_weights:
                logger.warning(
                    "all %d patients of this worker have weight 0; weights ignored in this worker "
                    "until one is positive", len(live),
                )
                self._warned_weights = True
            for c in live:
                c.weight = 1.0
        if not self._initial_done:  # the initial reservoir
            self._initial_done = True
            self._initial = r.scheduler.initial_schedule(live, r.buffer_size, r.loader_rng)[::-1]
        if self._initial:
            return self._initial.pop()
        pick = r.scheduler.schedule(live, r.loader_rng)
        if pick is not None:
            r.scheduler.note(pick, r.buffer_size)
        return pick

    def run(self) -> None:
        r = self.r
        index: dict[int, int] = {}
        try:
            while not self.stop.is_set():
                candidate = self._next()
                if candidate is None:
                    if all(r.is_skipped(c) for c in r.candidates):
                        raise StreamError(
                            f"every patient of this worker's shard was skipped after read errors: "
                            f"{[s for s, _ in r.stats.skipped]}"
                        )
                    raise StreamError(
                        f"{type(r.scheduler).__name__} scheduled no patient (all weights 0?) among "
                        f"{[c.patient.id for c in r.candidates][:10]}"
                    )
                ctx = r.context(candidate.patient, candidate.part, r.loader_rng)
                if len(index) != len(r.candidates):  # the reserve was adopted
                    index = {id(c): i for i, c in enumerate(r.candidates)}
                recipe = (index[id(candidate)], r.loader_rng.bit_generator.state)
                started = time.perf_counter()
                try:
                    chunk = r.loader.extract_bigchunk(candidate.patient, ctx)
                except r.skippable as exc:
                    if r.on_error is OnError.RAISE:
                        raise
                    r.skip(candidate.patient, exc, "loading a big chunk")
                    continue
                if chunk is None:
                    self.empty_in_a_row += 1
                    if self.empty_in_a_row >= 2 * len(r.candidates) + 8:
                        raise StreamError(
                            f"{type(r.loader).__name__} returned no big chunk for {self.empty_in_a_row} "
                            f"requests in a row (patients {[c.patient.id for c in r.candidates][:10]}...)"
                        )
                    continue
                if not isinstance(chunk, BigChunk):
                    raise ExtractorError(
                        f"{type(r.loader).__name__}.extract_bigchunk must return a BigChunk or None, "
                        f"got {type(chunk).__name__}"
                    )
                self.empty_in_a_row = 0
                r.stats.chunks_loaded += 1
                r.stats.load_s += time.perf_counter() - started
                if not self._put(_Loaded(chunk, recipe, self.snapshot())):
                    return
        except BaseException as exc:  # handed to the consumer, which re-raises it
            self._put(_Failure(exc))


class Reservoir:
    """Resident big chunks of one worker and the small-chunk stream drawn from them.

    Args:
        owned: ``(patient, (part, parts))`` pairs this worker owns.
        loader, collector: the user's extractors.
        buffer_size: number of resident big chunks.
        smallchunks_per_bigchunk: a chunk retires after this many samples.
        prefetch: big chunks loaded ahead of need (memory: ``buffer_size + prefetch + 1`` chunks).
        seeds: the (seed, epoch, rank, worker) keys every random draw derives from.
        states: per-patient state dicts (kept by the caller so they survive epochs).
        slides: the worker's open slides.
        on_error: policy for slides that fail to read.
        scheduler: picks the patient of each next big chunk (default least-visited first).
        board: messages and weights from the training loop.
        reserve: the cohort's other patients; with ``on_error="skip"``, when every owned patient
            has been skipped, the worker adopts them (whole slides) to serve the rest of its quota.
        skip_errors: exception types of the user's loader or collector that ``on_error="skip"``
            treats like a slide error (the patient is skipped); :class:`SlideError` always is.
        unusable: ids of patients of ``owned`` or ``reserve`` known to be unusable (refused when the
            dataset resumed from a state saved over a cohort that still had them): never scheduled.
    """

    def __init__(
        self,
        owned: Sequence[tuple[Patient, tuple[int, int]]],
        loader: BigChunkLoader,
        collector: SmallChunkCollector,
        *,
        buffer_size: int,
        smallchunks_per_bigchunk: int,
        prefetch: int,
        seeds: Sequence[int],
        states: dict[Any, dict[str, Any]],
        slides: SlideCache,
        on_error: OnError = OnError.RAISE,
        scheduler: Scheduler | None = None,
        board: MessageBoard | None = None,
        reserve: Sequence[tuple[Patient, tuple[int, int]]] = (),
        skip_errors: tuple[type[Exception], ...] = (),
        unusable: Collection[Any] = (),
    ) -> None:
        self.candidates = [Candidate(p, part=part) for p, part in owned]
        self.reserve = [(p, part) for p, part in reserve]
        self.adopted = False
        self.skip_errors = tuple(skip_errors)
        #: What ``on_error`` handles: slide errors and the user's ``skip_errors``.
        self.skippable: tuple[type[Exception], ...] = (SlideError, *self.skip_errors)
        self._warned_last = False
        self.scheduler = scheduler if scheduler is not None else LeastVisitedScheduler()
        self.board = board
        self.unusable = frozenset(unusable)
        self.skipped_ids: set[Any] = set(self.unusable)
        self.loader = loader
        self.collector = collector
        self.buffer_size = buffer_size
        self.smallchunks_per_bigchunk = smallchunks_per_bigchunk
        self.prefetch = max(1, prefetch)
        loader_seq, collector_seq = derive_seed(RESERVOIR, *seeds).spawn(2)
        self.loader_rng = np.random.default_rng(loader_seq)
        self.collector_rng = np.random.default_rng(collector_seq)
        self.states = states
        self.slides = slides
        self.on_error = on_error
        self.stats = ReservoirStats()
        self._thread: _LoaderThread | None = None
        for c in self.candidates:  # so that the loading thread never adds keys (state() reads it)
            self.states.setdefault(c.patient.id, {})
        # The consumer's position, read by state(): per resident slot its recipe and sample count,
        # and the loading thread's snapshot after the last chunk taken.
        self._recipes: list[tuple[int, RngState]] = []
        self._counts: list[int] = []
        self._producer: dict[str, Any] | None = None
        self._last_recipe: tuple[int, RngState] = (0, {})

    def is_skipped(self, candidate: Candidate) -> bool:
        return candidate.patient.id in self.skipped_ids

    def adopt(self) -> None:
        """Add the reserve (the cohort's other patients) to the candidates, once."""
        owned = {c.patient.id for c in self.candidates}
        for patient, part in self.reserve:
            if patient.id not in owned:
                self.candidates.append(Candidate(patient, part=part))
                self.states.setdefault(patient.id, {})
        self.adopted = True

    def skip(self, patient: Patient, exc: BaseException, where: str) -> None:
        """Leave ``patient`` out for the rest of this stream (``on_error="skip"``), report it, and
        warn when only one patient is left to serve the worker's quota."""
        if patient.id in self.skipped_ids:
            return
        self.skipped_ids.add(patient.id)
        if isinstance(exc, SlideError):
            self.stats.skipped.append((str(exc.path), exc.reason))
        else:
            self.stats.skipped.append((f"patient {patient.id!r}", f"{where}: {type(exc).__name__}: {exc}"))
        logger.warning(  # str(exc): a record keeping exc would keep its frames alive
            "skipping patient %r (%s): %s (%d slide(s) skipped so far in this worker)",
            patient.id, where, str(exc), len(self.stats.skipped),
        )  # fmt: skip
        left = [c for c in self.candidates if not self.is_skipped(c)]
        if len(left) == 1 and len(self.candidates) > 1 and not self._warned_last:
            self._warned_last = True
            logger.warning(
                "patient %r is the only one left in this worker: it now supplies all of the "
                "worker's remaining samples (%d of its %d patients were skipped)",
                left[0].patient.id, len(self.candidates) - 1, len(self.candidates),
            )

    def default_weight(self, candidate: Candidate) -> float:
        weights = getattr(self.scheduler, "weights", None)
        return float(weights.get(candidate.patient.id, 1.0)) if isinstance(weights, dict) else 1.0

    def context(
        self, patient: Patient, part: tuple[int, int], rng: np.random.Generator
    ) -> ChunkContext:
        state = self.states.setdefault(patient.id, {})
        return ChunkContext(
            rng=rng, state=state, slides=self.slides, part=part, board=self.board, patient_id=patient.id
        )

    def state(self) -> dict[str, Any] | None:
        """Where the stream stands (plain types and bytes), or None before the resident chunks are
        loaded. Meaningful between two samples (while the stream is suspended at a ``yield``)."""
        if self._producer is None or len(self._recipes) < self.buffer_size:
            return None
        return {
            "resident": [
                [index, state, count] for (index, state), count in zip(self._recipes, self._counts, strict=True)
            ],
            "producer": self._producer,
            "collector_rng": self.collector_rng.bit_generator.state,
        }

    def _take(self, thread: _LoaderThread) -> BigChunk:
        started = time.perf_counter()
        try:
            loaded = self._wait_for_chunk(thread)
        finally:
            self.stats.wait_s += time.perf_counter() - started
        self._producer = loaded.producer
        self._last_recipe = loaded.recipe
        return loaded.chunk

    def _reread(self, index: int, state: RngState) -> BigChunk:
        """The big chunk of a recipe, read again (same candidate, same generator state)."""
        candidate = self.candidates[index]
        ctx = self.context(candidate.patient, candidate.part, _generator(state))
        chunk = self.loader.extract_bigchunk(candidate.patient, ctx)
        if not isinstance(chunk, BigChunk):
            raise StreamError(
                f"cannot resume: {type(self.loader).__name__} gave {type(chunk).__name__} instead of "
                f"the big chunk of patient {candidate.patient.id!r} it read before"
            )
        return chunk

    def _reread_or_skip(self, index: int, state: RngState) -> BigChunk | None:
        """:meth:`_reread`, or None when the patient is skipped (``on_error="skip"``)."""
        patient = self.candidates[index].patient
        if patient.id in self.skipped_ids:
            return None
        try:
            return self._reread(index, state)
        except self.skippable as exc:
            if self.on_error is OnError.RAISE:
                raise
            self.skip(patient, exc, "re-reading a resumed big chunk")
            return None

    def _wait_for_chunk(self, thread: _LoaderThread) -> _Loaded:
        while True:
            try:
                item = thread.out.get(timeout=_POLL_S)
            except queue.Empty:
                if not thread.is_alive():
                    raise StreamError("the big-chunk loading thread ended unexpectedly") from None
                continue
            if isinstance(item, _Failure):
                raise item.error
            if isinstance(item, _Done):
                raise StreamError("the big-chunk loading thread stopped")
            return item

    def stream(self, resume: dict[str, Any] | None = None) -> Generator[SmallChunk, None, None]:
        """Small chunks, endlessly; closing the iterator stops the loading thread.

        With ``resume`` (a :meth:`state` of a reservoir built with the same arguments) the stream
        goes on exactly where that one stood.
        """
        resident: list[BigChunk] = []
        if resume is not None:
            if len(resume["resident"]) != self.buffer_size:
                raise StreamError(
                    f"cannot resume: the saved state has {len(resume['resident'])} resident chunks, "
                    f"buffer_size is {self.buffer_size}"
                )
            self.collector_rng.bit_generator.state = resume["collector_rng"]
            if resume["producer"].get("adopted"):  # resident chunks may be of adopted patients
                self.adopt()
            for index, state, count in resume["resident"]:
                chunk = self._reread_or_skip(int(index), state)
                if chunk is None:  # its slide is unusable now: a fresh chunk takes the slot
                    continue
                resident.append(chunk)
                self._recipes.append((int(index), state))
                self._counts.append(int(count))
            self._producer = resume["producer"]
        thread = _LoaderThread(self, None if resume is None else resume["producer"])
        self._thread = thread
        thread.start()
        try:
            yield from self._draw(thread, resident)
        finally:
            self.close()

    def _draw(self, thread: _LoaderThread, resident: list[BigChunk]) -> Iterator[SmallChunk]:
        rng = self.collector_rng
        recipes, counts = self._recipes, self._counts
        for _ in range(len(resident), self.buffer_size):
            resident.append(self._take(thread))
            recipes.append(self._last_recipe)
            counts.append(0)
        contexts = [self._chunk_context(c) for c in resident]
        empty_in_a_row = 0
        limit = self.smallchunks_per_bigchunk
        for slot in range(self.buffer_size):  # resumed just after a slot's last sample: retire it
            if counts[slot] >= limit:
                self.stats.chunks_retired += 1
                resident[slot] = self._take(thread)
                recipes[slot], counts[slot] = self._last_recipe, 0
                contexts[slot] = self._chunk_context(resident[slot])
        while True:
            slot = int(rng.integers(self.buffer_size))
            chunk = resident[slot]
            started = time.perf_counter()
            try:
                small = self.collector.extract_smallchunk(counts[slot], chunk, contexts[slot])
            except self.skippable as exc:
                if self.on_error is OnError.RAISE:
                    raise
                self.skip(chunk.patient, exc, "collecting small chunks")
                small = None
                counts[slot] = max(counts[slot], 1)  # retire the chunk; not an empty fresh chunk
            self.stats.collect_s += time.perf_counter() - started
            if small is not None:
                if not isinstance(small, SmallChunk):
                    raise ExtractorError(
                        f"{type(self.collector).__name__}.extract_smallchunk must return a "
                        f"SmallChunk or None, got {type(small).__name__}"
                    )
                counts[slot] += 1
                empty_in_a_row = 0
                self.stats.samples += 1
                yield small
            elif counts[slot] == 0:
                empty_in_a_row += 1
                if empty_in_a_row > 4 * self.buffer_size + 64:
                    raise StreamError(
                        f"{type(self.collector).__name__} gave no small chunk from "
                        f"{empty_in_a_row} fresh big chunks in a row; check that its patch size fits "
                        f"the big chunks (last big chunk: {chunk.info})"
                    )
            if small is None or counts[slot] >= limit:
                self.stats.chunks_retired += 1
                resident[slot] = self._take(thread)
                recipes[slot], counts[slot] = self._last_recipe, 0
                contexts[slot] = self._chunk_context(resident[slot])

    def _chunk_context(self, chunk: BigChunk) -> ChunkContext:
        owned = next((c for c in self.candidates if c.patient is chunk.patient), None)
        part = owned.part if owned is not None else (0, 1)
        return self.context(chunk.patient, part, self.collector_rng)

    def close(self) -> None:
        """Stop the loading thread and wait for it (bounded by one read in flight)."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        thread.stop.set()
        while True:  # drain so a blocked put() sees the stop flag at once
            try:
                thread.out.get_nowait()
            except queue.Empty:
                break
        thread.join()
