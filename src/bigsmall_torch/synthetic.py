"""Synthetic pyramidal whole-slide images for tests, the demo and benchmarks.

Slides are Aperio-SVS-like BigTIFFs: level 0, a stripped thumbnail, then tiled levels that each halve
the one above exactly (level ``k`` is ``(width >> k, height >> k)``). Tiles are JPEG, YCbCr with 2x2
chroma subsampling (``compression="jpeg"``, the default), or JPEG 2000 codestreams with the
irreversible colour transform as Aperio writes them with Kakadu (``compression="jpeg2000"``: TIFF
compression 33005, which openslide reads in Aperio files and tifffile everywhere); openslide and
tiffslide decode either to identical pixels. The content is an H&E-like texture (procedural, or
crops of a real slide) painted where a low-resolution tissue mask is set, on near-white glass.
Equal arguments give equal pixels.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import IO, Any

import numpy as np
import numpy.typing as npt

from .errors import ConfigError

__all__ = [
    "SyntheticSlideInfo",
    "TileCompression",
    "TissueMode",
    "synthesize_slides",
    "write_synthetic_slide",
]

logger = logging.getLogger(__name__)

RGBArray = npt.NDArray[np.uint8]
_GENERATOR = "bigsmall_torch.synthetic/1"  # bump whenever the pixels for given arguments change
_SMALL_SIDE = 1024  # levels=None stops here; the tissue mask and the thumbnail live at this scale
_STREAM_MASK, _STREAM_TEXTURE, _STREAM_GLASS, _STREAM_TILES = range(4)
# Optical-density directions of haematoxylin and eosin (R, G, B), tuned by eye against real H&E.
_HAEMATOXYLIN = np.array([0.56, 0.72, 0.40], dtype=np.float32)
_EOSIN = np.array([0.16, 0.80, 0.52], dtype=np.float32)
# tifffile's default JPEG for RGB input: YCbCr 4:2:0, photometric YCbCr. A small buffersize keeps
# few tiles in flight (memory), more than one worker overlaps encoding.
_TIFF_OPTIONS: dict[str, Any] = {
    "photometric": "rgb", "compression": "jpeg", "subsampling": (2, 2), "metadata": None,
    "maxworkers": max(2, os.cpu_count() or 1), "buffersize": 32 << 20,
}  # fmt: skip
# Aperio's "JP2K RGB" (Kakadu): one J2K codestream per tile, RGB through the codestream's own
# irreversible colour transform (MCT), photometric RGB. imagecodecs' JPEG 2000 encoder (OpenJPEG,
# lossy: 9/7 wavelet and the colour transform) writes such codestreams, and tifffile stores them bare
# (J2K, not JP2 files) under 33003/33004/33005/34712 alike.
_APERIO_JP2K_RGB = 33005
_J2K_OPTIONS: dict[str, Any] = {
    "photometric": "rgb", "compression": _APERIO_JP2K_RGB, "metadata": None,
    "maxworkers": max(2, os.cpu_count() or 1), "buffersize": 32 << 20,
}  # fmt: skip
# quality=None: JPEG quality 90; JPEG 2000 target PSNR 32 dB, whose tiles of H&E texture are about
# as large as JPEG's at quality 90 (about 3 bits a pixel).
_DEFAULT_QUALITY = {"jpeg": 90, "jpeg2000": 32}


class TileCompression(str, Enum):
    """How the tiles of a synthetic slide are compressed (the thumbnail is JPEG either way)."""

    JPEG = "jpeg"  # TIFF compression 7, YCbCr 4:2:0
    JPEG2000 = "jpeg2000"  # TIFF compression 33005: Aperio's JPEG 2000 with the colour transform


class TissueMode(str, Enum):
    """Where tissue is painted: a few smooth random blobs, everywhere, or nowhere."""

    BLOBS = "blobs"
    FULL = "full"
    NONE = "none"


@dataclass(frozen=True)
class SyntheticSlideInfo:
    """What was written: ground truth for tests."""

    path: Path
    width: int
    height: int
    tile_size: int
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]  # exactly 1, 2, 4, ...
    mpp: float | None
    quality: int  # JPEG quality, or the target PSNR in dB of JPEG 2000 tiles
    compression: TileCompression
    seed: int
    tissue: TissueMode
    texture_source: Path | None
    tissue_fraction: float  # of the level-0 area, exact (from tissue_mask)
    mask_downsample: int  # each tissue_mask cell covers this many level-0 pixels squared
    tissue_mask: npt.NDArray[np.bool_] = field(repr=False, compare=False)
    paint: tuple[tuple[dict[str, Any], tuple[int, int, int]], ...] = ()

    def parameters(self) -> dict[str, Any]:
        """The arguments that determine the file (stored in it to detect re-use)."""
        names = ("width", "height", "tile_size", "mpp", "quality", "seed")
        return {
            "generator": _GENERATOR,
            **{name: getattr(self, name) for name in names},
            "levels": len(self.level_dimensions),
            "compression": self.compression.value,
            "tissue": self.tissue.value,
            "texture_source": None if self.texture_source is None else str(self.texture_source),
            **({"paint": [[g, list(c)] for g, c in self.paint]} if self.paint else {}),
        }


def write_synthetic_slide(
    path: str | os.PathLike[str],
    *,
    width: int = 4096,
    height: int = 4096,
    tile_size: int = 256,
    levels: int | None = None,
    mpp: float | None = 0.5,
    quality: int | None = None,
    compression: TileCompression | str = TileCompression.JPEG,
    seed: int = 0,
    tissue: TissueMode | str = TissueMode.BLOBS,
    texture_source: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    paint: Sequence[tuple[Mapping[str, Any], tuple[int, int, int]]] = (),
) -> SyntheticSlideInfo:
    """Write one synthetic slide to ``path`` and describe it.

    ``levels=None`` adds levels until the largest side is at most 1024; width and height must be
    multiples of ``2**(levels - 1)``. ``mpp=None`` writes no resolution at all. ``texture_source``,
    a slide tiffslide can read, replaces the procedural texture with flipped/rotated crops of it.
    ``compression`` is ``"jpeg"`` or ``"jpeg2000"`` (Aperio's TIFF compression 33005, which
    openslide and tiffslide both read); ``quality`` (1-100) is the JPEG quality, or for JPEG 2000
    the target PSNR of each tile in dB (OpenJPEG's fixed-quality mode); None: 90 for JPEG, 32 dB
    for JPEG 2000.
    ``paint``: ``(geometry, (r, g, b))`` pairs, each a GeoJSON Polygon or MultiPolygon in level-0
    pixels, filled in that solid colour over the texture, later ones over earlier ones (pixels whose
    centre is inside, holes left alone): regions of known class for annotation tests. Needs shapely.
    The file appears (atomically) only when complete.
    """
    info = _plan(Path(path), width, height, tile_size, levels, mpp, quality, compression, seed,
                 tissue, texture_source, paint)  # fmt: skip
    if info.path.exists() and not overwrite:
        raise ConfigError(f"path={str(info.path)!r} exists; pass overwrite=True to replace it")
    _write(info)
    return info


def synthesize_slides(
    folder: str | os.PathLike[str],
    n: int = 4,
    *,
    prefix: str = "synthetic",
    width: int = 4096,
    height: int = 4096,
    tile_size: int = 256,
    levels: int | None = None,
    mpp: float | None = 0.5,
    quality: int | None = None,
    compression: TileCompression | str = TileCompression.JPEG,
    seed: int = 0,
    tissue: TissueMode | str = TissueMode.BLOBS,
    texture_source: str | os.PathLike[str] | None = None,
) -> list[SyntheticSlideInfo]:
    """Write slides ``{prefix}_{i:03d}.tiff`` with seeds ``seed + i``, ``i < n``, into ``folder``
    (the other arguments as for :func:`write_synthetic_slide`).

    A file there already written with the same parameters (the compression among them) is re-used;
    any other is replaced.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ConfigError(f"n={n!r} is invalid; expected an int >= 0")
    if not prefix or Path(prefix).name != prefix:
        raise ConfigError(f"prefix={prefix!r} is invalid; expected a non-empty file name part")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    infos = []
    for i in range(n):
        info = _plan(folder / f"{prefix}_{i:03d}.tiff", width, height, tile_size, levels, mpp,
                     quality, compression, seed + i, tissue, texture_source)  # fmt: skip
        if _stored_parameters(info.path) == info.parameters():
            logger.info("re-using %s", info.path)
        else:
            _write(info)
        infos.append(info)
    return infos


# -- planning: validation, geometry, tissue mask --------------------------------------------------


def _check_int(
    name: str, value: Any, *, minimum: int, maximum: float = math.inf, step: int = 1
) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        ok = False
    else:
        ok = bool(minimum <= value <= maximum and value % step == 0)
    if not ok:
        allowed = (
            f"an int >= {minimum}" if maximum == math.inf else f"an int in {minimum}..{maximum}"
        )
        allowed += f" and a multiple of {step}" if step > 1 else ""
        raise ConfigError(f"{name}={value!r} is invalid; expected {allowed}")
    return int(value)


def _plan(
    path: Path,
    width: int,
    height: int,
    tile_size: int,
    levels: int | None,
    mpp: float | None,
    quality: int | None,
    compression: TileCompression | str,
    seed: int,
    tissue: TissueMode | str,
    texture_source: str | os.PathLike[str] | None,
    paint: Sequence[tuple[Mapping[str, Any], tuple[int, int, int]]] = (),
) -> SyntheticSlideInfo:
    """Validate the arguments and work out everything but the pixels."""
    width = _check_int("width", width, minimum=1)
    height = _check_int("height", height, minimum=1)
    tile_size = _check_int("tile_size", tile_size, minimum=16, step=16)
    try:
        codec = TileCompression(compression)
    except ValueError:
        allowed = ", ".join(repr(c.value) for c in TileCompression)
        raise ConfigError(
            f"compression={compression!r} is invalid; expected one of {allowed}"
        ) from None
    if quality is None:
        quality = _DEFAULT_QUALITY[codec.value]
    quality = _check_int("quality", quality, minimum=1, maximum=100)
    seed = _check_int("seed", seed, minimum=0)
    if mpp is not None and (isinstance(mpp, bool) or not isinstance(mpp, (int, float))
                            or not 0 < mpp < math.inf):  # fmt: skip
        raise ConfigError(f"mpp={mpp!r} is invalid; expected None or a finite number > 0")
    try:
        mode = TissueMode(tissue)
    except ValueError:
        allowed = ", ".join(repr(m.value) for m in TissueMode)
        raise ConfigError(f"tissue={tissue!r} is invalid; expected one of {allowed}") from None
    source = None if texture_source is None else Path(texture_source)
    if source is not None and not source.is_file():
        raise ConfigError(f"texture_source={str(source)!r} is not a file; expected a slide path")
    downsample, small_level = _small_level(width, height)
    n_levels = _check_int("levels", small_level + 1 if levels is None else levels, minimum=1)
    step = 1 << (n_levels - 1)
    if width % step or height % step:
        raise ConfigError(
            f"levels={levels!r} is invalid for width={width}, height={height}: {n_levels} levels,"
            f" each halving exactly, need multiples of {step}; change the size or the levels"
        )
    mask = _tissue_mask(mode, -(-height // downsample), -(-width // downsample), seed)
    # Exact covered area: the last row and column of mask cells may hang over the border.
    rows = np.minimum(downsample, height - downsample * np.arange(mask.shape[0]))
    cols = np.minimum(downsample, width - downsample * np.arange(mask.shape[1]))
    return SyntheticSlideInfo(
        path=path,
        width=width,
        height=height,
        tile_size=tile_size,
        level_dimensions=tuple((width >> k, height >> k) for k in range(n_levels)),
        level_downsamples=tuple(float(1 << k) for k in range(n_levels)),
        mpp=None if mpp is None else float(mpp),
        quality=quality,
        compression=codec,
        seed=seed,
        tissue=mode,
        texture_source=source,
        tissue_fraction=float(rows @ mask.astype(np.int64) @ cols) / (width * height),
        mask_downsample=downsample,
        tissue_mask=mask,
        paint=_check_paint(paint),
    )


def _check_paint(paint: Any) -> tuple[tuple[dict[str, Any], tuple[int, int, int]], ...]:
    """``paint`` as JSON-ready (geometry, colour) pairs, or a :class:`ConfigError`."""
    checked: list[Any] = []
    for item in paint:
        try:
            geometry, color = item
            geometry = json.loads(json.dumps(dict(geometry)))
            rgb = tuple(int(c) for c in color)
            ok = geometry.get("type") in ("Polygon", "MultiPolygon") and len(rgb) == 3
            ok = ok and all(0 <= c <= 255 for c in rgb)
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ConfigError(
                f"paint item {item!r} is invalid; expected (a GeoJSON Polygon or MultiPolygon "
                "mapping, (r, g, b) with values 0-255)"
            )
        checked.append((geometry, rgb))
    return tuple(checked)


def _small_level(width: int, height: int) -> tuple[int, int]:
    """Downsample ``2**k`` and ``k`` of the first level whose largest side is at most 1024."""
    k = (max(width, height) // (_SMALL_SIDE + 1)).bit_length()
    return 1 << k, k


def _tissue_mask(mode: TissueMode, rows: int, cols: int, seed: int) -> npt.NDArray[np.bool_]:
    """Blobs: a sum of random anisotropic Gaussians with wavy borders, cut at a random 30-60 %."""
    if mode is not TissueMode.BLOBS:
        return np.full((rows, cols), mode is TissueMode.FULL)
    rng = np.random.default_rng(np.random.SeedSequence([seed, _STREAM_MASK]))
    scale = max(rows, cols)
    y, x = np.mgrid[0:rows, 0:cols] / scale
    heat = np.zeros((rows, cols))
    for _ in range(int(rng.integers(2, 6))):
        cy, cx = rng.uniform(0.15, 0.85, 2) * (rows / scale, cols / scale)
        sy, sx = rng.uniform(0.08, 0.25, 2)
        cos, sin = math.cos(angle := rng.uniform(0, math.pi)), math.sin(angle)
        u, v = (y - cy) * cos + (x - cx) * sin, (x - cx) * cos - (y - cy) * sin
        heat += rng.uniform(0.6, 1.0) * np.exp(-0.5 * ((u / sy) ** 2 + (v / sx) ** 2))
    for _ in range(6):
        fy, fx = rng.uniform(-6.0, 6.0, 2)
        heat += 0.05 * np.sin(2 * math.pi * (fy * y + fx * x) + rng.uniform(0, 2 * math.pi))
    return heat > np.quantile(heat, 1.0 - rng.uniform(0.3, 0.6))


# -- texture --------------------------------------------------------------------------------------


def _blur(image: np.ndarray, sigma_y: float, sigma_x: float) -> np.ndarray:
    """Periodic (FFT) Gaussian blur, so textures tile without seams."""
    fy = np.fft.fftfreq(image.shape[0]).astype(np.float32)[:, None]
    fx = np.fft.rfftfreq(image.shape[1]).astype(np.float32)[None, :]
    gain = np.exp(-2 * np.pi**2 * ((sigma_y * fy) ** 2 + (sigma_x * fx) ** 2))
    return np.fft.irfft2(np.fft.rfft2(image) * gain, s=image.shape)


def _noise(rng: np.random.Generator, side: int, sigma_y: float, sigma_x: float) -> np.ndarray:
    out = _blur(rng.standard_normal((side, side), dtype=np.float32), sigma_y, sigma_x)
    return (out - out.mean()) / out.std()


@functools.lru_cache(maxsize=4)
def _procedural_texture(seed: int, side: int = 1024) -> RGBArray:
    """H&E-like texture: eosin fibres with pale patches, haematoxylin nuclei, stain noise."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, _STREAM_TEXTURE]))
    fibres, mid, coarse = (_noise(rng, side, *s) for s in ((2, 6), (8, 8), (40, 40)))
    pale = 0.6 / (1 + np.exp(-5 * (_noise(rng, side, 25, 25) - 1.0)))
    eosin = np.clip(0.32 + 0.1 * mid + 0.12 * fibres + 0.08 * coarse, 0.03, None)
    haem = 0.16 + 0.04 * mid
    crowding = np.clip(0.4 + 0.6 * _noise(rng, side, 60, 60), 0.05, None)
    for per_pixel, sigma, gain in ((1 / 500, 2.5, crowding), (1 / 4000, 4.0, 0.8)):
        count = int(side * side * per_pixel)
        spikes = np.zeros((side, side), dtype=np.float32)
        spots = (rng.integers(0, side, count), rng.integers(0, side, count))
        np.add.at(spikes, spots, rng.uniform(0.6, 1.0, count))
        haem = haem + gain * np.clip(2 * np.pi * sigma**2 * _blur(spikes, sigma, sigma), 0, 1.2)
    density = (eosin * (1 - pale))[..., None] * _EOSIN + (haem * (1 - pale))[
        ..., None
    ] * _HAEMATOXYLIN
    density += rng.normal(0, 0.02, density.shape).astype(np.float32)
    return np.clip(255 * 10 ** (-density) + 0.5, 0, 255).astype(np.uint8)


@functools.lru_cache(maxsize=4)
def _glass(seed: int, side: int = 512) -> RGBArray:
    """Near-white background with slight shading and sensor noise."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, _STREAM_GLASS]))
    shade = 1.5 * _noise(rng, side, 30, 30)[..., None] + rng.normal(0, 1.5, (side, side, 3))
    return np.clip(np.array([238.0, 236.0, 240.0]) + shade + 0.5, 0, 255).astype(np.uint8)


@functools.lru_cache(maxsize=2)
def _source_texture(path: Path, side: int = 3072) -> RGBArray:
    """A central level-0 crop of a real slide."""
    import tiffslide  # heavy; only needed here

    with tiffslide.TiffSlide(path) as slide:
        w, h = slide.dimensions
        cw, ch = min(w, side), min(h, side)
        region = slide.read_region(((w - cw) // 2, (h - ch) // 2), 0, (cw, ch), as_array=True)
    return np.ascontiguousarray(np.asarray(region)[..., :3])


def _dihedral(image: np.ndarray) -> list[np.ndarray]:
    """The 8 flips/rotations of ``image`` (first two axes), as contiguous arrays."""
    return [np.ascontiguousarray(np.rot90(t, k)) for t in (image, image[:, ::-1]) for k in range(4)]


class _PatchSource:
    """Random square crops of a texture under its 8 flips/rotations; optionally stained ones only."""

    def __init__(self, texture: RGBArray, patch: int, *, stained_only: bool) -> None:
        if min(texture.shape[:2]) < patch:
            raise ConfigError(f"texture of shape {texture.shape} is smaller than a {patch} patch")
        self.patch = patch
        self._views = _dihedral(texture)
        cells = texture[4::8, 4::8]  # one sample per 8x8 cell is enough to rank patches
        stained = (np.ptp(cells, axis=-1) > 20) | (cells.mean(-1) < 200) | (not stained_only)
        self._corners = [
            self._most_stained(s, v.shape)
            for s, v in zip(_dihedral(stained), self._views, strict=True)
        ]

    def _most_stained(
        self, stained: npt.NDArray[np.bool_], shape: tuple[int, ...]
    ) -> npt.NDArray[np.intp]:
        """Top-left corners, on the 8-pixel grid, of the patches that are >= 90 % stained."""
        p, n = -(-self.patch // 8), stained.shape
        summed = np.pad(stained.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
        ys, xs = np.mgrid[
            0 : (shape[0] - self.patch) // 8 + 1, 0 : (shape[1] - self.patch) // 8 + 1
        ]
        ye, xe = np.minimum(ys + p, n[0]), np.minimum(xs + p, n[1])
        covered = summed[ye, xe] - summed[ys, xe] - summed[ye, xs] + summed[ys, xs]
        keep = covered.ravel() >= min(0.9 * p * p, covered.max())
        return 8 * np.stack([ys.ravel(), xs.ravel()], axis=1)[keep]

    def draw(self, rng: np.random.Generator, count: int) -> list[RGBArray]:
        crops = []
        for v, r in zip(rng.integers(0, 8, count), rng.random(count), strict=True):
            y, x = self._corners[v][int(r * len(self._corners[v]))]
            crops.append(self._views[v][y : y + self.patch, x : x + self.patch])
        return crops


# -- writing --------------------------------------------------------------------------------------


class _Spool:
    """A reduced level: halved from the rows of the level above, parked in a temporary file."""

    def __init__(self, width: int, file: IO[bytes]) -> None:
        self.width = width
        self._file = file
        self._odd_row: RGBArray | None = None

    def push(self, above: RGBArray) -> RGBArray:
        if self._odd_row is not None:
            above = np.concatenate([self._odd_row, above])
        even = above.shape[0] // 2 * 2
        self._odd_row = above[even:].copy() if even < above.shape[0] else None
        pairs = np.add(above[0:even:2], above[1:even:2], dtype=np.uint16)
        quads = pairs[:, 0 : 2 * self.width : 2] + pairs[:, 1 : 2 * self.width : 2]
        half = ((quads + 2) >> 2).astype(np.uint8)
        self._file.write(half.tobytes())
        return half

    def bands(self, rows: int) -> Iterator[RGBArray]:
        self._file.seek(0)
        while chunk := self._file.read(rows * self.width * 3):
            yield np.frombuffer(chunk, dtype=np.uint8).reshape(-1, self.width, 3)


def _level0_bands(info: SyntheticSlideInfo) -> Iterator[RGBArray]:
    """Rows of ``tile_size`` pixels, padded to whole tiles: texture where the mask is set, else glass."""
    ts, d = info.tile_size, info.mask_downsample
    patch = 16 * max(j for j in range(1, 17) if ts // 16 % j == 0)  # divides ts, <= 256
    if info.texture_source is None:
        texture = _PatchSource(_procedural_texture(info.seed), patch, stained_only=False)
    else:
        texture = _PatchSource(_source_texture(info.texture_source), patch, stained_only=True)
    glass = _PatchSource(_glass(info.seed), patch, stained_only=False)
    painter = None
    if info.paint:
        from shapely.geometry import shape

        from .annotations import ClassRegions

        painter = ClassRegions(
            [str(k) for k in range(len(info.paint))], [shape(g) for g, _ in info.paint]
        )
    padded_width = -(-info.width // ts) * ts
    mask = np.zeros((-(-(info.height + ts) // d), -(-padded_width // d)), dtype=bool)
    mask[: info.tissue_mask.shape[0], : info.tissue_mask.shape[1]] = info.tissue_mask
    for row, top in enumerate(range(0, info.height, ts)):
        rng = np.random.default_rng(np.random.SeedSequence([info.seed, _STREAM_TILES, row]))
        band = np.empty((ts, padded_width, 3), dtype=np.uint8)
        cells = mask[top // d : (top + ts - 1) // d + 1]
        in_tissue = np.repeat(np.repeat(cells, d, 0), d, 1)[top % d : top % d + ts, :padded_width]
        n_cols = padded_width // patch
        for y in range(0, ts, patch):
            tissues, backgrounds = texture.draw(rng, n_cols), glass.draw(rng, n_cols)
            for i, x in enumerate(range(0, padded_width, patch)):
                where = in_tissue[y : y + patch, x : x + patch]
                out = band[y : y + patch, x : x + patch]
                inside = bool(where.all())
                out[...] = tissues[i] if inside else backgrounds[i]
                if not inside and where.any():
                    np.copyto(out, tissues[i], where=where[..., None])
        if painter is not None:
            labels = painter.rasterize(0, top, padded_width, ts)
            for k, (_, color) in enumerate(info.paint):
                band[labels == k + 1] = color
        yield band


def _tiles(bands: Iterator[RGBArray], tile_size: int) -> Iterator[RGBArray]:
    for band in bands:
        for left in range(0, band.shape[1], tile_size):
            yield band[:, left : left + tile_size]


def _description(info: SyntheticSlideInfo, level: int | None) -> str:
    """Aperio-style ImageDescription (``None``: thumbnail); level 0 carries mpp and parameters."""
    w, h, ts, q = info.width, info.height, info.tile_size, info.quality
    text = f"Aperio Image Library v12.0.15 (bigsmall_torch synthetic)\r\n{w}x{h} [0,0 {w}x{h}]"
    codec = "J2K/KDU" if info.compression is TileCompression.JPEG2000 else "JPEG/YCC"
    if level is None:
        return f"{text} -> thumbnail"
    if level > 0:
        lw, lh = info.level_dimensions[level]
        return f"{text} ({ts}x{ts}) -> {lw}x{lh} {codec} Q={q}"
    text += f" ({ts}x{ts}) {codec} Q={q}"
    if info.mpp is not None:
        text += f"|AppMag = {10 / info.mpp:g}|MPP = {info.mpp!r}"
    params = json.dumps(info.parameters(), sort_keys=True, separators=(",", ":"))
    # "|" separates Aperio fields and " = " splits them: escape both inside the JSON.
    return f"{text}|SyntheticParams = " + params.replace("|", "\\u007c").replace("=", "\\u003d")


def _stored_parameters(path: Path) -> dict[str, Any] | None:
    """The parameters a synthetic slide was written with; None if ``path`` is not one."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            description = tif.pages.first.description
    except (OSError, ValueError, tifffile.TiffFileError):
        return None
    for item in description.split("|"):
        key, _, value = item.partition(" = ")
        if key.strip() == "SyntheticParams":
            try:
                params: dict[str, Any] = json.loads(value)
            except json.JSONDecodeError:
                return None
            return params
    return None


def _write(info: SyntheticSlideInfo) -> None:
    """Stream level 0 tile row by tile row while halving it into spools for the lower levels."""
    import tifffile

    ts, n_levels = info.tile_size, len(info.level_dimensions)
    thumb_level = _small_level(info.width, info.height)[1]
    if info.compression is TileCompression.JPEG2000:
        tiled = {**_J2K_OPTIONS, "compressionargs": {"level": info.quality}}
        jpeg = {**_TIFF_OPTIONS, "compressionargs": {"level": _DEFAULT_QUALITY["jpeg"]}}
    else:
        tiled = jpeg = {**_TIFF_OPTIONS, "compressionargs": {"level": info.quality}}
    partial = info.path.with_name(info.path.name + ".partial")
    logger.info("writing %s (%dx%d, %d levels)", info.path, info.width, info.height, n_levels)
    thumbnail: list[RGBArray] = []  # filled here only when level 0 is small enough to be it

    def level0(spools: list[_Spool]) -> Iterator[RGBArray]:
        for top, band in zip(range(0, info.height, ts), _level0_bands(info), strict=True):
            rows = band[: min(ts, info.height - top), : info.width]
            if thumb_level == 0:
                thumbnail.append(rows.copy())
            for spool in spools:
                rows = spool.push(rows)
            yield band

    try:
        with ExitStack() as stack:
            spools = [
                _Spool(
                    info.width >> k, stack.enter_context(tempfile.TemporaryFile(dir=partial.parent))
                )
                for k in range(1, max(n_levels, thumb_level + 1))
            ]
            tif = stack.enter_context(tifffile.TiffWriter(partial, bigtiff=True))
            for k in range(n_levels):
                w, h = info.level_dimensions[k]
                bands = level0(spools) if k == 0 else spools[k - 1].bands(ts)
                tif.write(_tiles(bands, ts), shape=(h, w, 3), dtype=np.uint8, tile=(ts, ts),
                          description=_description(info, k), **tiled)  # fmt: skip
                if k == 0:  # SVS order: level 0, thumbnail, other levels
                    if thumb_level > 0:
                        thumbnail = list(spools[thumb_level - 1].bands(_SMALL_SIDE))
                    # The thumbnail stays JPEG, as in Aperio's JPEG 2000 slides.
                    tif.write(np.concatenate(thumbnail), description=_description(info, None),
                              **jpeg)  # fmt: skip
        os.replace(partial, info.path)
    finally:
        partial.unlink(missing_ok=True)
