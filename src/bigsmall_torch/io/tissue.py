"""Tissue masks: where on a slide the tissue is (most of a slide is glass).

A mask is computed from a thumbnail of the slide: saturation (HSV) thresholded with Otsu's method,
then cleaned with a little morphology (scikit-image, the ``[tissue]`` extra). Glass is nearly
unsaturated; stained tissue is not. Masks are cached per slide in each process.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .._paths import RemotePath
from ..errors import ConfigError, MissingDependencyError, SlideError
from .resolution import resample
from .slide import SlideReader, open_slide

logger = logging.getLogger(__name__)

__all__ = ["TissueDetector", "TissueMask", "render_tissue", "tissue_mask"]

_CACHE_SIZE = 256


def _skimage() -> Any:
    try:
        import skimage.color
        import skimage.filters
        import skimage.morphology
        import skimage.segmentation
    except ImportError as exc:
        raise MissingDependencyError(
            "tissue masks need scikit-image: pip install 'bigsmall-torch[tissue]'"
        ) from exc
    return skimage


def _pieces_around_damage(
    reader: SlideReader, top: int, level: int, width: int, rows: int, first: SlideError
) -> np.ndarray:
    """Rows ``top .. top + rows`` of ``level`` for a picture's thumbnail, whose whole read raised
    ``first``: read piece by piece, the unreadable pieces white, with a warning naming the file.
    Only pictures use it: tissue masks, training and inference raise or skip instead."""
    ds = reader.info.level_downsamples[level]
    piece = max(64, (reader.info.tile_size or (256, 256))[0])
    out = np.full((rows, width, 3), 255, dtype=np.uint8)
    lost = 0
    for y in range(0, rows, piece):
        for x in range(0, width, piece):
            h, w = min(piece, rows - y), min(piece, width - x)
            try:
                out[y : y + h, x : x + w] = reader.read(
                    round(x * ds), round((top + y) * ds), level, w, h
                )
            except SlideError:
                lost += 1
    logger.warning(
        "thumbnail of %s: %d piece(s) of %dx%d pixels at level %d cannot be read and are drawn "
        "white (background): %s", reader.info.path, lost, piece, piece, level, str(first),
    )  # fmt: skip
    return out


@dataclass(frozen=True)
class TissueMask:
    """A boolean tissue mask of one slide at thumbnail scale.

    Attributes:
        path: the slide.
        mask: ``rows x cols`` booleans, True on tissue.
        downsample: level-0 pixels per mask pixel, ``(x, y)``.
        threshold: the saturation threshold used.
    """

    path: Path | RemotePath
    mask: np.ndarray = field(repr=False)
    downsample: tuple[float, float]
    threshold: float

    @property
    def fraction(self) -> float:
        """Fraction of the slide's area covered by tissue."""
        return float(self.mask.mean())

    def _cells(self, x: float, y: float, width: float, height: float) -> tuple[slice, slice]:
        dx, dy = self.downsample
        rows, cols = self.mask.shape
        c0 = min(max(int(x / dx), 0), cols - 1)
        r0 = min(max(int(y / dy), 0), rows - 1)
        c1 = min(max(int(np.ceil((x + width) / dx)), c0 + 1), cols)
        r1 = min(max(int(np.ceil((y + height) / dy)), r0 + 1), rows)
        return slice(r0, r1), slice(c0, c1)

    def fraction_in(self, x: float, y: float, width: float, height: float) -> float:
        """Fraction of tissue in the level-0 region ``(x, y, width, height)``."""
        return float(self.mask[self._cells(x, y, width, height)].mean())

    def tissue_cells(self, x: float, y: float, width: float, height: float) -> np.ndarray:
        """``(n, 2)`` level-0 ``(x, y)`` top-lefts of the tissue cells inside a level-0 region."""
        rows, cols = self._cells(x, y, width, height)
        r, c = np.nonzero(self.mask[rows, cols])
        dx, dy = self.downsample
        return np.stack([(c + cols.start) * dx, (r + rows.start) * dy], axis=1)


