"""Drawing on slide thumbnails: the colour map, blending, heatmap overlays, annotation outlines,
file-safe names and thumbnails (used by the sampling pictures and the stitched heatmaps)."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..annotations import Annotations, ClassRegions, _shapely, read_record
from ..data import Record
from ..errors import ConfigError
from ..io.slide import Backend, SlideInfo, SlideReader, open_slide
from ..io.tissue import TissueDetector

__all__ = ["blend", "colormap", "heatmap_overlay", "safe_names", "slide_thumbnail"]

logger = logging.getLogger(__name__)

#: What an ``annotations=`` argument may be: read annotations, class regions, an annotation
#: :class:`~bigsmall_torch.Record` (its info may give ``kind``, ``exclude``, ``downsample``,
#: ``labels``), or the path of an annotation file.
AnnotationSource = Annotations | ClassRegions | Record | str | os.PathLike[str]

#: Outline colours of annotation classes, in class order (none close to the patches' blue or the
#: big chunks' orange).
_ANNOTATION_PALETTE = ((230, 25, 75), (60, 180, 75), (145, 30, 180), (0, 160, 160),
                      (240, 50, 230), (128, 128, 0), (120, 60, 20), (0, 0, 128))  # fmt: skip

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


def _read_source(
    source: AnnotationSource,
    dimensions: tuple[int, int],
    where: str,
    classes: Sequence[str] | None = None,
) -> Annotations | ClassRegions:
    """``source`` as :class:`Annotations` or :class:`ClassRegions`; a label mask's ``downsample``
    defaults to the slide's level-0 size over the mask's."""
    if isinstance(source, (Annotations, ClassRegions)):
        return source
    if not isinstance(source, (Record, str, os.PathLike)):
        raise ConfigError(
            f"{where}: annotations must be Annotations, ClassRegions, a Record or the path of an "
            f"annotation file, got {type(source).__name__}"
        )
    # A label mask without its own "labels": value k + 1 is classes[k], as the loaders read it.
    labels = None if classes is None else {name: k + 1 for k, name in enumerate(classes)}
    return read_record(source, dimensions, labels=labels)


def _rgb(value: Any) -> bool:
    return (
        isinstance(value, (tuple, list))
        and len(value) == 3
        and all(
            isinstance(c, (int, np.integer)) and not isinstance(c, bool) and 0 <= c <= 255
            for c in value
        )
    )


def _annotation_layers(
    annotations: AnnotationSource,
    dimensions: tuple[int, int],
    *,
    classes: Sequence[str] | None = None,
    colors: Mapping[str, tuple[int, int, int]] | None = None,
    where: str = "annotations",
) -> list[tuple[str, Any, tuple[int, int, int]]]:
    """``(class, level-0 geometry, colour)`` of each class of ``annotations`` to draw, in class order.

    ``classes`` picks the classes (default: all of them); ``colors`` gives some classes a colour
    (the others take a fixed palette by their place among all the classes). An
    :class:`Annotations` class is the union of its regions; a :class:`ClassRegions` class its
    disjoint region. ``where`` names the caller in messages.
    """
    if classes is not None and (isinstance(classes, str) or not isinstance(classes, Sequence)):
        raise ConfigError(f"{where}: classes must be a sequence of class names, got {classes!r}")
    source = _read_source(annotations, dimensions, where, classes)
    available = tuple(source.classes)
    if classes is None:
        chosen = available
    elif isinstance(classes, str) or not isinstance(classes, Sequence):
        raise ConfigError(f"{where}: classes must be a sequence of class names, got {classes!r}")
    else:
        unknown = [c for c in classes if c not in available]
        if unknown:
            raise ConfigError(
                f"{where}: classes {unknown} are not in the annotations; their classes are {list(available)}"
            )
        chosen = tuple(dict.fromkeys(classes))
    if colors is not None and not isinstance(colors, Mapping):
        raise ConfigError(
            f"{where}: annotation_colors must map class names to (r, g, b), got {type(colors).__name__}"
        )
    bad = {k: v for k, v in (colors or {}).items() if not _rgb(v)}
    if bad:
        raise ConfigError(
            f"{where}: annotation_colors must be (r, g, b) ints in 0..255, got {bad!r}"
        )
    if isinstance(source, ClassRegions):
        regions = dict(zip(source.classes, source.geometries, strict=True))
        geometries = [regions[name] for name in chosen]
    else:
        geometries = [source.geometry(name) for name in chosen]
    layers = []
    for name, geometry in zip(chosen, geometries, strict=True):
        default = _ANNOTATION_PALETTE[available.index(name) % len(_ANNOTATION_PALETTE)]
        rgb = (colors or {}).get(name, default)
        layers.append((name, geometry, (int(rgb[0]), int(rgb[1]), int(rgb[2]))))
    shapely = _shapely()
    slide = shapely.box(0, 0, *dimensions)
    if layers and not any(shapely.intersects(geometry, slide) for _, geometry, _ in layers):
        logger.warning(
            "%s: no region of the classes %s lies on the %dx%d slide; nothing is outlined (are "
            "these the slide's annotations, in level-0 pixels?)",
            where, list(chosen), *dimensions,
        )  # fmt: skip
    return layers


def _draw_outlines(
    image: np.ndarray,
    layers: Sequence[tuple[str, Any, tuple[int, int, int]]],
    scale: tuple[float, float],
    *,
    width: int = 2,
) -> np.ndarray:
    """``image`` (RGB) with the rings (exteriors and holes) of each layer's level-0 polygons drawn
    in its colour, at ``scale`` picture pixels per level-0 pixel (x, y): the pixels whose centre is
    within ``width / 2`` of a ring, a later layer over an earlier one."""
    shapely = _shapely()
    sx, sy = scale
    bands, colours = [], []
    for _, geometry, rgb in layers:
        if geometry is None or geometry.is_empty:
            continue
        picture = shapely.transform(geometry, lambda xy: xy * (sx, sy))
        picture = shapely.simplify(picture, 0.2)  # a fifth of a picture pixel: fewer vertices
        polygons = [
            p for p in shapely.get_parts(picture) if p.geom_type == "Polygon" and not p.is_empty
        ]
        if not polygons:
            continue
        rings = shapely.get_rings(np.array(polygons, dtype=object))
        bands.append(shapely.union_all(shapely.buffer(rings, width / 2, quad_segs=4)))
        colours.append(rgb)
    out = np.array(image, dtype=np.uint8, copy=True)
    if not bands:
        return out
    # The bands as class regions (a later one wins where they overlap), filled at pixel centres.
    labels = ClassRegions([str(k) for k in range(len(bands))], bands).rasterize(
        0, 0, out.shape[1], out.shape[0]
    )
    lut = np.array([(0, 0, 0), *colours], dtype=np.uint8)
    drawn = labels > 0
    out[drawn, :3] = lut[labels[drawn]]
    return out
