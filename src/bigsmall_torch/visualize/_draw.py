"""Drawing on slide thumbnails: the colour map, blending, heatmap overlays, file-safe names and
thumbnails (used by the sampling pictures and the stitched heatmaps)."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..io.slide import Backend, SlideInfo, SlideReader, open_slide
from ..io.tissue import TissueDetector

__all__ = ["blend", "colormap", "heatmap_overlay", "safe_names", "slide_thumbnail"]

logger = logging.getLogger(__name__)

# Viridis at 9 evenly spaced points; colours in between are interpolated.
_VIRIDIS = np.array([[68, 1, 84], [72, 36, 117], [59, 82, 139], [44, 114, 142], [33, 145, 140],
                     [39, 173, 129], [94, 201, 98], [173, 220, 48], [253, 231, 37]], dtype=np.float64)  # fmt: skip


def colormap(values: np.ndarray, *, vmin: float, vmax: float) -> np.ndarray:
    """``values`` as viridis-like RGB ``uint8`` (shape ``values.shape + (3,)``); NaN gets the vmin colour."""
    span = vmax - vmin if vmax > vmin else 1.0
    t = np.nan_to_num((np.asarray(values, dtype=np.float64) - vmin) / span, nan=0.0).clip(0, 1)
    anchors = np.linspace(0, 1, len(_VIRIDIS))
    rgb = np.stack([np.interp(t, anchors, _VIRIDIS[:, k]) for k in range(3)], axis=-1)
    return rgb.round().astype(np.uint8)


def blend(
    image: np.ndarray,
    values: np.ndarray,
    covered: np.ndarray,
    *,
    alpha: float = 0.5,
    vmin: float | None = None,
    vmax: float | None = None,
) -> tuple[np.ndarray, float, float]:
    """``image`` with ``values`` colour-mapped and alpha-blended where ``covered``; returns it, vmin, vmax.

    ``vmin``/``vmax`` default to the range of the covered values.
    """
    shown = values[covered]
    vmin = vmin if vmin is not None else float(shown.min()) if shown.size else 0.0
    vmax = vmax if vmax is not None else float(shown.max()) if shown.size else 1.0
    out = image.astype(np.float32)
    colours = colormap(values[covered], vmin=vmin, vmax=vmax).astype(np.float32)
    out[covered] = (1 - alpha) * out[covered] + alpha * colours
    return out.round().astype(np.uint8), vmin, vmax


def heatmap_overlay(
    thumbnail: np.ndarray,
    info: SlideInfo,
    values: np.ndarray,
    covered: np.ndarray,
    *,
    starts: tuple[np.ndarray, np.ndarray],
    cell_size: tuple[float, float],
    alpha: float = 0.5,
    vmin: float | None = None,
    vmax: float | None = None,
) -> tuple[np.ndarray, float, float]:
    """``thumbnail`` with a ``rows x cols`` array of cells blended over it (see :func:`blend`).

    Cell ``(r, c)`` covers level-0 ``starts[0][c] .. + cell_size[0]`` by ``starts[1][r] .. + cell_size[1]``
    (increasing starts); where cells overlap, a thumbnail pixel shows the last cell starting before it.
    Only cells ``covered`` with finite values are drawn.
    """
    index = []
    for axis, length in enumerate((thumbnail.shape[1], thumbnail.shape[0])):
        centres = (np.arange(length) + 0.5) * (info.dimensions[axis] / length)  # level-0, per pixel
        start = np.asarray(starts[axis], dtype=np.float64)
        cell = np.searchsorted(start, centres, side="right") - 1
        inside = (cell >= 0) & (centres < start[cell.clip(0)] + cell_size[axis])
        index.append((cell.clip(0, len(start) - 1), inside))
    (cols, x_in), (rows, y_in) = index
    shown = np.asarray(values)[np.ix_(rows, cols)]
    mask = (
        np.asarray(covered)[np.ix_(rows, cols)] & y_in[:, None] & x_in[None, :] & np.isfinite(shown)
    )
    return blend(thumbnail, shown, mask, alpha=alpha, vmin=vmin, vmax=vmax)


def safe_names(ids: Sequence[Any]) -> dict[Any, str]:
    """A distinct file-name stem per patient id (unsafe characters replaced, clashes numbered)."""
    names: dict[Any, str] = {}
    used: set[str] = set()
    for pid in ids:
        base = re.sub(r"[^A-Za-z0-9._-]+", "_", str(pid)).strip("._") or "slide"
        name, k = base, 1
        while name.lower() in used:  # case-insensitive file systems
            k += 1
            name = f"{base}_{k}"
        used.add(name.lower())
        names[pid] = name
    return names


def slide_thumbnail(
    slide: SlideReader | str | os.PathLike[str],
    *,
    size: int = 1024,
    backend: str | Backend = "auto",
) -> tuple[np.ndarray, SlideInfo]:
    """The RGB thumbnail (longest side at most ``size``) of a slide, and the slide's info. Pieces
    that cannot be read (a damaged tile) are drawn white, with a warning naming the file."""
    reader = open_slide(slide, backend=backend) if isinstance(slide, (str, os.PathLike)) else slide
    try:
        detector = TissueDetector(thumbnail_size=size)
        return detector.thumbnail(reader, around_damage=True), reader.info
    finally:
        if reader is not slide:
            reader.close()


