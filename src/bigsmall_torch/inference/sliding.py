"""Sliding-window inference: every grid position of every slide exactly once, read block by block.

``SlidingWindowDataset`` lays a grid of windows over each slide (patch size, stride, resolution,
optional tissue filter), orders the windows slide by slide and block by block (a block is a big
chunk: the windows whose union fits in about ``block_size`` pixels), and cuts that order into
contiguous ranges: first one per distributed rank, then one per DataLoader worker. Every window is
emitted exactly once whatever the numbers of ranks and workers, ``len()`` is exact, and each block is
read once (twice where a range boundary cuts it), so each compressed tile is decoded about once,
not once per window.
"""

from __future__ import annotations

import bisect
import concurrent.futures
import functools
import hashlib
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, ClassVar

import numpy as np
import torch

from .._engine.batching import batch_count
from .._engine.reservoir import OnError
from .._engine.sharding import split_evenly
from .._engine.streaming import Live, StreamingDataset
from .._validate import choice, positive_int, size_pair
from ..annotations import patient_regions
from ..chunks import SmallChunk, WindowRun, channel_planar
from ..data import Dataset, Patient
from ..errors import ConfigError, SlideError, SlideOpenError
from ..io._tiles import TiledRegion
from ..io.resolution import (
    DEFAULT_TOLERANCE,
    LevelChoice,
    Resolution,
    extent,
    read_at,
    read_tiled_at,
    to_level0,
)
from ..io.slide import Backend, SlideCache
from ..io.tissue import TissueDetector, _skimage, tissue_mask
from ..loaders import _check_classes

__all__ = ["Edge", "Grid", "SlidingWindowDataset"]

logger = logging.getLogger(__name__)


class Edge(str, Enum):
    """What to do with the last partial row/column of windows.

    ``DROP``: windows must fit inside the slide; a remainder narrower than a stride is not covered.
    ``SHIFT``: add one last window flush with the slide's edge (it overlaps its neighbour).
    ``PAD``: add one last window that sticks out of the slide; its outside is filled with white.
    """

    DROP = "drop"
    SHIFT = "shift"
    PAD = "pad"


def _is_number(value: Any) -> bool:
    """A real number (an int, float or numpy scalar), not a bool or a string."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
        value, (bool, np.bool_)
    )


def _positions(length: int, patch: int, stride: int, edge: Edge) -> np.ndarray:
    last = length - patch
    if last < 0:
        return np.zeros(1, dtype=np.int64) if edge is Edge.PAD else np.zeros(0, dtype=np.int64)
    xs = np.arange(0, last + 1, stride, dtype=np.int64)
    if xs[-1] != last:
        if edge is Edge.SHIFT:
            xs = np.append(xs, last)
        elif edge is Edge.PAD and xs[-1] + stride < length:
            xs = np.append(xs, xs[-1] + stride)
    return xs


@dataclass(frozen=True)
class Grid:
    """The windows of one slide.

    Attributes:
        patient_id, path: which slide.
        choice: the level read and the resampling (see :class:`~bigsmall_torch.LevelChoice`).
        patch_size, stride: ``(width, height)`` in pixels of the asked resolution.
        extent: the slide's ``(width, height)`` in those pixels.
        xs, ys: window top-lefts per column / row, in those pixels.
        include: ``rows x cols`` booleans: which windows are emitted (all, or those on tissue).
        targets: with annotations, ``rows x cols`` class indices at each window's centre pixel
            (-1: no class); else None.
    """

    patient_id: Any
    path: str
    choice: LevelChoice
    patch_size: tuple[int, int]
    stride: tuple[int, int]
    extent: tuple[int, int]
    xs: np.ndarray = field(repr=False)
    ys: np.ndarray = field(repr=False)
    include: np.ndarray = field(repr=False)
    targets: np.ndarray | None = field(default=None, repr=False)
    tile_size: tuple[int, int] | None = None  # of the level read as it is (None: resampled/untiled)

    @property
    def rows(self) -> int:
        return len(self.ys)

    @property
    def cols(self) -> int:
        return len(self.xs)

    @property
    def count(self) -> int:
        """Windows emitted for this slide."""
        return int(self.include.sum())

    def level0(self, row: int, col: int) -> tuple[int, int]:
        """Level-0 ``(x, y)`` of the window at ``(row, col)``."""
        return int(self.xs0[col]), int(self.ys0[row])

    @functools.cached_property
    def xs0(self) -> np.ndarray:
        """Level-0 ``x`` of each column's windows (int64)."""
        return np.array([to_level0(int(x), self.choice.downsample) for x in self.xs], dtype=np.int64)

    @functools.cached_property
    def ys0(self) -> np.ndarray:
        """Level-0 ``y`` of each row's windows (int64)."""
        return np.array([to_level0(int(y), self.choice.downsample) for y in self.ys], dtype=np.int64)

    def geometry(self) -> dict[str, Any]:
        """A JSON-ready description, to map grid cells back to slide coordinates."""
        return {
            "patient_id": self.patient_id,
            "path": self.path,
            "level": self.choice.level,
            "downsample": self.choice.downsample,
            "mpp": None if math.isnan(self.choice.mpp) else self.choice.mpp,
            "patch_size": list(self.patch_size),
            "stride": list(self.stride),
            "extent": list(self.extent),
            "rows": self.rows,
            "cols": self.cols,
            "x0": [to_level0(int(x), self.choice.downsample) for x in self.xs],
            "y0": [to_level0(int(y), self.choice.downsample) for y in self.ys],
        }


