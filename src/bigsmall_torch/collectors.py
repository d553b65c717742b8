"""Built-in small-chunk collectors."""

from __future__ import annotations

import math

from ._validate import positive_int, size_pair
from .chunks import BigChunk, ChunkContext, SmallChunk, SmallChunkCollector
from .errors import ConfigError
from .io.tissue import TissueDetector, _skimage, tissue_mask

__all__ = ["RandomCropCollector"]


class RandomCropCollector(SmallChunkCollector):
    """Uniformly random ``size`` crops of a big chunk (with replacement).

    Args:
        size: crop width and height (an int or a ``(width, height)`` pair), in pixels of the big
            chunk's level.
        min_tissue: reject crops whose tissue fraction (from the slide's tissue mask) is below this;
            after ``max_tries`` rejected draws the big chunk is retired (None).
        max_tries: draws per sample when ``min_tissue > 0``.
        tissue_detector: how masks are computed (default :class:`~bigsmall_torch.TissueDetector`).

    The crop is a view of the big chunk (no copy). Samples carry level-0 ``x``/``y`` of the crop's
    top-left, the ``level`` read and the ``mpp`` of the pixels (NaN when the slide has none). A big chunk smaller than ``size`` gives no crop (None).
    """

    def __init__(
        self,
        size: int | tuple[int, int],
        *,
        min_tissue: float = 0.0,
        max_tries: int = 10,
        tissue_detector: TissueDetector | None = None,
    ) -> None:
        self.size = size_pair("RandomCropCollector: size", size)
        if isinstance(min_tissue, bool) or not isinstance(min_tissue, (int, float)) or not 0 <= min_tissue <= 1:
            raise ConfigError(f"RandomCropCollector: min_tissue must be in [0, 1], got {min_tissue!r}")
        self.min_tissue = float(min_tissue)
        self.max_tries = positive_int("RandomCropCollector: max_tries", max_tries)
        self.tissue_detector = tissue_detector or TissueDetector()
        if self.min_tissue > 0:
            _skimage()  # fail at construction, naming the extra, when scikit-image is missing

    @property
    def patch_size(self) -> tuple[int, int]:
        return self.size

    def extract_smallchunk(
        self, call_count: int, bigchunk: BigChunk, ctx: ChunkContext
    ) -> SmallChunk | None:
        height, width = bigchunk.data.shape[:2]
        w, h = self.size
        if w > width or h > height:
            return None
        info = bigchunk.info
        ds = info.get("downsample", 1.0)
        for _ in range(self.max_tries if self.min_tissue > 0 else 1):
            cx = int(ctx.rng.integers(0, width - w + 1))
            cy = int(ctx.rng.integers(0, height - h + 1))
            if self.min_tissue == 0 or self._tissue(bigchunk, ctx, cx, cy) >= self.min_tissue:
                break
        else:
            return None  # mostly background after max_tries: move on to another big chunk
        sample_info = {
            "x": info.get("x", 0) + round(cx * ds),
            "y": info.get("y", 0) + round(cy * ds),
            "level": info.get("level", 0),
            "mpp": info.get("mpp", math.nan),
        }
        return SmallChunk(bigchunk.data[cy : cy + h, cx : cx + w], sample_info, info, bigchunk.patient)

    def _tissue(self, bigchunk: BigChunk, ctx: ChunkContext, cx: int, cy: int) -> float:
        """Tissue fraction of the crop at ``(cx, cy)`` of ``bigchunk``."""
        info = bigchunk.info
        if "path" not in info:
            raise ConfigError(
                "RandomCropCollector: min_tissue needs the big chunk's info['path'] (the slide), "
                f"which {sorted(info)} lacks"
            )
        mask = tissue_mask(ctx.slides.get(info["path"]), detector=self.tissue_detector)
        ds = info.get("downsample", 1.0)
        return mask.fraction_in(
            info.get("x", 0) + cx * ds, info.get("y", 0) + cy * ds, self.size[0] * ds, self.size[1] * ds
        )

    def __repr__(self) -> str:
        return f"RandomCropCollector(size={self.size}, min_tissue={self.min_tissue})"
