"""Stitching model outputs back onto their slides (PyDmed's StreamCollector, done right).

A :class:`Stitcher` takes what a model computed on the windows of a
:class:`~bigsmall_torch.SlidingWindowDataset`, batch by batch, and places each output on its slide's
grid from the batch's ``patient_id``, ``row`` and ``col``:

* ``mode="window"``: one value (``[B]``) or vector (``[B, C]``) per window gives an array
  ``rows x cols`` (``x C``), one cell per window;
* ``mode="dense"``: one map per window (``[B, h, w]`` or ``[B, C, h, w]``; ``h``, ``w`` may be smaller
  than the patch, dividing it) is pasted onto a slide-level canvas of ``extent / (patch / h)`` cells.

Sums and counts are accumulated and divided, so overlapping windows are averaged; cells no window
covered are NaN. Arrays are channels-last. A slide is written as soon as its last window arrives
(``<id>.npy``, ``<id>.coverage.npy``, ``<id>.json`` geometry, ``<id>.png`` heatmap over the thumbnail),
so memory holds only the slides in progress; ``stream_to_disk=True`` keeps even those in memmaps.
:meth:`Stitcher.finish` writes the rest and reports the windows that never arrived.

:meth:`StitchResult.to_geojson` (or :meth:`Stitcher.to_geojson`) sends a thresholded heatmap back to
QuPath: the cells at or above a threshold, merged into level-0 polygons, as GeoJSON annotations.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._validate import positive_int
from ..annotations import _shapely, mask_geometry, write_geojson
from ..errors import ConfigError, MissingWindowsError, SlideError, StitcherClosedError, StitchError
from ..io.slide import Backend
from ..visualize._draw import heatmap_overlay, safe_names, slide_thumbnail
from .sliding import Grid, SlidingWindowDataset

__all__ = ["StitchMode", "StitchResult", "Stitcher"]

logger = logging.getLogger(__name__)

_CHUNK_BYTES = 16 << 20  # rows divided at once when finishing (bounds memory for memmaps)


class StitchMode(str, Enum):
    """``WINDOW``: one value or vector per window. ``DENSE``: one map per window, pasted on a canvas."""

    WINDOW = "window"
    DENSE = "dense"


@dataclass(frozen=True)
class StitchResult:
    """One stitched slide.

    Attributes:
        patient_id: the slide's patient.
        array: ``float32``, channels-last; window mode ``rows x cols [x C]``, dense mode
            ``H x W [x C]``; NaN where nothing was received (a read-only memmap with ``stream_to_disk``).
        coverage: ``int32`` count of the windows averaged into each cell (spatial shape of ``array``).
        missing: ``(n, 2)`` ``(row, col)`` of the included windows that never arrived.
        output_downsample: level-0 pixels per array cell ``(x, y)`` (window mode: per stride step).
        paths: the files written: ``"npy"``, ``"coverage"``, ``"json"``, ``"png"`` (empty without ``out_dir``).
        origin: level-0 ``(x, y)`` of the top-left corner of cell ``(0, 0)``.

    Where a cell lies: with ``(dx, dy) = output_downsample`` and ``(x0, y0) = origin``, cell
    ``(r, c)`` covers the level-0 pixels ``[x0 + c * dx, x0 + (c + 1) * dx) x [y0 + r * dy,
    y0 + (r + 1) * dy)`` (x to the right, y down, from the slide's top-left corner). Dense mode: the
    canvas starts at the slide's corner, ``origin = (0, 0)``. Window mode: a cell is one stride step
    centred on its window, so its centre is the window's centre and overlapping windows
    (``stride < patch``) tile the slide without overlap: ``origin = ((patch - stride) / 2 *
    downsample)`` per axis (negative when ``stride > patch``: the cells then also cover the gaps).
    An ``edge="shift"`` last window, closer to its neighbour than a stride, is still placed one
    stride after it.
    """

    patient_id: Any
    array: np.ndarray = field(repr=False)
    coverage: np.ndarray = field(repr=False)
    missing: np.ndarray = field(repr=False)
    output_downsample: tuple[float, float]
    paths: dict[str, Path] = field(default_factory=dict)
    origin: tuple[float, float] = (0.0, 0.0)

    def to_geojson(
        self,
        path: str | PathLike[str],
        *,
        threshold: float = 0.5,
        class_name: str = "Tumor",
        channel: int = 0,
        color: tuple[int, int, int] | None = None,
    ) -> Path:
        """Write the cells whose value is at least ``threshold`` as QuPath annotations (GeoJSON).

        Adjacent cells are merged: one annotation Feature per connected polygon (holes kept), each
        with QuPath's properties ``{"objectType": "annotation", "classification": {"name":
        class_name, "color": [r, g, b]}}``. Coordinates are level-0 pixels of the slide, origin at
        its top-left corner, x to the right and y down: what QuPath expects of GeoJSON, whatever the
        resolution the model ran at. Each cell keeps its exact level-0 footprint (see the class
        docstring), so edge cells may reach past the slide's edge (``edge="pad"``, or a dense
        canvas rounded up). To see them in QuPath, open the slide and use File > Import objects (or
        drag the file onto the viewer).

        Args:
            path: the file to write (``.geojson``), replaced if it exists.
            threshold: a finite number; a cell counts when its value is ``>= threshold`` (NaN, a cell
                no window covered, never counts).
            class_name: the QuPath classification of the annotations (a non-empty str).
            channel: which channel of a multi-channel array (``0`` when it has no channel axis).
            color: the class's ``(r, g, b)`` (ints 0-255) in QuPath; default: red.

        Returns:
            ``path``. With no cell at or above ``threshold`` the file is an empty FeatureCollection
            and a warning is logged.

        Raises:
            ConfigError: an argument is not allowed (the message names it).
            MissingDependencyError: shapely is not installed (the ``[annotations]`` extra).
        """
        if not isinstance(path, (str, PathLike)):
            raise ConfigError(f"to_geojson: path must be a str or os.PathLike, got {path!r}")
        if (
            isinstance(threshold, (bool, np.bool_))
            or not isinstance(threshold, (int, float, np.integer, np.floating))
            or not math.isfinite(threshold)
        ):
            raise ConfigError(f"to_geojson: threshold must be a finite number, got {threshold!r}")
        if not isinstance(class_name, str) or not class_name.strip():
            raise ConfigError(f"to_geojson: class_name must be a non-empty str, got {class_name!r}")
        channels = self.array.shape[2] if self.array.ndim == 3 else None
        if (
            isinstance(channel, (bool, np.bool_))
            or not isinstance(channel, (int, np.integer))
            or not 0 <= channel < (channels or 1)
        ):
            allowed = f"0..{channels - 1}" if channels else "0 (the array has no channel axis)"
            raise ConfigError(f"to_geojson: channel must be an int in {allowed}, got {channel!r}")
        if color is not None and (
            not isinstance(color, (tuple, list))
            or len(color) != 3
            or not all(
                isinstance(v, (int, np.integer)) and not isinstance(v, bool) and 0 <= v <= 255
                for v in color
            )
        ):
            raise ConfigError(
                f"to_geojson: color must be None or (r, g, b) ints in 0..255, got {color!r}"
            )
        values = self.array if channels is None else self.array[..., int(channel)]
        selected = np.asarray(values) >= threshold  # NaN compares False
        shapely = _shapely()
        (dx, dy), (x0, y0) = self.output_downsample, self.origin
        geometry = shapely.transform(
            mask_geometry(selected, (dx, dy)), lambda xy: xy + np.array([x0, y0])
        )
        if geometry.is_empty:
            logger.warning(
                "patient %r: no cell of channel %d is >= %g; %s holds no annotation",
                self.patient_id, channel, threshold, path,
            )  # fmt: skip
        colors = None
        if color is not None:
            red, green, blue = (int(v) for v in color)
            colors = {class_name: (red, green, blue)}
        return write_geojson(path, {class_name: geometry}, colors=colors)


def _to_list(name: str, value: Any) -> list[Any]:
    if isinstance(value, (torch.Tensor, np.ndarray)):
        items = value.tolist()
        return items if isinstance(items, list) else [items]
    if isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(value, (int, str, np.integer)):
        return [value]
    raise StitchError(
        f"batch[{name!r}] must be a tensor, array, list or scalar, got {type(value).__name__}"
    )


@dataclass
class _Slide:
    grid: Grid
    name: str
    received: np.ndarray  # rows x cols bool
    n_received: int = 0
    trailing: tuple[int, ...] | None = None  # shape of one output
    factor: tuple[int, int] = (1, 1)  # dense: grid pixels per canvas cell
    sums: np.ndarray | None = None
    counts: np.ndarray | None = None
    bar: Any = None


class Stitcher:
    """Collects model outputs over a :class:`~bigsmall_torch.SlidingWindowDataset` into per-slide arrays.

    Args:
        dataset: the sliding-window dataset the outputs come from (or its list of :class:`Grid`).
        out_dir: where each slide's files are written (created); None writes nothing.
        mode: ``"window"`` or ``"dense"`` (:class:`StitchMode`).
        channels: the expected ``C`` of the outputs; None infers it from each slide's first output
            (then ``[B]`` / ``[B, h, w]`` outputs give arrays without a channel axis).
        progress: a tqdm bar per slide (windows done / total, patches/s).
        stream_to_disk: accumulate in memmaps in ``out_dir`` instead of RAM (same results).
        strict: :meth:`finish` raises :class:`MissingWindowsError` when windows are missing (after
            writing the files) instead of logging a warning.
        png, channel, alpha, vmin, vmax, thumbnail_size: the heatmap: channel ``channel`` colour-mapped
            from ``vmin`` to ``vmax`` (default: the slide's range) and blended with ``alpha`` over a
            thumbnail whose longest side is ``thumbnail_size``.

    Dense maps are pasted at the window's position divided by ``patch / h``, rounded to the nearest
    canvas cell when the stride (or an ``edge="shift"`` window) is not a multiple of it.
    """

    def __init__(
        self,
        dataset: SlidingWindowDataset | Sequence[Grid],
        out_dir: str | Path | None = None,
        *,
        mode: str | StitchMode = "window",
        channels: int | None = None,
        progress: bool = True,
        stream_to_disk: bool = False,
        strict: bool = False,
        png: bool = True,
        channel: int = 0,
        alpha: float = 0.5,
        vmin: float | None = None,
        vmax: float | None = None,
        thumbnail_size: int = 1024,
    ) -> None:
        if isinstance(dataset, SlidingWindowDataset):
            grids, self.backend = list(dataset.grids), dataset.slides.backend
        elif (
            isinstance(dataset, Sequence) and dataset and all(isinstance(g, Grid) for g in dataset)
        ):
            grids, self.backend = list(dataset), Backend.AUTO
        else:
            raise ConfigError(
                f"Stitcher: dataset must be a SlidingWindowDataset or a list of Grid, got {dataset!r}"
            )
        try:
            self.mode = StitchMode(mode)
        except ValueError:
            raise ConfigError(f"Stitcher: mode must be 'window' or 'dense', got {mode!r}") from None
        self.channels = None if channels is None else positive_int("Stitcher: channels", channels)
        self.channel = positive_int("Stitcher: channel", channel, minimum=0)
        if self.channels is not None and self.channel >= self.channels:
            raise ConfigError(f"Stitcher: channel={channel} is not one of the {channels} channels")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
            raise ConfigError(f"Stitcher: alpha must be in [0, 1], got {alpha!r}")
        if stream_to_disk and out_dir is None:
            raise ConfigError("Stitcher: stream_to_disk=True needs an out_dir to hold the memmaps")
        self.out_dir = None if out_dir is None else Path(out_dir)
        if self.out_dir is not None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        self.alpha, self.vmin, self.vmax = float(alpha), vmin, vmax
        self.thumbnail_size = positive_int("Stitcher: thumbnail_size", thumbnail_size, minimum=16)
        self.progress, self.stream_to_disk = bool(progress), bool(stream_to_disk)
        self.strict, self.png = bool(strict), bool(png)
        names = safe_names([g.patient_id for g in grids])
        self._slides = {
            g.patient_id: _Slide(g, names[g.patient_id], np.zeros((g.rows, g.cols), bool))
            for g in grids
        }
        self.results: dict[Any, StitchResult] = {}
        self._finished = False

    # -- adding outputs ----------------------------------------------------------------------------

    def add(self, outputs: torch.Tensor | np.ndarray, batch: Mapping[str, Any]) -> None:
        """Place ``outputs`` (one per window of ``batch``) on their grids; all or nothing per call."""
        if self._finished:
            raise StitcherClosedError(
                "Stitcher.add() after finish(); make a new Stitcher for another run"
            )
        if isinstance(outputs, torch.Tensor):
            values = outputs.detach().to("cpu", torch.float32).numpy()
        elif isinstance(outputs, np.ndarray):
            values = outputs.astype(np.float32, copy=False)
        else:
            raise StitchError(
                f"outputs must be a torch.Tensor or numpy array, got {type(outputs).__name__}"
            )
        absent = [k for k in ("patient_id", "row", "col") if k not in batch]
        if absent:
            raise StitchError(
                f"batch lacks {absent}; pass the batch dict of a SlidingWindowDataset"
            )
        ids = _to_list("patient_id", batch["patient_id"])
        rows = np.asarray(_to_list("row", batch["row"]), dtype=np.int64)
        cols = np.asarray(_to_list("col", batch["col"]), dtype=np.int64)
        if values.ndim == 0 or not len(ids) == len(rows) == len(cols) == values.shape[0]:
            size = values.shape[0] if values.ndim else "none"
            raise StitchError(
                f"outputs of shape {tuple(values.shape)} (batch size {size}) do not match the batch's "
                f"metadata: {len(ids)} patient ids, {len(rows)} rows, {len(cols)} cols"
            )
        groups: dict[Any, list[int]] = {}
        for i, pid in enumerate(ids):
            groups.setdefault(pid, []).append(i)
        checked = [(self._check(pid, values[j], rows[j], cols[j]), j) for pid, j in groups.items()]
        for (slide, factor), j in checked:  # everything is valid: now accumulate
            if slide.trailing is None:
                slide.trailing, slide.factor = values.shape[1:], factor
                self._allocate(slide)
            self._accumulate(slide, values[j], rows[j], cols[j])

    def _check(
        self, pid: Any, values: np.ndarray, rows: np.ndarray, cols: np.ndarray
    ) -> tuple[_Slide, tuple[int, int]]:
        slide = self._slides.get(pid)
        if slide is None:
            raise StitchError(f"unknown patient id {pid!r}; known: {list(self._slides)[:5]}")
        grid = slide.grid
        outside = (rows < 0) | (rows >= grid.rows) | (cols < 0) | (cols >= grid.cols)
        if outside.any():
            r, c = rows[outside][0], cols[outside][0]
            raise StitchError(
                f"patient {pid!r}: (row, col)=({r}, {c}) is outside its {grid.rows}x{grid.cols} grid"
            )
        excluded = ~grid.include[rows, cols]
        if excluded.any():
            r, c = rows[excluded][0], cols[excluded][0]
            raise StitchError(
                f"patient {pid!r}: window ({r}, {c}) is not an included window (off tissue)"
            )
        flat, seen = rows * grid.cols + cols, slide.received[rows, cols]
        cells, counts = np.unique(flat, return_counts=True)
        if seen.any() or (counts > 1).any():
            r, c = divmod(int(flat[seen][0] if seen.any() else cells[counts > 1][0]), grid.cols)
            raise StitchError(f"patient {pid!r}: window ({r}, {c}) was added twice")
        return slide, self._check_shape(slide, values.shape[1:])

    def _check_shape(self, slide: _Slide, shape: tuple[int, ...]) -> tuple[int, int]:
        """Check the shape of one output; return the dense factor (grid pixels per canvas cell)."""
        pid, dense = slide.grid.patient_id, self.mode is StitchMode.DENSE
        if slide.trailing is not None:
            if shape != slide.trailing:
                raise StitchError(
                    f"patient {pid!r}: an output of shape {shape} after outputs of shape {slide.trailing}"
                )
            return slide.factor
        ndims: tuple[int, ...] = (2, 3) if dense else (0, 1)
        form = "[B, h, w] or [B, C, h, w]" if dense else "[B] or [B, C]"
        if self.channels is not None:
            ndims, form = ndims[1:], form.split(" or ")[1].replace("C", str(self.channels))
        if len(shape) not in ndims or (self.channels is not None and shape[0] != self.channels):
            hint = "" if dense or len(shape) < 2 else "; use mode='dense' for per-pixel maps"
            got = ", ".join(["B", *map(str, shape)])
            raise StitchError(
                f"patient {pid!r}: mode={self.mode.value!r} needs outputs {form}, got [{got}]{hint}"
            )
        if len(shape) == ndims[-1] and self.channel >= shape[0]:
            raise StitchError(
                f"patient {pid!r}: channel={self.channel} for the heatmap, but outputs have {shape[0]} channels"
            )
        if not dense:
            return 1, 1
        (pw, ph), (h, w) = slide.grid.patch_size, shape[-2:]
        if h == 0 or w == 0 or pw % w or ph % h:
            raise StitchError(
                f"patient {pid!r}: dense maps of {w}x{h} must divide the {pw}x{ph} patch"
            )
        return pw // w, ph // h

    def _allocate(self, slide: _Slide) -> None:
        grid, trailing = slide.grid, slide.trailing or ()
        if self.mode is StitchMode.WINDOW:  # small: sums in float64
            shape, spatial, dtype = (
                (grid.rows, grid.cols, *trailing),
                (grid.rows, grid.cols),
                np.float64,
            )
        else:  # canvas-sized: float32
            (fx, fy), (width, height) = slide.factor, grid.extent
            spatial, dtype = (math.ceil(height / fy), math.ceil(width / fx)), np.float32
            shape = (*spatial, *trailing[:-2])
        if self.stream_to_disk:
            assert self.out_dir is not None  # checked in __init__
            memmap = np.lib.format.open_memmap
            slide.sums = memmap(self.out_dir / f"{slide.name}.sums.partial.npy", "w+", dtype, shape)
            slide.counts = memmap(
                self.out_dir / f"{slide.name}.coverage.npy", "w+", np.int32, spatial
            )
        else:
            slide.sums, slide.counts = np.zeros(shape, dtype), np.zeros(spatial, np.int32)
        if self.progress:
            from tqdm.auto import tqdm

            slide.bar = tqdm(total=grid.count, desc=f"stitching {grid.patient_id}", unit="patch")

    def _accumulate(
        self, slide: _Slide, values: np.ndarray, rows: np.ndarray, cols: np.ndarray
    ) -> None:
        assert slide.sums is not None and slide.counts is not None  # allocated in add()
        grid, sums, counts = slide.grid, slide.sums, slide.counts
        if self.mode is StitchMode.WINDOW:
            sums[rows, cols] += values  # positions are distinct (checked)
            counts[rows, cols] += 1
        else:
            (fx, fy), (height, width) = slide.factor, counts.shape
            for value, row, col in zip(values, rows, cols, strict=True):
                x, y = round(int(grid.xs[col]) / fx), round(int(grid.ys[row]) / fy)
                h, w = (
                    max(0, min(value.shape[-2], height - y)),
                    max(0, min(value.shape[-1], width - x)),
                )
                tile = value[:h, :w] if value.ndim == 2 else value[:, :h, :w].transpose(1, 2, 0)
                sums[y : y + h, x : x + w] += tile
                counts[y : y + h, x : x + w] += 1
        slide.received[rows, cols] = True
        slide.n_received += len(rows)
        if slide.bar is not None:
            slide.bar.update(len(rows))
        if slide.n_received == grid.count:
            self._complete(slide)

    # -- finishing ---------------------------------------------------------------------------------

    def finish(self) -> dict[Any, StitchResult]:
        """Write the slides not yet complete; return every result (patient id -> :class:`StitchResult`).

        Windows that never arrived are logged as a warning per slide (``strict=True``: raised as
        :class:`MissingWindowsError` after writing). A slide that received nothing has no result.
        Calling it again returns the same results.
        """
        if self._finished:
            return self.results
        self._finished = True
        missing: dict[Any, np.ndarray] = {}
        for pid, slide in self._slides.items():
            if pid not in self.results and slide.trailing is not None:
                self._complete(slide)
            cells = np.argwhere(slide.grid.include & ~slide.received)
            if len(cells):
                missing[pid] = cells
                if not self.strict:
                    logger.warning(
                        "patient %r: %d of %d windows never received (first (row, col): %s)%s",
                        pid, len(cells), slide.grid.count, cells[:5].tolist(),
                        "" if pid in self.results else "; nothing received, nothing written",
                    )  # fmt: skip
        if missing and self.strict:
            raise MissingWindowsError(missing)
        return self.results

    def _complete(self, slide: _Slide) -> None:
        """Divide sums by counts, write the files, keep the result, free the accumulators."""
        assert slide.sums is not None and slide.counts is not None
        sums, counts, grid = slide.sums, slide.counts, slide.grid
        slide.sums = slide.counts = None
        names = {"npy": ".npy", "coverage": ".coverage.npy", "json": ".json", "png": ".png"}
        paths = {} if self.out_dir is None else {
            key: self.out_dir / f"{slide.name}{suffix}" for key, suffix in names.items() if key != "png" or self.png
        }  # fmt: skip
        array: np.ndarray = (
            np.lib.format.open_memmap(paths["npy"], "w+", np.float32, sums.shape)
            if self.stream_to_disk
            else np.empty(sums.shape, np.float32)
        )
        step = max(1, _CHUNK_BYTES // max(1, sums[0].nbytes))  # rows at a time: bounded memory
        for r in range(0, len(sums), step):
            n = counts[r : r + step].reshape(
                -1, *counts.shape[1:], *(1,) * (sums.ndim - counts.ndim)
            )
            array[r : r + step] = np.where(n > 0, sums[r : r + step] / np.maximum(n, 1), np.nan)
        step_x, step_y = grid.stride if self.mode is StitchMode.WINDOW else slide.factor
        ds = grid.choice.downsample
        output_downsample = (step_x * ds, step_y * ds)
        origin = (0.0, 0.0)  # dense: the canvas starts at the slide's corner
        if self.mode is StitchMode.WINDOW:  # a stride step centred on its window
            (pw, ph), (sx, sy) = grid.patch_size, grid.stride
            origin = ((pw - sx) / 2 * ds, (ph - sy) / 2 * ds)
        if isinstance(sums, np.memmap):
            assert isinstance(array, np.memmap) and isinstance(counts, np.memmap)
            array.flush()
            counts.flush()
            Path(str(sums.filename)).unlink()
            array, counts = (
                np.load(paths["npy"], mmap_mode="r"),
                np.load(paths["coverage"], mmap_mode="r"),
            )
        elif paths:
            np.save(paths["npy"], array)
            np.save(paths["coverage"], counts)
        if paths:
            self._write_sidecars(slide, array, counts, output_downsample, origin, paths)
        missing = np.argwhere(grid.include & ~slide.received)
        self.results[grid.patient_id] = StitchResult(
            grid.patient_id, array, counts, missing, output_downsample, paths, origin=origin
        )
        if slide.bar is not None:
            slide.bar.close()

    def _write_sidecars(
        self,
        slide: _Slide,
        array: np.ndarray,
        counts: np.ndarray,
        output_downsample: tuple[float, float],
        origin: tuple[float, float],
        paths: dict[str, Path],
    ) -> None:
        """The JSON geometry and the PNG heatmap (when the slide's thumbnail can be read)."""
        meta = slide.grid.geometry()
        meta["mode"], meta["shape"], meta["dtype"] = (
            self.mode.value,
            list(array.shape),
            str(array.dtype),
        )
        meta["output_downsample"] = list(output_downsample)
        meta["origin"] = list(origin)  # level-0 top-left of cell (0, 0), see StitchResult
        meta["missing"] = int((slide.grid.include & ~slide.received).sum())
        meta["files"] = {key: path.name for key, path in paths.items()}
        if self.png:
            try:
                meta["heatmap"] = self._picture(
                    slide, array, counts, output_downsample, paths["png"]
                )
            except SlideError as exc:  # a one-level slide whose damaged tile the windows skipped
                logger.warning(
                    "no heatmap picture for patient %r: its thumbnail cannot be read (%s); the "
                    "result and its .npy/.json files are kept", slide.grid.patient_id, str(exc),
                )  # fmt: skip
                meta["files"].pop("png", None)
                meta["heatmap"] = None
        paths["json"].write_text(json.dumps(meta, indent=1))

    def _picture(
        self,
        slide: _Slide,
        array: np.ndarray,
        counts: np.ndarray,
        output_downsample: tuple[float, float],
        path: Path,
    ) -> dict[str, Any]:
        """Draw the heatmap over the slide's thumbnail into ``path``; its JSON description."""
        from PIL import Image

        grid, ds = slide.grid, slide.grid.choice.downsample
        starts: tuple[np.ndarray, np.ndarray]
        if self.mode is StitchMode.WINDOW:  # cell (r, c) is the window (r, c)
            starts, size = (
                (grid.xs * ds, grid.ys * ds),
                (grid.patch_size[0] * ds, grid.patch_size[1] * ds),
            )
        else:  # cell (i, j) is one canvas cell
            (dx, dy), (height, width) = output_downsample, counts.shape
            starts, size = (np.arange(width) * dx, np.arange(height) * dy), output_downsample
        thumb, info = slide_thumbnail(grid.path, size=self.thumbnail_size, backend=self.backend)
        values = array if array.ndim == 2 else array[..., self.channel]
        image, vmin, vmax = heatmap_overlay(
            thumb, info, values, np.asarray(counts) > 0, starts=starts, cell_size=size,
            alpha=self.alpha, vmin=self.vmin, vmax=self.vmax,
        )  # fmt: skip
        Image.fromarray(image).save(path)
        channel = None if array.ndim == 2 else self.channel
        heatmap = {"channel": channel, "vmin": vmin, "vmax": vmax, "alpha": self.alpha}
        return heatmap | {"colormap": "viridis", "size": [image.shape[1], image.shape[0]]}

    # -- export ------------------------------------------------------------------------------------

    def to_geojson(
        self,
        patient_id: Any,
        path: str | PathLike[str],
        *,
        threshold: float = 0.5,
        class_name: str = "Tumor",
        channel: int = 0,
        color: tuple[int, int, int] | None = None,
    ) -> Path:
        """Write ``patient_id``'s thresholded result as QuPath annotations (level-0 GeoJSON; import
        with File > Import objects, or drag the file onto the viewer): :meth:`StitchResult.to_geojson`
        of ``self.results[patient_id]``, available once the slide's last window arrived or after
        :meth:`finish`.

        Raises:
            ConfigError: ``patient_id`` is not a slide of this Stitcher, or an option is not allowed.
            StitchError: the slide has no result yet (windows still missing, or none received).
        """
        if patient_id not in self._slides:
            raise ConfigError(
                f"Stitcher.to_geojson: unknown patient_id {patient_id!r}; known: {list(self._slides)[:5]}"
            )
        result = self.results.get(patient_id)
        if result is None:
            slide = self._slides[patient_id]
            raise StitchError(
                f"patient {patient_id!r} has no result yet ({slide.n_received} of {slide.grid.count} "
                "windows received); a slide's result exists once its last window arrives, or after "
                "finish() for one that received some"
            )
        return result.to_geojson(
            path, threshold=threshold, class_name=class_name, channel=channel, color=color
        )

    def __repr__(self) -> str:
        return (
            f"Stitcher(slides={len(self._slides)}, mode={self.mode.value!r}, out_dir={self.out_dir}, "
            f"stream_to_disk={self.stream_to_disk}, done={len(self.results)})"
        )