def _halves(cells: np.ndarray, lo: int, hi: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """``[lo, hi)`` (``hi - lo >= 2``) cut in two, in order: at the row boundary of ``cells`` (row-major
    ``(row, col)`` pairs) nearest the middle, or in the middle of a single row."""
    mid = lo + (hi - lo) // 2
    bounds = np.flatnonzero(np.diff(cells[lo:hi, 0])) + lo + 1
    if len(bounds):
        mid = int(bounds[np.argmin(np.abs(bounds - mid))])
    return (lo, mid), (mid, hi)


def _aligned(count: int, stride: int, tile: int, total: int) -> int:
    """Windows per block along one axis: the most, up to ``count``, whose span of strides is a
    whole number of tiles (blocks then start on tile edges and no tile is decoded by two blocks),
    when that keeps at least half of ``count``; else ``count`` (also when one block spans all
    ``total`` windows). 224-pixel windows on 256-pixel tiles: 8 per block (7 tiles) rather than 9
    (7.9 tiles: about 23% more tiles decoded)."""
    if tile <= 0 or count >= total:
        return count
    best = next((n for n in range(count, 0, -1) if n * stride % tile == 0), 0)
    return best if best * 2 >= count else count


@dataclass(frozen=True)
class _Block:
    slide: int
    cells: np.ndarray  # (n, 2) row, col of the emitted windows, row-major


@dataclass(frozen=True)
class _Range:
    first: int  # the worker's range starts here (global window order)
    resumed_skips: int  # windows skipped before the state this iteration resumed from


class SlidingWindowDataset(StreamingDataset):
    """Every window of every slide, exactly once across DataLoader workers and distributed ranks.

    Args:
        dataset: the slides (one record per patient is read: ``record_key``).
        patch_size: window width and height (an int or a pair), in pixels of the asked resolution.
        stride: step between windows (an int or a pair); default ``patch_size`` (no overlap).
        level, mpp, magnification, tolerance: the resolution (see :mod:`bigsmall_torch.io.resolution`).
        edge: the last partial row/column (:class:`Edge`): ``"drop"`` (default), ``"shift"``, ``"pad"``.
        tissue_only: emit only windows whose tissue fraction is at least ``min_tissue``.
        block_size: side, in pixels of the asked resolution, of the blocks read at once.
        batch_size: batched mode, as in :class:`~bigsmall_torch.BigSmallDataset` (``len()`` counts
            batches; only the rank's last batch is partial).
        transform: applied in the worker to each ``image`` (batched mode: to the batch tensor).
        on_error: ``"raise"`` (default) or ``"skip"``: a block that fails to read is re-read in
            smaller pieces, down to single windows, so that only the windows whose pixels touch the
            unreadable region are lost; they are logged (patient, rows and columns), not emitted,
            and listed as ``(patient_id, row, col)`` in :attr:`last_skipped` (this iteration's, in
            the process that iterates: a DataLoader worker's own copy when ``num_workers > 0``;
            :meth:`state_dict` counts them as ``skipped``).
        backend, max_open_slides, decode_threads: slide reading, as in
            :class:`~bigsmall_torch.BigSmallDataset`.
        rank, world_size: the distributed position (default: torch.distributed, else 0 and 1).
        annotations: the record key of each patient's annotation file (see
            :mod:`bigsmall_torch.annotations`): only windows sharing area with the regions of
            ``classes`` are emitted (and, with ``tissue_only``, on tissue too), each with
            ``"target"``, the index in ``classes`` of the class at its centre pixel (-1: none), the
            same rule as :class:`~bigsmall_torch.RandomCropCollector`'s. For evaluation on annotated
            slides; a slide whose file has none of ``classes`` follows ``on_error``.
        classes: the class names (required with ``annotations``; a later class wins where regions
            overlap).
        masks: with ``annotations``, add ``"mask"``: the window's ``[H, W]`` uint8 labels (0: none,
            ``k + 1``: ``classes[k]``), pixel for pixel with ``"image"``.
        memory_format: of batched mode's ``[n, C, H, W]`` images: ``torch.contiguous_format``
            (default) or ``torch.channels_last`` (stored ``n, H, W, C``: blocks stay as the
            decoder writes them, which saves a transpose of every pixel; what convolutional
            networks prefer on a GPU, and what :func:`~bigsmall_torch.extract_features` uses).

    Samples carry ``image``, ``patient_id``, level-0 ``x``/``y``, ``level``, ``mpp``, ``row`` and ``col``.
    """

    kind: ClassVar[str] = "SlidingWindowDataset"

    def __init__(
        self,
        dataset: Dataset,
        patch_size: int | tuple[int, int] = 224,
        stride: int | tuple[int, int] | None = None,
        *,
        level: int | None = None,
        mpp: float | None = None,
        magnification: float | None = None,
        tolerance: float = DEFAULT_TOLERANCE,
        edge: str | Edge = "drop",
        tissue_only: bool = False,
        min_tissue: float = 0.5,
        tissue_detector: TissueDetector | None = None,
        record_key: str = "wsi",
        block_size: int = 2048,
        batch_size: int | None = None,
        transform: Callable[[torch.Tensor], Any] | None = None,
        on_error: str | OnError = "raise",
        backend: str | Backend = "auto",
        max_open_slides: int = 16,
        decode_threads: int = 2,
        rank: int | None = None,
        world_size: int | None = None,
        annotations: str | None = None,
        classes: Sequence[str] | None = None,
        masks: bool = False,
        memory_format: torch.memory_format = torch.contiguous_format,
    ) -> None:
        super().__init__()
        self.annotations, self.classes = _check_classes("SlidingWindowDataset", annotations, classes)
        if not isinstance(masks, bool) or (masks and self.annotations is None):
            raise ConfigError(
                f"SlidingWindowDataset: masks must be True or False, and True needs annotations=; got {masks!r}"
            )
        self.masks = masks
        if not isinstance(dataset, Dataset) or len(dataset) == 0:
            raise ConfigError(
                f"dataset must be a non-empty bigsmall_torch.Dataset, got {dataset!r}"
            )
        self.dataset = dataset
        self.patch_size = size_pair("SlidingWindowDataset: patch_size", patch_size)
        self.stride = (
            self.patch_size if stride is None else size_pair("SlidingWindowDataset: stride", stride)
        )
        if not _is_number(tolerance) or not 0 <= tolerance < 1:
            raise ConfigError(
                f"SlidingWindowDataset: tolerance must be a number in [0, 1), got {tolerance!r}"
            )
        self.resolution = Resolution.from_args(
            "SlidingWindowDataset",
            level=level,
            mpp=mpp,
            magnification=magnification,
            tolerance=float(tolerance),
        )
        self.edge = choice("edge", edge, Edge)
        if not isinstance(tissue_only, (bool, np.bool_)):
            raise ConfigError(
                f"SlidingWindowDataset: tissue_only must be True or False, got {tissue_only!r}"
            )
        if not _is_number(min_tissue) or not 0 <= min_tissue <= 1:
            raise ConfigError(
                f"SlidingWindowDataset: min_tissue must be a number in [0, 1], got {min_tissue!r}"
            )
        self.tissue_only, self.min_tissue = bool(tissue_only), float(min_tissue)
        if tissue_detector is not None and not isinstance(tissue_detector, TissueDetector):
            raise ConfigError(
                f"SlidingWindowDataset: tissue_detector must be a TissueDetector or None, got {tissue_detector!r}"
            )
        self.tissue_detector = tissue_detector or TissueDetector()
        if self.tissue_only:
            _skimage()
        if not isinstance(record_key, str):
            raise ConfigError(f"SlidingWindowDataset: record_key must be a str, got {record_key!r}")
        self.record_key = record_key
        self.block_size = positive_int("block_size", block_size)
        self._setup_stream(
            batch_size=batch_size, transform=transform, on_error=on_error, backend=backend,
            max_open_slides=max_open_slides, decode_threads=decode_threads, rank=rank,
            world_size=world_size,
        )  # fmt: skip
        if memory_format not in (torch.contiguous_format, torch.channels_last) or (
            memory_format is torch.channels_last and self.batch_size is None
        ):
            raise ConfigError(
                "SlidingWindowDataset: memory_format must be torch.contiguous_format or "
                "torch.channels_last, the latter with batch_size (it is a layout of [n, C, H, W] "
                f"batches); got {memory_format!r} with batch_size={self.batch_size!r}"
            )
        self.memory_format = memory_format
        self._channels_last = memory_format is torch.channels_last
        self.grids = self._make_grids()
        self._blocks = [b for i, g in enumerate(self.grids) for b in self._slide_blocks(i, g)]
        sizes = np.array([len(b.cells) for b in self._blocks], dtype=np.int64)
        self._offsets = np.concatenate([[0], np.cumsum(sizes)])
        digest = hashlib.sha1(self._offsets.tobytes(), usedforsecurity=False)
        for grid in self.grids:
            geometry = (grid.patch_size, grid.stride, grid.choice.level, grid.choice.downsample)
            digest.update(repr(geometry).encode() + grid.xs.tobytes() + grid.ys.tobytes())
        for block in self._blocks:
            digest.update(block.slide.to_bytes(8, "little") + block.cells.tobytes())
        self._layout = digest.hexdigest()[:16]  # the window order, for resume checks
        #: ``(patient_id, row, col)`` of the windows ``on_error="skip"`` lost in this process's
        #: latest iteration (a DataLoader worker's own copy when ``num_workers > 0``).
        self.last_skipped: list[tuple[Any, int, int]] = []
        self._skipped_at: list[int] = []  # their indices in the global order, ascending

    # -- the grid --------------------------------------------------------------------------------

    def _make_grids(self) -> list[Grid]:
        """The grid of every slide, built in threads; a slide that cannot be opened, lacks the
        asked resolution or is smaller than the patch (without ``edge="pad"``) follows ``on_error``
        (see :meth:`~bigsmall_torch._engine.streaming.StreamingDataset._refuse_bad_patients`)."""
        probe = SlideCache(16, backend=self.slides.backend, decode_threads=1)
        grids: dict[Any, Grid] = {}

        def build(patient: Patient) -> None:
            grids[patient.id] = self._grid(patient, probe)

        try:
            self.dataset = self._refuse_bad_patients(self.dataset, build)
        finally:
            probe.close()
        return [grids[patient.id] for patient in self.dataset.patients]

    def _grid(self, patient: Patient, slides: SlideCache) -> Grid:
        record = patient.record(self.record_key)
        reader = slides.get(record.path, mpp=record.info.get("mpp"))
        choice = self.resolution.choose(reader.info)
        width, height = extent(reader.info, choice)
        (pw, ph), (sx, sy) = self.patch_size, self.stride
        if self.edge is not Edge.PAD and (pw > width or ph > height):
            raise SlideError(
                reader.info.path,
                f"is {width}x{height} pixels at {self.resolution.describe()}, smaller than "
                f"patch_size={pw}x{ph}; use edge='pad' or a smaller patch",
            )
        xs, ys = _positions(width, pw, sx, self.edge), _positions(height, ph, sy, self.edge)
        include = np.ones((len(ys), len(xs)), dtype=bool)
        targets = None
        if self.annotations is not None:
            ds = choice.downsample
            regions = patient_regions(patient.record(self.annotations), self.classes, reader)
            gx, gy = np.meshgrid(xs * ds, ys * ds)
            include &= regions.overlaps(gx, gy, pw * ds, ph * ds)
            targets = regions.labels_at(gx + (pw // 2 + 0.5) * ds, gy + (ph // 2 + 0.5) * ds)
        if self.tissue_only:
            mask = tissue_mask(reader, detector=self.tissue_detector)
            ds = choice.downsample
            for r, y in enumerate(ys):
                for c, x in enumerate(xs):
                    include[r, c] = (
                        mask.fraction_in(x * ds, y * ds, pw * ds, ph * ds) >= self.min_tissue
                    )
        tile = None if choice.resampled else reader.info.tile_size
        return Grid(patient.id, str(reader.info.path), choice, (pw, ph), (sx, sy),
                    (width, height), xs, ys, include, targets, tile)  # fmt: skip

    def _slide_blocks(self, slide: int, grid: Grid) -> list[_Block]:
        (pw, ph), (sx, sy) = grid.patch_size, grid.stride
        tile = grid.tile_size or (0, 0)
        per_col = _aligned(max(1, (self.block_size - pw) // sx + 1), sx, tile[0], grid.cols)
        per_row = _aligned(max(1, (self.block_size - ph) // sy + 1), sy, tile[1], grid.rows)
        blocks = []
        for r0 in range(0, grid.rows, per_row):
            for c0 in range(0, grid.cols, per_col):
                sub = grid.include[r0 : r0 + per_row, c0 : c0 + per_col]
                rows, cols = np.nonzero(sub)
                if len(rows):
                    blocks.append(_Block(slide, np.stack([rows + r0, cols + c0], axis=1)))
        return blocks

    def grid(self, patient_id: Any) -> Grid:
        """The grid of ``patient_id``'s slide (available before iterating)."""
        for grid in self.grids:
            if grid.patient_id == patient_id:
                return grid
        raise ConfigError(f"unknown patient id {patient_id!r}")

    @property
    def total_windows(self) -> int:
        """Windows of all slides (all ranks)."""
        return int(self._offsets[-1])

    # -- splitting the work ----------------------------------------------------------------------

    def rank_range(self, rank: int, world_size: int) -> tuple[int, int]:
        """The windows ``[start, stop)`` (in the global order) of ``rank``."""
        total = self.total_windows
        start = sum(split_evenly(total, world_size, r) for r in range(rank))
        return start, start + split_evenly(total, world_size, rank)

    def worker_range(
        self, rank: int, world_size: int, worker: int, num_workers: int
    ) -> tuple[int, int]:
        """The windows ``[start, stop)`` of one worker of one rank (whole batches in batched mode)."""
        start, stop = self.rank_range(rank, world_size)
        unit = self.batch_size or 1
        units = batch_count(stop - start, unit)
        first = sum(split_evenly(units, num_workers, w) for w in range(worker))
        mine = split_evenly(units, num_workers, worker)
        return min(start + first * unit, stop), min(start + (first + mine) * unit, stop)

    def __len__(self) -> int:
        """Windows (batched mode: batches) of this rank."""
        self._refresh_topology()
        start, stop = self.rank_range(self.rank, self.world_size)
        return (
            stop - start if self.batch_size is None else batch_count(stop - start, self.batch_size)
        )

    # -- reading ---------------------------------------------------------------------------------

    def _read_block(self, block: _Block, cells: np.ndarray) -> tuple[np.ndarray | TiledRegion, int, int]:
        """The pixels covering ``cells`` of ``block`` (white outside the slide), and their top-left.

        In batched mode, a block inside the slide on a level the tile fast path reads comes as a
        :class:`~bigsmall_torch.io._tiles.TiledRegion`: the batch builder copies each window from
        the tiles as decoded, instead of the tiles being copied into a block first (one copy of
        every pixel less)."""
        grid = self.grids[block.slide]
        (pw, ph), (width, height) = grid.patch_size, grid.extent
        x0, y0 = int(grid.xs[cells[:, 1].min()]), int(grid.ys[cells[:, 0].min()])
        x1, y1 = int(grid.xs[cells[:, 1].max()]) + pw, int(grid.ys[cells[:, 0].max()]) + ph
        reader = self.slides.get(grid.path)
        inside_w, inside_h = min(x1, width) - x0, min(y1, height) - y0
        if self.batch_size is not None and (inside_w, inside_h) == (x1 - x0, y1 - y0):
            tiled = read_tiled_at(reader, grid.choice, x0, y0, inside_w, inside_h)
            if tiled is not None:
                return tiled, x0, y0
        planar = not self._channels_last  # channels-last batches copy HWC windows as they are
        data = read_at(reader, grid.choice, x0, y0, inside_w, inside_h, planar=planar)
        if (inside_w, inside_h) != (x1 - x0, y1 - y0):
            padded = np.full((y1 - y0, x1 - x0, data.shape[2]), 255, dtype=data.dtype)
            padded[:inside_h, :inside_w] = data
            data = padded
        return (channel_planar(data) if planar else data), x0, y0

    def _windows(self, start: int, stop: int) -> Iterator[tuple[int, WindowRun]]:
        """The windows ``[start, stop)`` as runs of consecutive windows of one block, each with the
        index of its first window in the global order, reading each block once (the next one in the
        background) and skipping what cannot be read when ``on_error`` says so."""
        first = int(np.searchsorted(self._offsets, start, side="right")) - 1
        work = []  # (block, cells to emit, global index of the first of them)
        for index in range(max(first, 0), len(self._blocks)):
            lo, hi = int(self._offsets[index]), int(self._offsets[index + 1])
            if lo >= stop:
                break
            block, begin = self._blocks[index], max(start, lo)
            work.append((block, block.cells[begin - lo : min(stop, hi) - lo], begin))
        with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="bigsmall-window") as pool:
            future = pool.submit(self._read_block, *work[0][:2]) if work else None
            for i, (block, cells, base) in enumerate(work):
                assert future is not None
                try:
                    pieces = [(0, cells, future.result())]
                except SlideError as exc:
                    if self.on_error is OnError.RAISE:
                        raise
                    # the pool is idle while salvaging: one thread reads the slide at a time
                    pieces = self._salvage(block, cells, base, exc)
                future = (
                    pool.submit(self._read_block, *work[i + 1][:2]) if i + 1 < len(work) else None
                )
                for offset, part, (data, x0, y0) in pieces:
                    yield base + offset, self._run(block, part, data, x0, y0)

    def _salvage(
        self, block: _Block, cells: np.ndarray, base: int, exc: SlideError
    ) -> list[tuple[int, np.ndarray, tuple[np.ndarray | TiledRegion, int, int]]]:
        """Re-read ``cells`` (whose read raised ``exc``) in halves, recursively down to single windows,
        so that only the windows whose pixels touch the unreadable region are lost.

        Returns the pieces read, in order, as ``(offset in cells, their cells, _read_block's result)``;
        the lost windows are logged and added to :attr:`SlidingWindowDataset.last_skipped`.
        """
        pieces: list[tuple[int, np.ndarray, tuple[np.ndarray | TiledRegion, int, int]]] = []
        lost: list[int] = []  # offsets into cells
        errors = [exc]

        def split(lo: int, hi: int) -> None:  # cells[lo:hi] failed to read
            if hi - lo == 1 or isinstance(errors[-1], SlideOpenError):  # no smaller piece helps
                lost.extend(range(lo, hi))
                return
            for a, b in _halves(cells, lo, hi):
                try:
                    pieces.append((a, cells[a:b], self._read_block(block, cells[a:b])))
                except SlideError as err:
                    errors.append(err)
                    split(a, b)

        split(0, len(cells))
        grid, gone = self.grids[block.slide], cells[lost]
        self.last_skipped += [(grid.patient_id, int(r), int(c)) for r, c in gone]
        self._skipped_at += [base + i for i in lost]
        if self._live is not None:  # the core's skip report of this iteration
            reason = str(errors[-1])
            self._live.skipped += [
                (f"patient {grid.patient_id!r} window (row {r}, col {c})", reason) for r, c in gone
            ]
        if lost:
            self._report_skip(block, len(cells), gone, errors[-1])
        else:  # the failure did not repeat
            logger.info("re-read %d windows in pieces after: %s", len(cells), str(exc))
        return pieces

    def _report_skip(self, block: _Block, tried: int, cells: np.ndarray, exc: SlideError) -> None:
        grid = self.grids[block.slide]
        logger.warning(
            "skipping %d windows of patient %r (rows %d-%d, cols %d-%d; the other %d windows of the "
            "block were read): %s",
            len(cells),
            grid.patient_id,
            cells[:, 0].min(),
            cells[:, 0].max(),
            cells[:, 1].min(),
            cells[:, 1].max(),
            tried - len(cells),
            str(exc),  # not exc: a record keeping it would keep its frames alive
        )

    def _run(
        self, block: _Block, cells: np.ndarray, data: np.ndarray | TiledRegion, x0: int, y0: int
    ) -> WindowRun:
        """The windows ``cells`` of ``data`` (the pixels of ``block`` from ``(x0, y0)``)."""
        grid = self.grids[block.slide]
        patient: Patient = self.dataset.patients[block.slide]
        ds = grid.choice.downsample
        rows, cols = cells[:, 0], cells[:, 1]
        info: dict[str, Any] = {
            "x": grid.xs0[cols], "y": grid.ys0[rows], "level": grid.choice.level,
            "mpp": grid.choice.mpp, "row": rows.astype(np.int64), "col": cols.astype(np.int64),
        }  # fmt: skip
        if grid.targets is not None:
            info["target"] = grid.targets[rows, cols].astype(np.int64)
        labels = None
        if self.masks:
            reader = self.slides.get(grid.path)
            regions = patient_regions(patient.record(self.annotations or ""), self.classes, reader)
            labels = regions.rasterize(x0 * ds, y0 * ds, data.shape[1], data.shape[0], ds)
        return WindowRun(
            data, grid.ys[rows] - y0, grid.xs[cols] - x0, grid.patch_size, info,
            {"x": to_level0(x0, ds), "y": to_level0(y0, ds)}, patient, labels,
        )  # fmt: skip

    # -- the stream (the core does state, output and topology) ---------------------------------

    def _identity(self) -> dict[str, Any]:
        """The windows and their order: a state saved over another grid (patch size, stride,
        resolution, tissue filter, block size) is refused even when the totals agree."""
        return {"total_windows": self.total_windows, "layout": self._layout}

    def _extra_state(self, live: Live | None) -> dict[str, Any]:
        """``skipped``: the windows of the worker's range that ``on_error="skip"`` lost before
        ``position`` (``position`` counts them: resuming never repeats nor loses a window)."""
        if live is None or not isinstance(live.extra, _Range):
            return {"skipped": 0}
        span = live.extra
        return {
            "skipped": span.resumed_skips
            + bisect.bisect_left(self._skipped_at, span.first + live.position)
        }

    def __iter__(self) -> Iterator[Any]:
        # Not a generator: the iteration's state exists as soon as iter() returns (torchdata's
        # StatefulDataLoader calls state_dict() right after iter() in each worker).
        topo, live, pending = self._begin()
        first, stop = self.worker_range(topo.rank, topo.world_size, topo.worker, topo.num_workers)
        live.extra = _Range(first, 0 if pending is None else int(pending.get("skipped", 0)))
        self.last_skipped, self._skipped_at = [], []
        return self._stream(min(first + live.position, stop), stop, first, live)

    def _stream(self, start: int, stop: int, first: int, live: Live) -> Iterator[Any]:
        self.slides.acquire()
        try:
            yield from self._output(self._positioned(start, stop, first, live), live, None)
            live.position = live.cursor = stop - first  # trailing skipped windows included
            live.finished = True
        finally:
            self.slides.release()
            self._report(live)

    def _positioned(
        self, start: int, stop: int, first: int, live: Live
    ) -> Iterator[SmallChunk | WindowRun]:
        """The windows ``[start, stop)``, moving ``live.cursor`` (the worker's position: windows
        yielded or skipped) past each: per-sample mode, one small chunk at a time; batched mode, as
        runs (the core moves the cursor as it takes their windows)."""
        for index, run in self._windows(start, stop):
            if self.batch_size is not None:
                run.cursor = index - first
                yield run
                continue
            for k in range(len(run)):
                live.cursor = index + k + 1 - first
                yield run.small(k)

    def __repr__(self) -> str:
        return (
            f"SlidingWindowDataset(slides={len(self.grids)}, windows={self.total_windows}, "
            f"patch_size={self.patch_size}, stride={self.stride}, {self.resolution.describe()}, "
            f"edge={self.edge.value!r}, tissue_only={self.tissue_only}"
            + (f", annotations={self.annotations!r}, classes={list(self.classes)})" if self.annotations else ")")
        )
