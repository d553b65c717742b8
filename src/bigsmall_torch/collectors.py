"""Built-in small-chunk collectors."""

from __future__ import annotations

from ._validate import size_pair
from .chunks import BigChunk, ChunkContext, SmallChunk, SmallChunkCollector

__all__ = ["RandomCropCollector"]


class RandomCropCollector(SmallChunkCollector):
    """Uniformly random ``size`` crops of a big chunk (with replacement).

    Args:
        size: crop width and height (an int or a ``(width, height)`` pair), in pixels of the big
            chunk's level.

    The crop is a view of the big chunk (no copy). Samples carry level-0 ``x``/``y`` of the crop's
    top-left and the ``level`` read. A big chunk smaller than ``size`` gives no crop (None).
    """

    def __init__(self, size: int | tuple[int, int]) -> None:
        self.size = size_pair("RandomCropCollector: size", size)

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
        cx = int(ctx.rng.integers(0, width - w + 1))
        cy = int(ctx.rng.integers(0, height - h + 1))
        info = bigchunk.info
        ds = info.get("downsample", 1.0)
        sample_info = {
            "x": info.get("x", 0) + round(cx * ds),
            "y": info.get("y", 0) + round(cy * ds),
            "level": info.get("level", 0),
        }
        return SmallChunk(bigchunk.data[cy : cy + h, cx : cx + w], sample_info, info, bigchunk.patient)

    def __repr__(self) -> str:
        return f"RandomCropCollector(size={self.size})"
