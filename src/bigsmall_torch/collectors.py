"""Built-in small-chunk collectors."""

from __future__ import annotations

import math
import warnings
from enum import Enum

import numpy as np
import torch

from ._validate import choice, positive_int, renamed, size_pair
from .chunks import BigChunk, ChunkContext, SmallChunk, SmallChunkCollector
from .errors import ConfigError, ExtractorError
from .io.resolution import to_level0
from .io.tissue import TissueDetector, _skimage, tissue_mask

__all__ = ["LabelRule", "RandomCropCollector"]


class LabelRule(str, Enum):
    """How a patch's ``"target"`` is decided from its label raster.

    ``CENTER``: the class at the patch's centre pixel (``(width // 2, height // 2)`` of the patch).
    ``AREA``: the class covering most of the patch's pixels, "no class" (-1) included; ties go to
    the later class.
    """

    CENTER = "center"
    AREA = "area"


# Rejection draws of an annotated patch's centre before the chunk's list of the class's centres is
# built (a chunk centred on a class is mostly of it, so the list is rarely needed).
_FOCUS_TRIES = 8


class RandomCropCollector(SmallChunkCollector):
    """Uniformly random ``patch_size`` crops of a big chunk (with replacement).

    Args:
        patch_size: crop width and height (an int or a ``(width, height)`` pair), in pixels of the
            big chunk's level (the keyword of :class:`~bigsmall_torch.SlidingWindowDataset` too;
            ``size=`` is its deprecated former name).
        tissue_only: keep only crops whose tissue fraction (from the slide's tissue mask) is at
            least ``min_tissue``; after ``max_tries`` rejected draws the big chunk is retired
            (None). The same words as :class:`~bigsmall_torch.SlidingWindowDataset`'s.
        min_tissue: the tissue fraction ``tissue_only`` asks for, in [0, 1] (default 0.5).
        max_tries: draws per sample when ``tissue_only``.
        tissue_detector: how masks are computed (default :class:`~bigsmall_torch.TissueDetector`).
        masks: add ``"mask"`` to every sample: the patch's ``[H, W]`` uint8 labels, pixel for pixel
            with ``"image"`` (0: no class, ``k + 1``: ``classes[k]``). Needs big chunks with labels
            (:class:`~bigsmall_torch.RandomRegionLoader` with ``annotations=``).
        target: how ``"target"`` is decided (:class:`LabelRule`): ``"center"`` (default), the class
            at the patch's centre pixel, or ``"area"``, the class covering most of the patch.
        min_coverage: redraw patches whose annotated fraction (pixels of any class) is below this,
            in [0, 1]; after ``max_tries`` draws the big chunk is retired (as with ``tissue_only``).

    When the big chunk carries labels (annotations), every sample also carries ``"target"``: the
    index in ``classes`` of the patch's class, -1 when it has none. A chunk placed for equal class
    shares (``balance="equal"``) gives patches centred on pixels of its class.

    The crop is a view of the big chunk (no copy). Samples carry level-0 ``x``/``y`` of the crop's
    top-left, the ``level`` read and the ``mpp`` of the pixels (NaN when the slide has none). A big
    chunk smaller than ``patch_size`` gives no crop (None).
    """

    def __init__(
        self,
        patch_size: int | tuple[int, int] | None = None,
        *,
        tissue_only: bool = False,
        min_tissue: float | None = None,
        max_tries: int = 10,
        tissue_detector: TissueDetector | None = None,
        size: int | tuple[int, int] | None = None,
        masks: bool = False,
        target: str | LabelRule = "center",
        min_coverage: float = 0.0,
    ) -> None:
        patch = renamed("RandomCropCollector", "patch_size", patch_size, "size", size)
        if not isinstance(masks, bool):
            raise ConfigError(f"RandomCropCollector: masks must be True or False, got {masks!r}")
        self.masks = masks
        self.target = choice("RandomCropCollector: target", target, LabelRule)
        if isinstance(min_coverage, bool) or not isinstance(min_coverage, (int, float)) or not 0 <= min_coverage <= 1:
            raise ConfigError(f"RandomCropCollector: min_coverage must be a number in [0, 1], got {min_coverage!r}")
        self.min_coverage = float(min_coverage)
        self._patch_size = size_pair("RandomCropCollector: patch_size", patch)
        if not isinstance(tissue_only, bool):
            raise ConfigError(f"RandomCropCollector: tissue_only must be True or False, got {tissue_only!r}")
        if min_tissue is not None and (
            isinstance(min_tissue, bool) or not isinstance(min_tissue, (int, float)) or not 0 <= min_tissue <= 1
        ):
            raise ConfigError(f"RandomCropCollector: min_tissue must be a number in [0, 1], got {min_tissue!r}")
        if min_tissue is not None and min_tissue > 0 and not tissue_only:
            warnings.warn(
                "RandomCropCollector(min_tissue=...) without tissue_only=True is deprecated: "
                "tissue_only is switched on for you; pass tissue_only=True as well",
                DeprecationWarning,
                stacklevel=2,
            )
            tissue_only = True
        self.tissue_only = tissue_only
        self.min_tissue = 0.5 if min_tissue is None else float(min_tissue)
        self.max_tries = positive_int("RandomCropCollector: max_tries", max_tries)
        self.tissue_detector = tissue_detector or TissueDetector()
        if self.tissue_only:
            _skimage()  # fail at construction, naming the extra, when scikit-image is missing

    @property
    def patch_size(self) -> tuple[int, int]:
        return self._patch_size

    @property
    def size(self) -> tuple[int, int]:
        """Deprecated name of :attr:`patch_size`."""
        return self._patch_size

    @property
    def _filters(self) -> bool:
        return self.tissue_only and self.min_tissue > 0

    @property
    def needs_labels(self) -> bool:
        """Whether big chunks must carry labels (``masks`` or ``min_coverage``)."""
        return self.masks or self.min_coverage > 0

    def extract_smallchunk(
        self, call_count: int, bigchunk: BigChunk, ctx: ChunkContext
    ) -> SmallChunk | None:
        height, width = bigchunk.data.shape[:2]
        w, h = self._patch_size
        if w > width or h > height:
            return None
        info = bigchunk.info
        ds = info.get("downsample", 1.0)
        labels = bigchunk.labels
        if labels is None and self.needs_labels:
            raise ExtractorError(
                "RandomCropCollector(masks=True or min_coverage>0) needs big chunks with labels: "
                "give the loader annotations= and classes= (RandomRegionLoader)"
            )
        focus = info.get("focus") if labels is not None else None
        filters, coverage = self._filters, labels is not None and self.min_coverage > 0
        for _ in range(self.max_tries if filters or coverage else 1):
            if focus is None:
                cx = int(ctx.rng.integers(0, width - w + 1))
                cy = int(ctx.rng.integers(0, height - h + 1))
            else:
                drawn = self._on_focus(bigchunk, int(focus), ctx)
                if drawn is None:
                    return None  # no pixel of the chunk's class can centre a patch
                cx, cy = drawn
            if filters and self._tissue(bigchunk, ctx, cx, cy) < self.min_tissue:
                continue
            if coverage:
                crop = labels[cy : cy + h, cx : cx + w]  # type: ignore[index]
                if np.count_nonzero(crop) < self.min_coverage * crop.size:
                    continue
            break
        else:
            return None  # mostly background after max_tries: move on to another big chunk
        # The chunk's origin in its level's pixels (its level-0 x maps back to it), plus the crop's
        # offset, reported as the level-0 coordinate that maps back to the crop's first pixel.
        ox, oy = int(info.get("x", 0) / ds), int(info.get("y", 0) / ds)
        sample_info = {
            "x": to_level0(ox + cx, ds),
            "y": to_level0(oy + cy, ds),
            "level": info.get("level", 0),
            "mpp": info.get("mpp", math.nan),
        }
        if labels is not None:
            crop = labels[cy : cy + h, cx : cx + w]
            sample_info["target"] = self._target(crop, len(info.get("classes", ())))
            if self.masks:
                sample_info["mask"] = torch.from_numpy(crop)  # a view, as the image is
        return SmallChunk(bigchunk.data[cy : cy + h, cx : cx + w], sample_info, info, bigchunk.patient)

    def _target(self, crop: np.ndarray, classes: int) -> int:
        """The class index of a patch's labels (-1: none), by :attr:`target`."""
        h, w = crop.shape
        if self.target is LabelRule.CENTER:
            return int(crop[h // 2, w // 2]) - 1
        counts = np.bincount(crop.ravel(), minlength=classes + 1)
        return len(counts) - 1 - int(np.argmax(counts[::-1])) - 1  # ties: the later class

    def _on_focus(self, bigchunk: BigChunk, focus: int, ctx: ChunkContext) -> tuple[int, int] | None:
        """Top-left of a patch whose centre pixel is drawn uniformly from the chunk's pixels of class
        ``focus`` (those whose patch fits in the chunk); None when there are none.

        A few draws of uniform top-lefts are tried first, and the first whose centre is of the
        class is kept (rejection sampling: uniform over the class's centres); when they all miss,
        one draw from the list of the chunk's centres of the class (uniform too). The list, whose
        building scans the whole chunk, is built only for chunks where the class is rare and then
        cached on the chunk; the random numbers drawn do not depend on that cache, so a resumed
        stream (whose chunks come back without it) draws as the original did.
        """
        w, h = self._patch_size
        labels = bigchunk.labels
        assert labels is not None
        height, width = labels.shape
        span, rows = width - w + 1, height - h + 1
        for _ in range(_FOCUS_TRIES):
            cx, cy = int(ctx.rng.integers(span)), int(ctx.rng.integers(rows))
            if labels[cy + h // 2, cx + w // 2] == focus + 1:
                return cx, cy
        key = ("focus", w, h)
        cells = bigchunk.cache.get(key)
        if cells is None:
            # Centres (w // 2 + cx, h // 2 + cy) for every top-left (cx, cy) that fits.
            centres = labels[h // 2 : h // 2 + rows, w // 2 : w // 2 + span]
            cells = np.flatnonzero(centres == focus + 1)
            bigchunk.cache[key] = cells
        if len(cells) == 0:
            return None
        cell = int(cells[ctx.rng.integers(len(cells))])
        return cell % span, cell // span

    def _tissue(self, bigchunk: BigChunk, ctx: ChunkContext, cx: int, cy: int) -> float:
        """Tissue fraction of the crop at ``(cx, cy)`` of ``bigchunk``."""
        info = bigchunk.info
        if "path" not in info:
            raise ConfigError(
                "RandomCropCollector: tissue_only needs the big chunk's info['path'] (the slide), "
                f"which {sorted(info)} lacks"
            )
        # The record the chunk came from gives the mpp hint of a file that records none.
        record = bigchunk.patient.records.get(info.get("record_key", ""))
        hint = record.info.get("mpp") if record and str(record.path) == str(info["path"]) else None
        mask = tissue_mask(ctx.slides.get(info["path"], mpp=hint), detector=self.tissue_detector)
        ds = info.get("downsample", 1.0)
        return mask.fraction_in(
            info.get("x", 0) + cx * ds, info.get("y", 0) + cy * ds, self._patch_size[0] * ds, self._patch_size[1] * ds
        )

    def __repr__(self) -> str:
        return (
            f"RandomCropCollector(patch_size={self._patch_size}, tissue_only={self.tissue_only}, "
            f"min_tissue={self.min_tissue}, masks={self.masks}, target={self.target.value!r}, "
            f"min_coverage={self.min_coverage})"
        )
