"""The reservoir engine: a worker's resident big chunks, refilled by a background loading thread.

One :class:`Reservoir` runs per DataLoader worker (or in the main process with ``num_workers=0``).
A background thread asks the loader for the next big chunks, in an order fixed by a seeded scheduler,
and hands them over through a bounded queue; the consuming thread keeps ``buffer_size`` chunks resident
and draws every small chunk from a randomly chosen resident chunk. The chunk order and every random
draw depend only on the seeds, never on timing, so equal seeds give equal streams.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import numpy as np

from ._sharding import RESERVOIR, derive_seed
from .chunks import BigChunk, BigChunkLoader, ChunkContext, SmallChunk, SmallChunkCollector
from .data import Patient
from .errors import ExtractorError, SlideError, StreamError
from .slide import SlideCache

__all__ = ["OnError", "Reservoir", "ReservoirStats"]

logger = logging.getLogger(__name__)

_POLL_S = 0.1  # how often blocked threads look at the stop flag


class OnError(str, Enum):
    """What to do when a slide cannot be read while streaming."""

    RAISE = "raise"
    SKIP = "skip"


@dataclass
class ReservoirStats:
    """Counters of one reservoir (one worker)."""

    chunks_loaded: int = 0
    chunks_retired: int = 0
    samples: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path or patient, reason)


@dataclass
class _Failure:
    error: BaseException


class _Done:
    pass


@dataclass
class _Owned:
    """A patient this reservoir owns, with the part of it (see :func:`assign_shards`)."""

    patient: Patient
    part: tuple[int, int]
    visits: int = 0
    skipped: bool = False


class _LoaderThread(threading.Thread):
    """Loads big chunks in scheduler order and puts them into a bounded queue."""

    def __init__(self, reservoir: Reservoir) -> None:
        super().__init__(name="bigsmall-loader", daemon=True)
        self.r = reservoir
        self.out: queue.Queue[BigChunk | _Failure | _Done] = queue.Queue(maxsize=reservoir.prefetch)
        self.stop = threading.Event()

    def _put(self, item: BigChunk | _Failure | _Done) -> bool:
        while not self.stop.is_set():
            try:
                self.out.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def _next_owned(self) -> _Owned | None:
        """Least-visited patient first, ties broken at random (every patient is visited early and evenly)."""
        live = [o for o in self.r.owned if not o.skipped]
        if not live:
            return None
        fewest = min(o.visits for o in live)
        candidates = [o for o in live if o.visits == fewest]
        return candidates[int(self.r.loader_rng.integers(len(candidates)))]

    def run(self) -> None:
        r = self.r
        empty_in_a_row = 0
        try:
            while not self.stop.is_set():
                owned = self._next_owned()
                if owned is None:
                    raise StreamError(
                        f"every patient of this worker's shard was skipped after read errors: "
                        f"{[s for s, _ in r.stats.skipped]}"
                    )
                owned.visits += 1
                ctx = r.context(owned.patient, owned.part, r.loader_rng)
                try:
                    chunk = r.loader.extract_bigchunk(owned.patient, ctx)
                except SlideError as exc:
                    if r.on_error is OnError.RAISE:
                        raise
                    owned.skipped = True
                    r.stats.skipped.append((str(exc.path), exc.reason))
                    logger.warning(
                        "skipping patient %r: %s (%d slide(s) skipped so far in this worker)",
                        owned.patient.id, exc, len(r.stats.skipped),
                    )
                    continue
                if chunk is None:
                    empty_in_a_row += 1
                    if empty_in_a_row >= 2 * len(r.owned) + 8:
                        raise StreamError(
                            f"{type(r.loader).__name__} returned no big chunk for {empty_in_a_row} "
                            f"requests in a row (patients {[o.patient.id for o in r.owned][:10]}...)"
                        )
                    continue
                if not isinstance(chunk, BigChunk):
                    raise ExtractorError(
                        f"{type(r.loader).__name__}.extract_bigchunk must return a BigChunk or None, "
                        f"got {type(chunk).__name__}"
                    )
                empty_in_a_row = 0
                r.stats.chunks_loaded += 1
                if not self._put(chunk):
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
        messages: Any = None,
    ) -> None:
        self.owned = [_Owned(p, part) for p, part in owned]
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
        self.messages = messages
        self.stats = ReservoirStats()
        self._thread: _LoaderThread | None = None

    def context(
        self, patient: Patient, part: tuple[int, int], rng: np.random.Generator
    ) -> ChunkContext:
        message = self.messages.get(patient.id) if self.messages is not None else None
        state = self.states.setdefault(patient.id, {})
        return ChunkContext(rng=rng, state=state, slides=self.slides, part=part, message=message)

    def _take(self, thread: _LoaderThread) -> BigChunk:
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

    def stream(self) -> Generator[SmallChunk, None, None]:
        """Small chunks, endlessly; closing the iterator stops the loading thread."""
        thread = _LoaderThread(self)
        self._thread = thread
        thread.start()
        try:
            yield from self._draw(thread)
        finally:
            self.close()

    def _draw(self, thread: _LoaderThread) -> Iterator[SmallChunk]:
        rng = self.collector_rng
        resident = [self._take(thread) for _ in range(self.buffer_size)]
        counts = [0] * self.buffer_size
        contexts = [self._chunk_context(c) for c in resident]
        empty_in_a_row = 0
        limit = self.smallchunks_per_bigchunk
        while True:
            slot = int(rng.integers(self.buffer_size))
            chunk = resident[slot]
            small = self.collector.extract_smallchunk(counts[slot], chunk, contexts[slot])
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
                counts[slot] = 0
                contexts[slot] = self._chunk_context(resident[slot])

    def _chunk_context(self, chunk: BigChunk) -> ChunkContext:
        owned = next((o for o in self.owned if o.patient is chunk.patient), None)
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
