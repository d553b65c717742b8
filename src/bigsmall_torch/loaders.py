"""Built-in big-chunk loaders."""

from __future__ import annotations

from collections.abc import Sequence
from enum import Enum

import numpy as np

from ._validate import choice, size_pair
from .annotations import ClassRegions, _shapely, patient_regions
from .chunks import BigChunk, BigChunkLoader, ChunkContext, channel_planar
from .data import Patient
from .errors import ConfigError
from .io.resolution import DEFAULT_TOLERANCE, LevelChoice, Resolution, extent, read_at, to_level0
from .io.slide import SlideCache, SlideInfo, SlideReader
from .io.tissue import TissueDetector, _skimage, tissue_mask

__all__ = ["ClassBalance", "RandomRegionLoader", "part_bounds"]


class ClassBalance(str, Enum):
    """How annotated big chunks choose the class they are placed on.

    ``AREA``: in proportion to each class's annotated area (of the slide, or of the worker's band).
    ``EQUAL``: every class present on the slide (or band) equally often, and the patches of such a
    chunk are centred on pixels of its class, so each class gets an equal share of the patches
    (class-balanced training on rare regions). The shares are equal in expectation; as each big
    chunk serves one class, they vary by about ``1 / sqrt(big chunks drawn)`` (fewer small chunks per
    big chunk balance tighter).
    """

    AREA = "area"
    EQUAL = "equal"


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
        annotations: the record key of the patient's annotation file (GeoJSON, ASAP XML or a label
            mask; see :mod:`bigsmall_torch.annotations`): chunks are centred on a point drawn
            uniformly from the annotated regions of ``classes``, and each carries the label raster
            of its region (:attr:`BigChunk.labels`, ``info["classes"]``), which
            :class:`~bigsmall_torch.RandomCropCollector` turns into ``"target"`` and ``"mask"``.
            Where regions overlap, the later class in ``classes`` wins; holes are not inside. A
            patient whose file has none of ``classes`` is refused at construction
            (:class:`~bigsmall_torch.AnnotationError`, skipped with ``on_error="skip"``).
        classes: the class names to sample and label (required with ``annotations``).
        balance: which class a chunk is placed on (:class:`ClassBalance`): ``"area"`` (default,
            in proportion to annotated area) or ``"equal"`` (equal shares per class).
        background: one of ``classes`` that also covers the slide's tissue outside every other
            class (the tissue mask of ``tissue_detector``), e.g. ``"Normal"`` for slides annotated
            only where the tumour is. Needs scikit-image (``[tissue]``).

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
        annotations: str | None = None,
        classes: Sequence[str] | None = None,
        balance: str | ClassBalance = "area",
        background: str | None = None,
    ) -> None:
        self.size = size_pair("RandomRegionLoader: size", size)
        self.annotations, self.classes = _check_classes("RandomRegionLoader", annotations, classes)
        self.balance = choice("balance", balance, ClassBalance)
        if self.annotations is None and self.balance is not ClassBalance.AREA:
            raise ConfigError(f"RandomRegionLoader: balance={balance!r} needs annotations= and classes=")
        if background is not None and (self.annotations is None or background not in self.classes):
            raise ConfigError(
                f"RandomRegionLoader: background={background!r} must be one of classes "
                f"{list(self.classes)} (and needs annotations=)"
            )
        self.background = background
        if self.annotations is not None and tissue_only:
            raise ConfigError(
                "RandomRegionLoader: tissue_only=True and annotations= are exclusive (chunks are "
                "placed on the annotated regions); use background='<class>' to sample tissue "
                "outside them as a class"
            )
        if background is not None:
            _skimage()
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
        reader = slides.get(record.path, mpp=record.info.get("mpp"))
        self.extent(reader.info)
        if self.annotations is not None:
            self._regions(patient, reader)

    @property
    def gives_labels(self) -> bool:
        """Whether big chunks carry label rasters (``annotations`` is set)."""
        return self.annotations is not None

    def _regions(self, patient: Patient, reader: SlideReader) -> ClassRegions:
        return patient_regions(
            patient.record(self.annotations or ""), self.classes, reader,
            background=self.background, tissue_detector=self.tissue_detector,
        )  # fmt: skip

    def _band(self, patient: Patient, reader: SlideReader, part: tuple[int, int]) -> tuple[int, int, int, int]:
        """The ``(x, y, width, height)`` band of ``part`` in pixels of the asked resolution: the
        slide cut along its longer side (:func:`part_bounds`), or with annotations, cut where each
        band holds an equal share of the annotated area (so no worker's band is empty)."""
        info = reader.info
        width, height = self.extent(info)
        if self.annotations is None or part[1] == 1:
            return part_bounds(width, height, part)
        index, count = part
        ds = self.choice(info).downsample
        axis = 0 if width >= height else 1
        length = width if axis == 0 else height
        cuts = self._regions(patient, reader).cuts(count, axis, length * ds)
        lo = min(max(round(cuts[index] / ds), 0), length)
        hi = min(max(round(cuts[index + 1] / ds), lo), length)
        return (lo, 0, hi - lo, height) if axis == 0 else (0, lo, width, hi - lo)

    def _on_regions(
        self,
        reader: SlideReader,
        patient: Patient,
        downsample: float,
        band: tuple[int, int, int, int],
        size: tuple[int, int],
        ctx: ChunkContext,
    ) -> tuple[int, int, int] | None:
        """Top-left (pixels of the asked resolution) of a chunk centred on a random point of an
        annotated class, and that class; None when the band has no annotated area."""
        regions = self._regions(patient, reader)
        bx, by, bw, bh = band
        box = (bx * downsample, by * downsample, bw * downsample, bh * downsample)
        areas = np.array([regions.area(k, box) for k in range(len(self.classes))])
        if not areas.sum() > 0:
            return None
        weights = areas if self.balance is ClassBalance.AREA else (areas > 0).astype(np.float64)
        k = int(np.searchsorted(np.cumsum(weights), ctx.rng.random() * weights.sum(), side="right"))
        k = min(k, len(weights) - 1)
        point = regions.sample(k, ctx.rng, box)
        if point is None:
            return None
        w, h = size
        xs, ys = self._allowed_origins(reader.info, band, size)
        px, py = point[0] / downsample, point[1] / downsample
        return _nearest_covering(xs, px, w), _nearest_covering(ys, py, h), k

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
        bx, by, bw, bh = self._band(patient, reader, ctx.part)
        w, h = min(self.size[0], bw), min(self.size[1], bh)
        focus = None
        if self.annotations is not None:
            found = self._on_regions(reader, patient, choice.downsample, (bx, by, bw, bh), (w, h), ctx)
            if found is None:
                return None
            ox, oy, focus = found
        elif self.tissue_only:
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
        labels = None
        if self.annotations is not None:
            ds = choice.downsample
            labels = self._regions(patient, reader).rasterize(ox * ds, oy * ds, w, h, ds)
            chunk_info["classes"] = self.classes
            if self.balance is ClassBalance.EQUAL:
                chunk_info["focus"] = focus
        return BigChunk(channel_planar(data), chunk_info, patient, labels)

    def __repr__(self) -> str:
        return (
            f"RandomRegionLoader(size={self.size}, {self.resolution.describe()}, "
            f"record_key={self.record_key!r}, tissue_only={self.tissue_only}, "
            f"tile_aligned={self.tile_aligned}"
            + (
                f", annotations={self.annotations!r}, classes={list(self.classes)}, "
                f"balance={self.balance.value!r}, background={self.background!r})"
                if self.annotations is not None
                else ")"
            )
        )


def _check_classes(
    what: str, annotations: str | None, classes: Sequence[str] | None
) -> tuple[str | None, tuple[str, ...]]:
    """``annotations`` and ``classes`` checked together: both or neither; classes unique strings.
    Fails here, naming the extra, when shapely is missing."""
    if annotations is None:
        if classes is not None:
            raise ConfigError(f"{what}: classes= needs annotations= (the record key of the annotation file)")
        return None, ()
    if not isinstance(annotations, str):
        raise ConfigError(f"{what}: annotations must be a record key (a str), got {annotations!r}")
    if (
        classes is None
        or isinstance(classes, str)
        or not isinstance(classes, Sequence)
        or not classes
        or not all(isinstance(c, str) and c for c in classes)
        or len(set(classes)) != len(classes)
    ):
        raise ConfigError(
            f"{what}: classes must be a non-empty list of distinct class names (str) with "
            f"annotations=, got {classes!r}"
        )
    if len(classes) > 254:
        raise ConfigError(f"{what}: at most 254 classes fit a uint8 mask, got {len(classes)}")
    _shapely()
    return annotations, tuple(classes)
