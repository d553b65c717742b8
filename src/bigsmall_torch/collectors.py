"""Built-in small-chunk collectors."""

from __future__ import annotations

import math
import warnings

from ._validate import positive_int, renamed, size_pair
from .chunks import BigChunk, ChunkContext, SmallChunk, SmallChunkCollector
from .errors import ConfigError
from .io.resolution import to_level0
from .io.tissue import TissueDetector, _skimage, tissue_mask

__all__ = ["RandomCropCollector"]


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
    ) -> None:
        patch = renamed("RandomCropCollector", "patch_size", patch_size, "size", size)
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

    def extract_smallchunk(
        self, call_count: int, bigchunk: BigChunk, ctx: ChunkContext
    ) -> SmallChunk | None:
        height, width = bigchunk.data.shape[:2]
        w, h = self._patch_size
        if w > width or h > height:
            return None
        info = bigchunk.info
        ds = info.get("downsample", 1.0)
        filters = self._filters
        for _ in range(self.max_tries if filters else 1):
            cx = int(ctx.rng.integers(0, width - w + 1))
            cy = int(ctx.rng.integers(0, height - h + 1))
            if not filters or self._tissue(bigchunk, ctx, cx, cy) >= self.min_tissue:
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
        return SmallChunk(bigchunk.data[cy : cy + h, cx : cx + w], sample_info, info, bigchunk.patient)

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
            f"min_tissue={self.min_tissue})"
        )
