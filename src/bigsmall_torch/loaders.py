"""Built-in big-chunk loaders."""

from __future__ import annotations

from ._validate import positive_int, size_pair
from .chunks import BigChunk, BigChunkLoader, ChunkContext, channel_planar
from .data import Patient
from .errors import ConfigError
from .slide import SlideCache

__all__ = ["RandomRegionLoader", "part_bounds"]


def part_bounds(width: int, height: int, part: tuple[int, int]) -> tuple[int, int, int, int]:
    """The ``(x, y, width, height)`` band of part ``part = (index, count)`` of a ``width x height`` image.

    The image is cut into ``count`` bands of (nearly) equal size across its longer side, so that
    workers sharing one slide own disjoint pixels.
    """
    index, count = part
    if count == 1:
        return 0, 0, width, height
    if width >= height:
        x0, x1 = index * width // count, (index + 1) * width // count
        return x0, 0, x1 - x0, height
    y0, y1 = index * height // count, (index + 1) * height // count
    return 0, y0, width, y1 - y0


class RandomRegionLoader(BigChunkLoader):
    """A uniformly random ``size`` region of the patient's slide at ``level``, clipped to the slide.

    Args:
        size: width and height (an int, or a ``(width, height)`` pair) in pixels of ``level``.
        level: the pyramid level to read.
        record_key: which record of the patient to read.

    The region lies inside the slide (its top-left is drawn so that it fits). When several workers
    share one slide the region is drawn inside this worker's band (:func:`part_bounds`) and clipped to
    it. A ``size`` larger than a slide's level is refused when the dataset is built.
    """

    def __init__(self, size: int | tuple[int, int], level: int = 0, record_key: str = "wsi") -> None:
        self.size = size_pair("RandomRegionLoader: size", size)
        self.level = positive_int("RandomRegionLoader: level", level, minimum=0)
        if not isinstance(record_key, str):
            raise ConfigError(f"RandomRegionLoader: record_key must be a str, got {record_key!r}")
        self.record_key = record_key

    @property
    def chunk_size(self) -> tuple[int, int]:
        return self.size

    def validate(self, patient: Patient, slides: SlideCache) -> None:
        reader = slides.get(patient.record(self.record_key).path)
        info = reader.info
        if self.level >= info.level_count:
            raise ConfigError(
                f"RandomRegionLoader: level={self.level} does not exist in {info.path} "
                f"(levels 0..{info.level_count - 1})"
            )
        lw, lh = info.level_dimensions[self.level]
        if self.size[0] > lw or self.size[1] > lh:
            raise ConfigError(
                f"RandomRegionLoader: size={self.size[0]}x{self.size[1]} is larger than level "
                f"{self.level} of {info.path} ({lw}x{lh}); use a smaller size or a lower level"
            )

    def extract_bigchunk(self, patient: Patient, ctx: ChunkContext) -> BigChunk:
        record = patient.record(self.record_key)
        reader = ctx.slides.get(record.path)
        info = reader.info
        lw, lh = info.level_dimensions[self.level]
        ds = info.level_downsamples[self.level]
        bx, by, bw, bh = part_bounds(lw, lh, ctx.part)
        w, h = min(self.size[0], bw), min(self.size[1], bh)
        lx = bx + int(ctx.rng.integers(0, bw - w + 1))
        ly = by + int(ctx.rng.integers(0, bh - h + 1))
        x0, y0 = round(lx * ds), round(ly * ds)
        data = channel_planar(reader.read(x0, y0, self.level, w, h))
        chunk_info = {
            "x": x0,
            "y": y0,
            "level": self.level,
            "downsample": ds,
            "width": w,
            "height": h,
            "record_key": self.record_key,
            "path": str(record.path),
        }
        return BigChunk(data, chunk_info, patient)

    def __repr__(self) -> str:
        return f"RandomRegionLoader(size={self.size}, level={self.level}, record_key={self.record_key!r})"