@dataclass(frozen=True)
class TissueDetector:
    """How tissue masks are computed.

    Args:
        thumbnail_size: longest side of the thumbnail the mask is computed on (and its resolution).
        threshold: a fixed saturation threshold in [0, 1]; None uses Otsu's threshold, clipped to
            ``[min_threshold, max_threshold]`` (so an all-glass slide stays glass and an all-tissue
            slide stays tissue).
        min_threshold, max_threshold: the clip range of the Otsu threshold.
        smoothing: radius (thumbnail pixels) of the morphological opening/closing; 0 for none.
    """

    thumbnail_size: int = 1024
    threshold: float | None = None
    min_threshold: float = 0.05
    max_threshold: float = 0.12
    smoothing: int = 2

    def __post_init__(self) -> None:
        if (
            isinstance(self.thumbnail_size, bool)
            or not isinstance(self.thumbnail_size, int)
            or self.thumbnail_size < 16
        ):
            raise ConfigError(
                f"TissueDetector: thumbnail_size must be an int >= 16, got {self.thumbnail_size!r}"
            )
        if self.threshold is not None and not 0 <= self.threshold <= 1:
            raise ConfigError(
                f"TissueDetector: threshold must be in [0, 1] or None, got {self.threshold!r}"
            )
        if not 0 <= self.min_threshold <= self.max_threshold <= 1:
            raise ConfigError(
                "TissueDetector: need 0 <= min_threshold <= max_threshold <= 1, got "
                f"{self.min_threshold!r}, {self.max_threshold!r}"
            )
        if (
            isinstance(self.smoothing, bool)
            or not isinstance(self.smoothing, int)
            or self.smoothing < 0
        ):
            raise ConfigError(
                f"TissueDetector: smoothing must be an int >= 0, got {self.smoothing!r}"
            )

    def thumbnail(self, reader: SlideReader, *, around_damage: bool = False) -> np.ndarray:
        """An RGB thumbnail whose longest side is at most ``thumbnail_size``.

        A damaged tile raises :class:`~bigsmall_torch.SlideReadError` (a tissue mask must not call
        a damaged region background); ``around_damage=True``, for pictures only, draws the pieces
        that cannot be read white and logs a warning naming the file."""
        info = reader.info
        width, height = info.dimensions
        scale = min(1.0, self.thumbnail_size / max(width, height))
        out_w, out_h = max(1, round(width * scale)), max(1, round(height * scale))
        # The coarsest level still at least as large as the thumbnail.
        level = max(
            (i for i, (w, h) in enumerate(info.level_dimensions) if w >= out_w and h >= out_h),
            default=0,
        )
        lw, lh = info.level_dimensions[level]
        strips = []
        rows_per_strip = max(1, (64 << 20) // (lw * 3))  # read in strips of at most ~64 MiB
        for top in range(0, lh, rows_per_strip):
            rows = min(rows_per_strip, lh - top)
            try:
                strip = reader.read(0, round(top * info.level_downsamples[level]), level, lw, rows)
            except SlideError as exc:
                if not around_damage:
                    raise
                strip = _pieces_around_damage(reader, top, level, lw, rows, exc)
            strips.append(resample(strip, out_w, max(1, round(rows * out_h / lh))))
        image = np.concatenate(strips, axis=0)
        return resample(image, out_w, out_h)

    def compute(self, reader: SlideReader) -> TissueMask:
        """The tissue mask of ``reader``'s slide (not cached; see :func:`tissue_mask`)."""
        sk = _skimage()
        thumb = self.thumbnail(reader)
        saturation = sk.color.rgb2hsv(thumb)[..., 1]
        if self.threshold is not None:
            threshold = self.threshold
        else:
            otsu = float(sk.filters.threshold_otsu(saturation)) if np.ptp(saturation) > 0 else 0.0
            threshold = float(np.clip(otsu, self.min_threshold, self.max_threshold))
        mask = saturation > threshold
        if self.smoothing:
            footprint = sk.morphology.disk(self.smoothing)
            mask = sk.morphology.opening(mask, footprint)
            mask = sk.morphology.closing(mask, footprint)
        width, height = reader.info.dimensions
        rows, cols = mask.shape
        return TissueMask(reader.info.path, mask, (width / cols, height / rows), threshold)


_cache: OrderedDict[tuple[Any, ...], TissueMask] = OrderedDict()
_cache_lock = threading.Lock()


def tissue_mask(
    slide: SlideReader | str | os.PathLike[str], *, detector: TissueDetector | None = None
) -> TissueMask:
    """The (cached) tissue mask of a slide, given an open reader or a path."""
    detector = detector or TissueDetector()
    reader = open_slide(slide) if isinstance(slide, (str, os.PathLike)) else slide
    try:
        path = reader.info.path
        key = (str(path), path.stat().st_mtime_ns, detector)
        with _cache_lock:
            if key in _cache:
                _cache.move_to_end(key)
                return _cache[key]
        mask = detector.compute(reader)
        with _cache_lock:
            _cache[key] = mask
            while len(_cache) > _CACHE_SIZE:
                _cache.popitem(last=False)
        return mask
    finally:
        if reader is not slide:
            reader.close()


def render_tissue(
    slide: SlideReader | str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    detector: TissueDetector | None = None,
    color: tuple[int, int, int] = (0, 200, 0),
) -> Path:
    """Write a PNG of the slide's thumbnail with the outline of its tissue mask drawn on it."""
    from PIL import Image

    sk = _skimage()
    detector = detector or TissueDetector()
    reader = open_slide(slide) if isinstance(slide, (str, os.PathLike)) else slide
    try:
        thumb = detector.thumbnail(reader).copy()
        mask = tissue_mask(reader, detector=detector).mask
    finally:
        if reader is not slide:
            reader.close()
    edges = sk.segmentation.find_boundaries(mask, mode="thick")
    edges = sk.morphology.dilation(edges, sk.morphology.disk(1))
    thumb[edges[: thumb.shape[0], : thumb.shape[1]]] = color
    path = Path(out)
    Image.fromarray(thumb).save(path)
    return path
