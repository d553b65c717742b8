"""Built-in big-chunk loaders."""

from __future__ import annotations

import numpy as np

from ._validate import size_pair
from .chunks import BigChunk, BigChunkLoader, ChunkContext, channel_planar
from .data import Patient
from .errors import ConfigError
from .io.resolution import DEFAULT_TOLERANCE, LevelChoice, Resolution, extent, read_at, to_level0
from .io.slide import SlideCache, SlideInfo, SlideReader
from .io.tissue import TissueDetector, _skimage, tissue_mask

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


def _origins(low: int, high: int, step: int | None) -> np.ndarray:
    """Candidate origins in ``[low, high]``: the multiples of ``step`` there plus both ends (every
    integer when ``step`` is None)."""
    if step is None or step <= 1:
        return np.arange(low, high + 1)
    grid = np.arange(-(-low // step) * step, high + 1, step)
    return np.unique(np.concatenate(([low], grid, [high])))


def _nearest_covering(origins: np.ndarray, point: float, length: int) -> int:
    """The origin in ``origins`` (sorted) nearest to centring a ``length`` span on ``point`` among
    those whose span still covers ``point``; when none does, the centred origin itself."""
    target = point - length / 2
    covering = origins[(origins <= point) & (point < origins + length)]
    if len(covering) == 0:  # spans shorter than the grid step: centre it, off the grid
        return int(np.clip(round(target), origins[0], origins[-1]))
    return int(covering[np.abs(covering - target).argmin()])


class RandomRegionLoader(BigChunkLoader):
    """A uniformly random ``size`` region of the patient's slide, clipped to the slide.

    Args:
        size: width and height (an int, or a ``(width, height)`` pair) in pixels of the asked resolution.
        level: the pyramid level to read (default 0 when neither ``mpp`` nor ``magnification`` is given).
        record_key: which record of the patient to read.
        mpp: read at this many microns per pixel instead of a level.
        magnification: read at this objective magnification (e.g. 20 for 20x) instead of a level.
        tolerance: relative scale difference under which a level is used as it is; beyond it the
            next finer level is read and resampled (see :mod:`bigsmall_torch.io.resolution`).
        tissue_only: place big chunks on tissue: a tissue cell of the slide's mask (see
            :mod:`bigsmall_torch.io.tissue`) is drawn uniformly, so slides and regions are weighted by
            tissue area, and the chunk is centred on it (clipped to the slide). A slide (or band) with
            no tissue gives no chunk.
        tissue_detector: how masks are computed (default :class:`~bigsmall_torch.TissueDetector`).
        tile_aligned: place chunks on the slide's tile grid (plus the far edge of the slide or band,
            so every pixel stays reachable) when a level is read as it is and the chunk is at least
            a tile long on that axis (shorter chunks are placed anywhere): a 2048-pixel chunk then
            decodes 8 x 8 tiles of 256 instead of 9 x 9, about 20% less decoding. Origins are drawn
            uniformly from the aligned positions; patches inside a chunk are not affected. With
            ``tissue_only`` the chunk is the aligned one nearest to centring the drawn tissue point
            that still contains it.

    The region lies inside the slide (its top-left is drawn so that it fits). When several workers
    share one slide the region is drawn inside this worker's band (:func:`part_bounds`) and clipped to
    it; a slide (or band) smaller than ``size`` gives chunks clipped to it. A missing level or an
    ``mpp`` asked of a slide without one is refused when the dataset is built. A record's ``info["mpp"]`` is the slide's mpp when the file
    records none (a PNG, say; see :meth:`~bigsmall_torch.SlideCache.get`).
    """

    def __init__(
        self,
        size: int | tuple[int, int],
        level: int | None = None,
        record_key: str = "wsi",
        *,
        mpp: float | None = None,
        magnification: float | None = None,
        tolerance: float = DEFAULT_TOLERANCE,
        tissue_only: bool = False,
        tissue_detector: TissueDetector | None = None,
        tile_aligned: bool = True,
    ) -> None:
        self.size = size_pair("RandomRegionLoader: size", size)
        self.tile_aligned = bool(tile_aligned)
        self.tissue_only = bool(tissue_only)
        self.tissue_detector = tissue_detector or TissueDetector()
        if self.tissue_only:
            _skimage()  # fail at construction, naming the extra, when scikit-image is missing
        self.resolution = Resolution.from_args(
            "RandomRegionLoader", level=level, mpp=mpp, magnification=magnification, tolerance=tolerance
        )
        if not isinstance(record_key, str):
            raise ConfigError(f"RandomRegionLoader: record_key must be a str, got {record_key!r}")
        self.record_key = record_key
        self._choices: dict[str, LevelChoice] = {}

    @property
    def level(self) -> int | None:
        return self.resolution.level

    @property
    def chunk_size(self) -> tuple[int, int]:
        return self.size

    def choice(self, info: SlideInfo) -> LevelChoice:
        """The level and resampling used for the slide ``info`` (cached per path)."""
        key = str(info.path)
        if key not in self._choices:
            self._choices[key] = self.resolution.choose(info)
        return self._choices[key]

    def extent(self, info: SlideInfo) -> tuple[int, int]:
        """``(width, height)`` of the slide in pixels of the asked resolution."""
        return extent(info, self.choice(info))

    def validate(self, patient: Patient, slides: SlideCache) -> None:
        """Open the slide and resolve the asked resolution (a slide without it raises). A slide
        smaller than ``size`` is fine: its chunks are clipped to it."""
        record = patient.record(self.record_key)
        self.extent(slides.get(record.path, mpp=record.info.get("mpp")).info)

    def _on_tissue(
        self,
        reader: SlideReader,
        downsample: float,
        band: tuple[int, int, int, int],
        size: tuple[int, int],
        ctx: ChunkContext,
    ) -> tuple[int, int] | None:
        """Top-left (pixels of the asked resolution) of a chunk centred on a random tissue cell."""
        bx, by, bw, bh = band
        mask = tissue_mask(reader, detector=self.tissue_detector)
        cells = mask.tissue_cells(bx * downsample, by * downsample, bw * downsample, bh * downsample)
        if len(cells) == 0:
            return None
        cx, cy = cells[int(ctx.rng.integers(len(cells)))]
        # A uniform point inside the cell, in pixels of the asked resolution.
        px = (cx + ctx.rng.random() * mask.downsample[0]) / downsample
        py = (cy + ctx.rng.random() * mask.downsample[1]) / downsample
        w, h = size
        xs, ys = self._allowed_origins(reader.info, band, size)
        return _nearest_covering(xs, px, w), _nearest_covering(ys, py, h)

    def _allowed_origins(
        self, info: SlideInfo, band: tuple[int, int, int, int], size: tuple[int, int]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Allowed chunk origins along x and along y (pixels of the asked resolution)."""
        bx, by, bw, bh = band
        tile = info.tile_size if self.tile_aligned and not self.choice(info).resampled else None
        # A grid step longer than the chunk would leave pixels between chunks unreachable.
        step_x = tile[0] if tile and tile[0] <= size[0] else None
        step_y = tile[1] if tile and tile[1] <= size[1] else None
        return _origins(bx, bx + bw - size[0], step_x), _origins(by, by + bh - size[1], step_y)

    def extract_bigchunk(self, patient: Patient, ctx: ChunkContext) -> BigChunk | None:
        record = patient.record(self.record_key)
        reader = ctx.slides.get(record.path, mpp=record.info.get("mpp"))
        info = reader.info
        choice = self.choice(info)
        bx, by, bw, bh = part_bounds(*self.extent(info), ctx.part)
        w, h = min(self.size[0], bw), min(self.size[1], bh)
        if self.tissue_only:
            placed = self._on_tissue(reader, choice.downsample, (bx, by, bw, bh), (w, h), ctx)
            if placed is None:
                return None
            ox, oy = placed
        else:
            xs, ys = self._allowed_origins(info, (bx, by, bw, bh), (w, h))
            ox = int(xs[ctx.rng.integers(len(xs))])
            oy = int(ys[ctx.rng.integers(len(ys))])
        x0, y0 = to_level0(ox, choice.downsample), to_level0(oy, choice.downsample)
        data = read_at(reader, choice, ox, oy, w, h)
        chunk_info = {
            "x": x0,
            "y": y0,
            "level": choice.level,
            "downsample": choice.downsample,
            "mpp": choice.mpp,
            "width": w,
            "height": h,
            "record_key": self.record_key,
            "path": str(record.path),
        }
        return BigChunk(channel_planar(data), chunk_info, patient)

    def __repr__(self) -> str:
        return (
            f"RandomRegionLoader(size={self.size}, {self.resolution.describe()}, "
            f"record_key={self.record_key!r}, tissue_only={self.tissue_only}, "
            f"tile_aligned={self.tile_aligned})"
        )
