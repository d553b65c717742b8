"""Plain images as one-level slides: the ``"image"`` backend (the last one ``"auto"`` tries).

openslide-python falls back to its ``ImageSlide`` for files OpenSlide cannot read, and TIAToolbox
wraps them in a virtual reader; :class:`ImageReader` is this package's equivalent. It reads

* **stripped (untiled) TIFFs**, by strips: a region reads and decodes only the strips it touches
  (tifffile's decoder, any compression tifffile decodes: none, LZW, deflate, JPEG, packbits, ...),
  keeping a small LRU of decoded strips because consecutive reads overlap; uncompressed strips are
  not decoded at all, the rows asked for are read straight from the file. Page 0 is used.
* **other images Pillow opens** (PNG, JPEG, BMP, GIF, WebP, ...), decoded once at open; the reader
  holds the array (``resident_bytes``, which :class:`~bigsmall_torch.SlideCache` bounds).

Pixels become ``H x W x 3`` uint8: grayscale is replicated, palettes are looked up, 9-16-bit
samples keep their 8 most significant bits (``>> (bits - 8)``, so 16-bit is ``>> 8``), 2-7-bit
samples are stretched to 0..255, alpha is composited on white (``(c * a + 255 * (255 - a) + 127)
// 255``, nearest; premultiplied alpha: ``min(c + 255 - a, 255)``).

The reader offers a virtual pyramid: levels at downsamples 1, 2, 4, ... (exact powers of two, level
``L`` is ``floor(W / 2**L) x floor(H / 2**L)``) while the level's smaller side stays >= 256 pixels.
A pixel of level ``L`` is the mean of its ``2**L x 2**L`` level-0 block, rounded half up, computed
exactly in integers; coordinates follow the package convention (level-``L`` pixel ``int(x / ds)``).
"""

from __future__ import annotations

import math
import os
import struct
import threading
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import SlideReadError
from ._tiles import check_jpeg
from .slide import Backend, SlideInfo, _ReaderBase, tiff_codec

if TYPE_CHECKING:
    from PIL import Image

__all__ = [
    "MAX_RECORDED_MPP",
    "ImageReader",
    "box_mean",
    "composite_on_white",
    "mpp_from_density",
    "virtual_levels",
]

MAX_PIXELS = 1 << 31  # the largest image decoded at open (and the largest strip decoded at once)
MIN_LEVEL_SIDE = 256  # a virtual level exists while its smaller side has at least this many pixels
_STRIP_CACHE_BYTES = 32 << 20  # decoded strips kept per reader (the last one always)
_BAND_PIXELS = 1 << 22  # level-0 pixels per band when averaging or converting (bounds temporaries)
_TIFF_MAGIC = (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+")
_JPEG = 7
_MINISWHITE, _MINISBLACK, _RGB, _PALETTE, _YCBCR = 0, 1, 2, 3, 6
_ASSOCIATED_ALPHA, _UNASSOCIATED_ALPHA = 1, 2
_PIL_MODES = (
    "1, L, LA, La, P, PA, RGB, RGBA, RGBa, CMYK, YCbCr, LAB, HSV, I;16, I;16L, I;16B, I;16N"
)


#: Resolutions coarser than this many microns per pixel are taken for a writer's print or screen
#: default (72, 96, 150, 300 dpi are 353, 265, 169, 85 microns), not a scan: no slide records them.
MAX_RECORDED_MPP = 50.0
_MICRONS_PER_UNIT = {2: 25_400.0, 3: 10_000.0}  # TIFF ResolutionUnit inch, centimeter


def mpp_from_density(pixels_per_unit: float | None, unit: int) -> float | None:
    """Microns per pixel from a resolution (TIFF XResolution / ResolutionUnit: 2 inch, 3 centimeter),
    or None: unit NONE (1) or unknown, no or a non-positive value, or coarser than
    :data:`MAX_RECORDED_MPP` (a 72-dpi default, say)."""
    microns = _MICRONS_PER_UNIT.get(unit)
    if microns is None or pixels_per_unit is None or not pixels_per_unit > 0:
        return None
    mpp = microns / pixels_per_unit
    return mpp if math.isfinite(mpp) and mpp <= MAX_RECORDED_MPP else None


def virtual_levels(
    width: int, height: int
) -> tuple[tuple[tuple[int, int], ...], tuple[float, ...]]:
    """Level dimensions and downsamples (1, 2, 4, ...) of a ``width x height`` image: level ``L`` is
    ``floor(width / 2**L) x floor(height / 2**L)``, kept while its smaller side is >= 256."""
    dims, downsamples = [(width, height)], [1.0]
    ds = 2
    while min(width // ds, height // ds) >= MIN_LEVEL_SIDE:
        dims.append((width // ds, height // ds))
        downsamples.append(float(ds))
        ds *= 2
    return tuple(dims), tuple(downsamples)


def box_mean(image: np.ndarray, ds: int) -> np.ndarray:
    """``image`` (``H x W x C`` uint8, sides multiples of ``ds``) shrunk ``ds`` times: each pixel
    the mean of its ``ds x ds`` block, rounded half up (exact integer arithmetic).

    The block sums are built by adding strided slices (rows, then columns), in uint16 while a sum
    cannot overflow it (``ds <= 16``): several times faster than a reduction over a 5-D view."""
    h, w, channels = image.shape[0] // ds, image.shape[1] // ds, image.shape[2]
    dtype = np.uint16 if ds <= 16 else np.uint32
    rows = image.reshape(h, ds, w * ds, channels)
    sums = rows[:, 0].astype(dtype)
    for i in range(1, ds):
        sums += rows[:, i]
    cols = sums.reshape(h, w, ds, channels)
    total = cols[:, :, 0].copy()
    for i in range(1, ds):
        total += cols[:, :, i]
    n = ds * ds
    return ((total + n // 2) // n).astype(np.uint8)


def composite_on_white(
    color: np.ndarray, alpha: np.ndarray, *, premultiplied: bool = False
) -> np.ndarray:
    """``color`` (``H x W x C`` uint8) over a white background through ``alpha`` (``H x W`` uint8):
    ``(c * a + 255 * (255 - a) + 127) // 255`` (the nearest integer; there are no ties), or
    ``min(c + 255 - a, 255)`` for premultiplied colour."""
    out = np.empty(color.shape, dtype=np.uint8)
    rows = max(1, _BAND_PIXELS // max(1, color.shape[1]))
    for top in range(0, color.shape[0], rows):
        c = color[top : top + rows].astype(np.uint32)
        a = alpha[top : top + rows, :, None].astype(np.uint32)
        if premultiplied:
            out[top : top + rows] = np.minimum(c + 255 - a, 255)
        else:
            out[top : top + rows] = (c * a + 255 * (255 - a) + 127) // 255
    return out


def _to_8bit(values: np.ndarray, bits: int) -> np.ndarray:
    """Samples of ``bits`` bits as uint8: the top 8 bits of wider ones, narrower ones stretched."""
    if values.dtype == np.bool_:
        return values.astype(np.uint8) * np.uint8(255)
    if bits == 8:
        return values.astype(np.uint8, copy=False)
    if bits > 8:
        return (values >> (bits - 8)).astype(np.uint8)
    return (values.astype(np.uint16) * 255 // ((1 << bits) - 1)).astype(np.uint8)


class _Pixels:
    """How samples of a TIFF page (``rows x W x samples``) become RGB uint8."""

    def __init__(self, page: Any) -> None:
        photometric = int(page.photometric)
        samples = int(page.samplesperpixel)
        extras = tuple(int(e) for e in page.extrasamples)
        bits = int(page.bitspersample)
        allowed = (
            "allowed: 1-16-bit unsigned samples, grayscale (MINISBLACK/MINISWHITE), palette or RGB "
            "(YCbCr with JPEG compression), optionally one alpha sample, at most 4 samples"
        )
        if int(page.sampleformat) != 1 or bits > 16:
            raise ValueError(
                f"its samples are {bits}-bit of SampleFormat {int(page.sampleformat)} "
                f"(not unsigned integers); {allowed}"
            )
        if samples > 4:
            raise ValueError(f"it has {samples} samples per pixel; {allowed}")
        if photometric == _YCBCR and int(page.compression) in (6, _JPEG):
            photometric = _RGB  # tifffile's JPEG decoder gives RGB
        colors = {_MINISWHITE: 1, _MINISBLACK: 1, _PALETTE: 1, _RGB: 3}.get(photometric)
        if colors is None or samples < colors:
            raise ValueError(f"its photometric interpretation is {page.photometric!r}; {allowed}")
        self.photometric, self.colors, self.bits = photometric, colors, bits
        kind = extras[0] if samples > colors and extras else 0
        self.alpha = kind in (_ASSOCIATED_ALPHA, _UNASSOCIATED_ALPHA)  # unspecified extras: ignored
        self.premultiplied = kind == _ASSOCIATED_ALPHA
        self.colormap: np.ndarray | None = None
        if photometric == _PALETTE:
            if page.colormap is None:
                raise ValueError(f"it is a palette image without a colormap; {allowed}")
            table = np.asarray(page.colormap)
            self.colormap = (table >> 8 if table.max() > 255 else table).astype(np.uint8).T.copy()

    def rgb(self, raw: np.ndarray) -> np.ndarray:
        """``raw`` (``rows x W x samples``) as ``rows x W x 3`` uint8."""
        if self.colormap is not None:
            color = self.colormap[np.minimum(raw[:, :, 0], len(self.colormap) - 1)]
        else:
            color = _to_8bit(raw[:, :, : self.colors], self.bits)
            if self.photometric == _MINISWHITE:
                color = 255 - color
            if self.colors == 1:
                color = np.repeat(color, 3, axis=2)
        if self.alpha:
            alpha = _to_8bit(raw[:, :, self.colors], self.bits)
            color = composite_on_white(color, alpha, premultiplied=self.premultiplied)
        return np.ascontiguousarray(color)


class _StripSource:
    """Level 0 of a stripped TIFF, read by strips (see the module docstring)."""

    def __init__(self, path: Path, *, strict: bool) -> None:
        import tifffile

        self.path = path
        self.strict = strict
        with tifffile.TiffFile(path) as tif:
            if not tif.series:
                raise ValueError("the TIFF holds no image")
            page = tif.series[0].levels[0].keyframe
            if page.is_tiled:
                raise ValueError(
                    "a tiled TIFF: tiled images are read by tiffslide or openslide, not as a plain image"
                )
            if int(page.imagedepth) > 1:
                raise ValueError(
                    f"a volume of depth {page.imagedepth}; only 2-D images are allowed"
                )
            self.pixels = _Pixels(page)
            self.width, self.height = int(page.imagewidth), int(page.imagelength)
            self.rows = min(int(page.rowsperstrip) or self.height, self.height)
            self.planes = int(page.samplesperpixel) if page.planarconfig == 2 else 1
            self.per_plane = -(-self.height // self.rows)
            self.offsets = np.asarray(page.dataoffsets, dtype=np.int64)
            self.counts = np.asarray(page.databytecounts, dtype=np.int64)
            expected = self.planes * self.per_plane
            if len(self.offsets) != expected or len(self.counts) != expected:
                raise ValueError(
                    f"it has {len(self.offsets)} strip offsets and {len(self.counts)} byte counts; "
                    f"expected {self.planes} x {self.per_plane} strips of {self.rows} rows"
                )
            self.codec = tiff_codec(int(page.compression))
            self.mpp = mpp_from_density(
                _rational(page.tags.get(282)), int(page.tags.valueof(296, 2))
            )
            self._decode = page.decode  # a closure over the page's layout, usable after close
            self._tables: bytes | None = page.jpegtables
            self._jpeg = int(page.compression) == _JPEG
            self._nodata = int(page.nodata or 0)
            self._contig = int(page.samplesperpixel) if self.planes == 1 else 1
            self._dtype = np.dtype(page.dtype).newbyteorder(tif.byteorder)
            self._raw = (
                int(page.compression) == 1
                and int(page.predictor) == 1
                and int(page.fillorder) == 1
                and self.pixels.bits in (8, 16)
            )
        if not self._raw and self.rows * self.width > MAX_PIXELS:
            raise ValueError(
                f"its strips are {self.width} x {self.rows} pixels, more than the {MAX_PIXELS} "
                "pixels decoded at once; write it tiled (e.g. vips tiffsave --tile --pyramid)"
            )
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._cached_bytes = 0
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._pid = os.getpid()
        self.strips_decoded = 0  # strips (segments) decoded so far, for tests and benchmarks

    @property
    def resident_bytes(self) -> int:
        return self._cached_bytes

    def _file(self) -> int:
        if self._fd is None or self._pid != os.getpid():  # never share a descriptor through fork
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        return self._fd

    def _pread(self, index: int, start: int, size: int) -> bytes:
        """``size`` bytes from byte ``start`` of strip ``index``'s data."""
        offset = int(self.offsets[index]) + start
        data = os.pread(self._file(), size, offset)
        if len(data) < size:
            file_size = os.fstat(self._file()).st_size
            held = min(max(0, file_size - int(self.offsets[index])), int(self.counts[index]))
            raise SlideReadError(
                self.path,
                f"strip {index} is truncated: {held} of its {int(self.counts[index])} bytes at "
                f"offset {int(self.offsets[index])} are in the file ({file_size} bytes)",
            )
        return data

    def _decoded(self, strip: int) -> np.ndarray:
        """Strip ``strip`` of each plane, decoded and as RGB (from the LRU when there)."""
        cached = self._cache.get(strip)
        if cached is not None:
            self._cache.move_to_end(strip)
            return cached
        planes = [self._decode_one(plane * self.per_plane + strip) for plane in range(self.planes)]
        rgb = self.pixels.rgb(planes[0] if len(planes) == 1 else np.concatenate(planes, axis=2))
        self._cache[strip] = rgb
        self._cached_bytes += rgb.nbytes
        while self._cached_bytes > _STRIP_CACHE_BYTES and len(self._cache) > 1:
            _, dropped = self._cache.popitem(last=False)
            self._cached_bytes -= dropped.nbytes
        return rgb

    def _decode_one(self, index: int) -> np.ndarray:
        rows = min(self.rows, self.height - (index % self.per_plane) * self.rows)
        count = int(self.counts[index])
        if count == 0:  # a strip absent from the file: nodata, as tifffile gives
            return np.full((rows, self.width, self._contig), self._nodata, dtype=self._dtype)
        data = self._pread(index, 0, count)
        try:
            if self.strict and self._jpeg:  # libjpeg's corruption warnings are errors
                check_jpeg(data, self._tables[:-2] if self._tables else b"")
            decoded, _, shape = self._decode(data, index, jpegtables=self._tables)
        except Exception as exc:  # decoders raise many types
            raise SlideReadError(
                self.path, f"strip {index} ({self.codec}) cannot be decoded: {exc}"
            ) from exc
        self.strips_decoded += 1
        return np.asarray(decoded).reshape(shape)[0, :rows]

    def _raw_rows(self, strip: int, top: int, bottom: int, x: int, width: int) -> np.ndarray:
        """Rows ``top..bottom`` (of the image) in strip ``strip``, columns ``x..x+width``, read
        straight from an uncompressed file."""
        row_bytes = self.width * self._contig * self._dtype.itemsize
        planes = []
        for plane in range(self.planes):
            index = plane * self.per_plane + strip
            start, size = (top - strip * self.rows) * row_bytes, (bottom - top) * row_bytes
            count = int(self.counts[index])
            if count == 0:  # a strip absent from the file: nodata, as tifffile gives
                shape = (bottom - top, width, self._contig)
                planes.append(np.full(shape, self._nodata, dtype=self._dtype))
                continue
            if start + size > count:
                raise SlideReadError(
                    self.path,
                    f"strip {index} holds {count} bytes, fewer than its rows need "
                    f"({min(self.rows, self.height - strip * self.rows) * row_bytes})",
                )
            data = self._pread(index, start, size)
            raw = np.frombuffer(data, dtype=self._dtype).reshape(
                bottom - top, self.width, self._contig
            )
            planes.append(raw[:, x : x + width])
        return self.pixels.rgb(planes[0] if len(planes) == 1 else np.concatenate(planes, axis=2))

    def region(self, x: int, y: int, width: int, height: int) -> np.ndarray:
        out = np.empty((height, width, 3), dtype=np.uint8)
        with self._lock:
            for strip in range(y // self.rows, (y + height - 1) // self.rows + 1):
                top = max(y, strip * self.rows)
                bottom = min(y + height, (strip + 1) * self.rows, self.height)
                if self._raw:
                    out[top - y : bottom - y] = self._raw_rows(strip, top, bottom, x, width)
                else:
                    rows = self._decoded(strip)[
                        top - strip * self.rows : bottom - strip * self.rows
                    ]
                    out[top - y : bottom - y] = rows[:, x : x + width]
        return out

    def close(self) -> None:
        with self._lock:
            self._cache.clear()
            self._cached_bytes = 0
            if self._fd is not None and self._pid == os.getpid():
                os.close(self._fd)
            self._fd = None


def _rational(tag: Any) -> float | None:
    if tag is None:
        return None
    value = tag.value
    if isinstance(value, tuple) and len(value) == 2:
        return value[0] / value[1] if value[1] else None
    return float(value)


def _pil_open(path: Path) -> Image.Image:
    """``path`` opened (not decoded) by Pillow, without its decompression-bomb check (this module
    applies its own limit, :data:`MAX_PIXELS`); ``ValueError`` when Pillow knows no such format."""
    from PIL import Image

    Image.init()
    handle = open(path, "rb")  # noqa: SIM115 - owned by the image, closed with it
    prefix = handle.read(16)
    for name in Image.ID:
        factory, accept = Image.OPEN[name]
        if accept is not None:
            verdict = accept(prefix)
            if not verdict or isinstance(verdict, str):
                continue
        handle.seek(0)
        try:
            image = factory(handle, str(path))
        except (SyntaxError, IndexError, TypeError, struct.error):
            continue
        image._exclusive_fp = True  # close() closes the handle
        return image
    handle.close()
    raise ValueError("Pillow cannot identify it as an image")


def _pil_pixels(image: Image.Image) -> np.ndarray:
    """The decoded pixels of ``image``: ``H x W`` uint8 for grayscale, else ``H x W x 3`` uint8."""
    mode = image.mode
    transparent = "transparency" in image.info and mode in ("L", "RGB", "P")
    if mode in ("RGBA", "RGBa", "LA", "La", "PA") or transparent:
        rgba = np.asarray(image.convert("RGBA"))
        return composite_on_white(rgba[:, :, :3], rgba[:, :, 3])
    if mode == "RGB":
        return np.asarray(image)
    if mode in ("L", "1"):
        return np.asarray(image.convert("L"))
    if mode.startswith("I;16"):
        return (np.asarray(image).astype(np.uint16) >> 8).astype(np.uint8)
    if mode in ("P", "CMYK", "YCbCr", "LAB", "HSV"):
        return np.asarray(image.convert("RGB"))
    raise ValueError(f"its Pillow mode is {mode!r}; allowed modes: {_PIL_MODES}")


class _DecodedSource:
    """An image Pillow decodes, held in memory whole (grayscale as one channel)."""

    def __init__(self, path: Path, *, strict: bool) -> None:
        from PIL import Image

        image = _pil_open(path)
        try:
            width, height = image.size
            if width * height > MAX_PIXELS:
                raise ValueError(
                    f"it is {width} x {height} pixels, more than the {MAX_PIXELS} the image backend "
                    "decodes; convert it to a tiled pyramidal TIFF (e.g. vips tiffsave --tile --pyramid)"
                )
            self.codec = (image.format or "unknown").lower()
            try:
                image.load()
            except Image.DecompressionBombError as exc:
                raise ValueError(f"Pillow's decompression-bomb check refused it: {exc}") from exc
            except Exception as exc:  # decoders raise many types
                raise ValueError(f"Pillow cannot decode it ({self.codec}): {exc}") from exc
            if strict and image.format == "JPEG" and image.mode in ("L", "RGB"):
                try:
                    check_jpeg(path.read_bytes())
                except ValueError as exc:
                    raise ValueError(f"its JPEG data is corrupt: {exc}") from exc
            self.array = np.ascontiguousarray(_pil_pixels(image))
            dpi = image.info.get("dpi")
            self.mpp = mpp_from_density(float(dpi[0]), 2) if dpi else None
        finally:
            image.close()
        self.height, self.width = self.array.shape[:2]

    @property
    def resident_bytes(self) -> int:
        return int(self.array.nbytes)

    def region(self, x: int, y: int, width: int, height: int) -> np.ndarray:
        crop = self.array[y : y + height, x : x + width]
        if crop.ndim == 2:
            return np.repeat(crop[:, :, None], 3, axis=2)
        return crop.copy()

    def close(self) -> None:
        """Nothing to release: the array goes with the reader."""


class ImageReader(_ReaderBase):
    """A plain image (stripped TIFF, PNG, JPEG, BMP, ...) as a slide with a virtual pyramid.

    ``info.backend`` is ``"image"``, ``info.tile_size`` None (strips span the whole width; their
    height is :attr:`rows_per_strip`), ``info.codec`` the TIFF compression or Pillow's format name
    (``"png"``, ``"jpeg"``, ``"bmp"``, ...), ``info.mpp`` from the TIFF resolution tags or the
    image's dpi (see :func:`mpp_from_density`), else None.
    """

    def __init__(
        self,
        path: Path,
        cache_bytes: int | None = None,
        decode_threads: int = 1,
        strict: bool = True,
    ) -> None:
        with open(path, "rb") as handle:
            magic = handle.read(4)
        self._source: _StripSource | _DecodedSource = (
            _StripSource(path, strict=strict)
            if magic in _TIFF_MAGIC
            else _DecodedSource(path, strict=strict)
        )
        dims, downsamples = virtual_levels(self._source.width, self._source.height)
        self.info = SlideInfo(
            path=path,
            backend=Backend.IMAGE.value,
            level_dimensions=dims,
            level_downsamples=downsamples,
            mpp=self._source.mpp,
            objective_power=None,
            vendor=None,
            tile_size=None,
            codec=self._source.codec,
        )

    @property
    def resident_bytes(self) -> int:
        return self._source.resident_bytes

    @property
    def rows_per_strip(self) -> int | None:
        """Rows of a strip of a stripped TIFF; None for a decoded image."""
        return self._source.rows if isinstance(self._source, _StripSource) else None

    def read(
        self, x: int, y: int, level: int, width: int, height: int, *, planar: bool = False
    ) -> np.ndarray:
        self._check_region(x, y, level, width, height)
        ds = int(self.info.level_downsamples[level])
        lx, ly = x // ds, y // ds
        if ds == 1:
            return self._source.region(x, y, width, height)
        out = np.empty((height, width, 3), dtype=np.uint8)
        band = max(1, _BAND_PIXELS // (width * ds * ds))  # output rows averaged at once
        for top in range(0, height, band):
            rows = min(band, height - top)
            block = self._source.region(lx * ds, (ly + top) * ds, width * ds, rows * ds)
            out[top : top + rows] = box_mean(block, ds)
        return out

    def close(self) -> None:
        self._source.close()
