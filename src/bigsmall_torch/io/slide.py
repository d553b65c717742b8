"""Slide I/O: one small reader protocol over tiffslide, openslide and plain images, and a per-worker
LRU of handles.

Everything in bigsmall_torch that touches a slide file goes through :func:`open_slide`. Readers return
``H x W x 3`` ``uint8`` numpy arrays; locations are level-0 pixels, sizes are pixels of the level read.
Plain images (stripped TIFFs, PNG, JPEG, BMP, ...) are read by the ``"image"`` backend
(:mod:`bigsmall_torch.io._image`) as one-level slides with a virtual pyramid.
"""

from __future__ import annotations

import logging
import math
import numbers
import os
import struct
import threading
from collections import OrderedDict
from dataclasses import dataclass, replace
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from .._paths import RemotePath, as_path
from ..errors import ConfigError, RemoteError, SlideOpenError, SlideReadError
from ._tiles import TileDecoder, TiledRegion, check_page_tiles

if TYPE_CHECKING:
    from ._image import ImageReader
    from .remote import RemoteOptions

__all__ = [
    "Backend",
    "SlideCache",
    "SlideInfo",
    "SlideReader",
    "check_mpp_hint",
    "open_slide",
    "slide_info",
    "tiff_codec",
]

logger = logging.getLogger(__name__)


class Backend(str, Enum):
    """Which library reads a slide. ``AUTO`` tries tiffslide, then openslide, then ``IMAGE`` (plain
    images as one-level slides: stripped TIFFs, PNG, JPEG, BMP, ...), per file."""

    AUTO = "auto"
    OPENSLIDE = "openslide"
    TIFFSLIDE = "tiffslide"
    IMAGE = "image"


@dataclass(frozen=True)
class SlideInfo:
    """Metadata of one slide, gathered in one place (picklable, no open handle)."""

    path: Path | RemotePath
    backend: str
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    mpp: float | None
    objective_power: float | None
    vendor: str | None
    tile_size: tuple[int, int] | None
    #: How level 0 is compressed, lowercase (``"jpeg"``, ``"jpeg2000"``, ``"lzw"``, ``"deflate"``,
    #: ``"none"``, ``"png"``, ...), None when the backend does not tell; a hint of decode cost.
    codec: str | None = None

    @property
    def dimensions(self) -> tuple[int, int]:
        """Level-0 ``(width, height)``."""
        return self.level_dimensions[0]

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)


@runtime_checkable
class SlideReader(Protocol):
    """What bigsmall_torch needs of an opened slide."""

    @property
    def info(self) -> SlideInfo: ...

    def read(
        self, x: int, y: int, level: int, width: int, height: int, *, planar: bool = False
    ) -> np.ndarray:
        """The ``height x width x 3`` uint8 region at level-0 location ``(x, y)`` of ``level``.

        ``planar=True`` asks for channel-planar memory (an HWC view of CHW memory) where the backend
        can write it directly; callers must not rely on the layout either way.
        """
        ...

    def close(self) -> None: ...


def _as_float(value: Any) -> float | None:
    try:
        result = float(value)
    except (TypeError, ValueError):
        return None
    return result if result > 0 else None


# TIFF Compression values sharing a codec; the others are named by tifffile.
_CODECS = {6: "jpeg", 7: "jpeg", 33007: "jpeg", 34892: "jpeg", 8: "deflate", 32946: "deflate",
           33003: "jpeg2000", 33004: "jpeg2000", 33005: "jpeg2000", 34712: "jpeg2000",
           34926: "zstd", 50000: "zstd", 34927: "webp", 50001: "webp", 50002: "jpegxl",
           52546: "jpegxl", 22610: "jpegxr", 34934: "jpegxr"}  # fmt: skip


def tiff_codec(compression: int) -> str:
    """The lowercase name of a TIFF Compression tag value: ``"none"``, ``"lzw"``, ``"deflate"``,
    ``"jpeg"``, ``"jpeg2000"`` (Aperio's 33003/33005 too), ``"packbits"``, ``"webp"``, ``"zstd"``,
    ...; ``"compression-<n>"`` for a value tifffile does not know."""
    if compression in _CODECS:
        return _CODECS[compression]
    import tifffile

    try:
        return str(tifffile.COMPRESSION(compression).name).lower()
    except ValueError:
        return f"compression-{compression}"


def _tiff_file_codec(path: Path) -> str | None:
    """The codec of the first page of ``path`` when it is a TIFF tifffile parses, else None."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            return tiff_codec(int(tif.pages.first.compression))
    except Exception:  # not a TIFF (mirax, DICOM, ...) or one tifffile cannot parse: no hint
        return None


# DICOM transfer syntaxes "1.2.840.10008.1.2" + suffix -> codec.
_DICOM_CODECS = {"": "none", ".1": "none", ".2": "none", ".5": "rle", ".4.50": "jpeg",
                 ".4.51": "jpeg", ".4.57": "jpeg", ".4.70": "jpeg", ".4.80": "jpegls",
                 ".4.81": "jpegls", ".4.90": "jpeg2000", ".4.91": "jpeg2000"}  # fmt: skip


def _openslide_codec(properties: Any, path: Path) -> str | None:
    """Level 0's codec of a slide OpenSlide opened: DICOM's transfer syntax (``"dicom"`` when
    unknown), else the first TIFF page's compression for TIFF-based formats, else None."""
    if properties.get("openslide.vendor") == "dicom":
        syntax = str(properties.get("dicom.TransferSyntaxUID", ""))
        return _DICOM_CODECS.get(syntax.removeprefix("1.2.840.10008.1.2"), "dicom")
    return _tiff_file_codec(path)


class _ReaderBase:
    """Region checks shared by the backends."""

    info: SlideInfo

    @property
    def resident_bytes(self) -> int:
        """Bytes of decoded pixels this reader holds (a decoded plain image); 0 for tiled slides,
        whose tile caches are bounded elsewhere. :class:`SlideCache` bounds the sum."""
        return 0

    def _check_region(self, x: int, y: int, level: int, width: int, height: int) -> None:
        levels = self.info.level_count
        if not 0 <= level < levels:
            raise SlideReadError(
                self.info.path, f"level {level} does not exist; levels are 0..{levels - 1}"
            )
        if width <= 0 or height <= 0:
            raise SlideReadError(self.info.path, f"region size must be positive, got {width}x{height}")
        lw, lh = self.info.level_dimensions[level]
        ds = self.info.level_downsamples[level]
        lx, ly = int(x / ds), int(y / ds)  # as tiffslide and openslide: truncated
        if x < 0 or y < 0 or lx + width > lw or ly + height > lh:
            raise SlideReadError(
                self.info.path,
                f"region x={x}, y={y} (level-0), {width}x{height} at level {level} is outside the "
                f"level's {lw}x{lh} pixels",
            )


def _check_tiff_levels(tif: Any, path: Path) -> tuple[int, int]:
    """Refuse TIFFs that are not tiled pyramids or whose tile data lies past the end of the file.

    Returns the level-0 tile size.
    """
    size = path.stat().st_size
    # Local files (the walk would fetch every IFD's block of a URL); not NDPI, whose offsets past
    # 4 GiB this walk of classic offsets would misread.
    if not isinstance(path, RemotePath) and not tif.is_ndpi:
        with open(path, "rb") as f:
            why = _truncated_ifds(f, size)
        if why is not None:
            raise ValueError(why)
    levels = tif.series[0].levels
    for index, level in enumerate(levels):
        page = level.keyframe
        if not page.is_tiled:
            raise ValueError(
                f"level {index} is not tiled (a stripped TIFF, not a tiled pyramidal slide)"
            )
        offsets, counts = page.dataoffsets, page.databytecounts
        if not offsets:
            raise ValueError(f"level {index} has no tile data")
        end = max(o + c for o, c in zip(offsets, counts, strict=False))
        if end > size:
            raise ValueError(
                f"the file is truncated: level {index}'s tiles end at byte {end} but the file has {size}"
            )
    page = levels[0].keyframe
    return int(page.tilewidth), int(page.tilelength)


def _truncated_ifds(f: Any, size: int) -> str | None:
    """Why a (Big)TIFF is cut short, walking its chain of IFDs from the header; None if it is not, or
    if the file is not a TIFF (a chain with a cycle, the readers' concern, ends the walk).

    tifffile stops at an IFD it cannot read, with a logged error, and lists the pages before it, so
    a file cut at an IFD (an interrupted copy or download) would open with levels missing; cut
    inside an IFD, it is reported as a corrupted tag list.
    """
    head = f.read(16)
    if head[:4] in (b"II*\0", b"MM\0*"):
        count_fmt, tag_size, offset_fmt, first = "H", 12, "I", 4
    elif head[:4] in (b"II+\0", b"MM\0+"):
        count_fmt, tag_size, offset_fmt, first = "Q", 20, "Q", 8
    else:
        return None
    order = "<" if head[:1] == b"I" else ">"
    count_size, offset_size = struct.calcsize(order + count_fmt), struct.calcsize(order + offset_fmt)
    if len(head) < first + offset_size:
        return f"the file is truncated: it ends inside the TIFF header ({size} bytes)"
    following = struct.unpack_from(order + offset_fmt, head, first)[0]
    seen: set[int] = set()
    while following and following not in seen and len(seen) < 10_000:
        seen.add(following)
        f.seek(following)
        raw = f.read(count_size)
        end = following + count_size
        if len(raw) == count_size:
            end += struct.unpack(order + count_fmt, raw)[0] * tag_size + offset_size
        if end > size:
            return (
                f"the file is truncated: an IFD (a level or image) at byte {following} ends at "
                f"byte {end} but the file has {size}"
            )
        f.seek(end - offset_size)
        following = struct.unpack(order + offset_fmt, f.read(offset_size))[0]
    return None


def _past_the_end(exc: Exception, path: Path) -> Exception:
    """``exc``, or a ValueError naming the truncation when ``path`` is a TIFF cut short."""
    if str(exc).startswith("the file is truncated") or path.suffix.lower() == ".ndpi":
        return exc
    try:
        with open(path, "rb") as f:
            why = _truncated_ifds(f, os.fstat(f.fileno()).st_size)
    except (OSError, struct.error):  # unreadable or gone meanwhile: the reader's reason stands
        return exc
    return exc if why is None else ValueError(f"{why} ({exc})")


class _TiffSlideReader(_ReaderBase):
    """tiffslide, with the tile-direct fast path (:mod:`bigsmall_torch.io._tiles`) for JPEG- and
    JPEG 2000-tiled levels."""

    def __init__(
        self, path: Path, cache_bytes: int | None = None, decode_threads: int = 1, strict: bool = True
    ) -> None:
        import tiffslide

        self._decode_threads = decode_threads
        self._strict = strict
        self._decoders: dict[int, TileDecoder | None] = {}
        self._slide: Any
        self._source: Any = None
        if isinstance(path, RemotePath):  # headers through a block-cached file, tiles by ranges
            from .remote import RangeSource, RemoteFile

            handle = RemoteFile(path)
            self._source = RangeSource(path, handle.info)
            self._slide = tiffslide.TiffSlide(handle)
        else:
            self._slide = tiffslide.TiffSlide(path)
        try:
            tile = _check_tiff_levels(self._slide.ts_tifffile, path)
        except Exception:
            self._slide.close()
            raise
        props = self._slide.properties
        self.info = SlideInfo(
            path=path,
            backend=Backend.TIFFSLIDE.value,
            level_dimensions=tuple((int(w), int(h)) for w, h in self._slide.level_dimensions),
            level_downsamples=tuple(float(d) for d in self._slide.level_downsamples),
            mpp=_as_float(props.get("tiffslide.mpp-x")),
            objective_power=_as_float(props.get("tiffslide.objective-power")),
            vendor=props.get("tiffslide.vendor"),
            tile_size=tile,
            codec=tiff_codec(int(self._slide.ts_tifffile.series[0].levels[0].keyframe.compression)),
        )

    def _decoder(self, level: int) -> TileDecoder | None:
        if level not in self._decoders:
            tif = self._slide.ts_tifffile
            page = tif.series[0].levels[level].keyframe
            self._decoders[level] = TileDecoder.for_level(
                tif, page, path=self.info.path, threads=self._decode_threads, level=level,
                strict=self._strict, source=self._source,
            )
        return self._decoders[level]

    def read_tiled(self, x: int, y: int, level: int, width: int, height: int) -> TiledRegion | None:
        """The region of :meth:`read` kept as its tiles (:meth:`TileDecoder.read_tiled`), or None
        when the level has no tile fast path (then :meth:`read` it)."""
        self._check_region(x, y, level, width, height)
        decoder = self._decoder(level)
        if decoder is None:
            return None
        ds = self.info.level_downsamples[level]
        return decoder.read_tiled(int(x / ds), int(y / ds), width, height)

    def read(
        self, x: int, y: int, level: int, width: int, height: int, *, planar: bool = False
    ) -> np.ndarray:
        self._check_region(x, y, level, width, height)
        decoder = self._decoder(level)
        if decoder is not None:
            ds = self.info.level_downsamples[level]
            return decoder.read(int(x / ds), int(y / ds), width, height, planar=planar)
        try:
            arr = self._slide.read_region((x, y), level, (width, height), as_array=True)
        except RemoteError:  # the store failed: keep its type, status and attempts
            raise
        except Exception as exc:  # decoder errors come in many types
            raise SlideReadError(self.info.path, f"tiffslide failed to read the region: {exc}") from exc
        if self._strict:  # tifffile drops libjpeg's corruption warnings: check the tiles read
            ds = self.info.level_downsamples[level]
            page = self._slide.ts_tifffile.series[0].levels[level].keyframe
            check_page_tiles(
                self.info.path, page, int(x / ds), int(y / ds), width, height, level=level
            )
        if arr.ndim == 2:
            arr = np.repeat(arr[:, :, None], 3, axis=2)
        elif arr.shape[2] != 3:
            arr = np.ascontiguousarray(arr[:, :, :3])
        return arr

    def close(self) -> None:
        for decoder in self._decoders.values():
            if decoder is not None:
                decoder.close()
        self._decoders.clear()
        self._slide.close()


_openslide_caches: dict[tuple[int, int], Any] = {}


def _openslide_cache(capacity: int) -> Any:
    """One OpenSlide 4 tile cache of ``capacity`` bytes per process, shared by its open slides."""
    import openslide

    key = (os.getpid(), capacity)
    if key not in _openslide_caches:
        _openslide_caches.clear()  # caches of a parent process are not ours
        _openslide_caches[key] = openslide.OpenSlideCache(capacity)
    return _openslide_caches[key]


class _OpenSlideReader(_ReaderBase):
    def __init__(
        self, path: Path, cache_bytes: int | None = None, decode_threads: int = 1, strict: bool = True
    ) -> None:
        import openslide

        if isinstance(path, RemotePath):
            raise SlideOpenError(
                path,
                "openslide cannot read URLs (it reads local files only); use backend='tiffslide' "
                "or 'auto' (tiled TIFF and SVS slides are read from the store directly)",
            )
        self._slide = openslide.OpenSlide(path)
        if cache_bytes is not None and hasattr(self._slide, "set_cache"):
            self._slide.set_cache(_openslide_cache(cache_bytes))
        props = self._slide.properties
        tw, th = props.get("openslide.level[0].tile-width"), props.get("openslide.level[0].tile-height")
        self.info = SlideInfo(
            path=path,
            backend=Backend.OPENSLIDE.value,
            level_dimensions=tuple((int(w), int(h)) for w, h in self._slide.level_dimensions),
            level_downsamples=tuple(float(d) for d in self._slide.level_downsamples),
            mpp=_as_float(props.get("openslide.mpp-x")),
            objective_power=_as_float(props.get("openslide.objective-power")),
            vendor=props.get("openslide.vendor"),
            tile_size=(int(tw), int(th)) if tw and th else None,
            codec=_openslide_codec(props, path),
        )

    def read(
        self, x: int, y: int, level: int, width: int, height: int, *, planar: bool = False
    ) -> np.ndarray:
        self._check_region(x, y, level, width, height)
        try:
            image = self._slide.read_region((x, y), level, (width, height))
        except Exception as exc:
            raise SlideReadError(self.info.path, f"openslide failed to read the region: {exc}") from exc
        return np.ascontiguousarray(np.asarray(image)[:, :, :3])

    def close(self) -> None:
        self._slide.close()


def _reader_class(
    backend: Backend,
) -> type[_TiffSlideReader] | type[_OpenSlideReader] | type[ImageReader]:
    if backend is Backend.TIFFSLIDE:
        return _TiffSlideReader
    if backend is Backend.OPENSLIDE:
        return _OpenSlideReader
    from ._image import ImageReader  # imports this module: loaded on first use

    return ImageReader


def _check_backend(backend: str | Backend) -> Backend:
    try:
        return Backend(backend)
    except ValueError:
        allowed = ", ".join(repr(b.value) for b in Backend)
        raise ConfigError(f"backend must be one of {allowed}, got {backend!r}") from None


def open_slide(
    path: str | os.PathLike[str],
    *,
    backend: str | Backend = "auto",
    openslide_cache_bytes: int | None = None,
    decode_threads: int = 1,
    strict: bool = True,
    storage_options: dict[str, Any] | None = None,
    remote: RemoteOptions | None = None,
) -> SlideReader:
    """Open a slide with ``backend`` (``"auto"`` tries tiffslide, then openslide, then ``"image"``).

    ``path`` may be a URL (``s3://``, ``gs://``, ``az://``, ``https://``, any protocol fsspec
    reads with its package installed): tiled TIFF and SVS slides are then read from the store,
    the tiles of a region fetched together (see :mod:`bigsmall_torch.io.remote`), with
    ``remote`` (:class:`~bigsmall_torch.RemoteOptions`: credentials, disk cache, retries) or
    just ``storage_options`` (passed to fsspec). openslide and the ``"image"`` backend read local
    files only.

    With tiffslide, levels whose tiles are 8-bit RGB/YCbCr JPEG or JPEG 2000 (TIFF compression
    33003, 33004, 33005, 34712) are read by decoding the tiles of
    the region straight into the result (``decode_threads`` threads, the GIL released while
    decoding); other levels go through ``read_region``. Pixels are identical either way.

    ``strict=True`` (the default) makes libjpeg's corruption warnings errors, as OpenSlide does:
    a damaged JPEG tile raises :class:`SlideReadError` naming the file, level and tile instead of
    giving made-up pixels (see :mod:`bigsmall_torch.io._tiles`; it costs about a quarter of the decode
    time). ``strict=False`` skips that check (tifffile's own behaviour).

    ``openslide_cache_bytes`` bounds OpenSlide's tile cache (one cache of that size shared by the
    process's slides); None keeps OpenSlide's default (32 MiB per slide).

    The ``"image"`` backend reads plain images as one-level slides with a virtual pyramid
    (downsamples 1, 2, 4, ...): stripped TIFFs by strips, other images (PNG, JPEG, BMP, whatever
    Pillow opens) decoded whole at open; see :mod:`bigsmall_torch.io._image`. Tiled TIFFs are left
    to tiffslide and openslide.

    Raises:
        SlideOpenError: the file is missing, is a folder, or no backend tried can read it; the
            message names the file, every backend tried and why each refused.
    """
    chosen = _check_backend(backend)
    if storage_options is not None:
        if remote is not None:
            raise ConfigError("open_slide: give storage_options or remote (which holds them), not both")
        from .remote import RemoteOptions

        remote = RemoteOptions(storage_options=storage_options)
    file = as_path(path, remote)
    if isinstance(file, RemotePath):
        _check_object(file)
        if chosen in (Backend.OPENSLIDE, Backend.IMAGE):
            raise SlideOpenError(
                file,
                f"the {chosen.value!r} backend reads local files only, not URLs; use "
                "backend='tiffslide' or 'auto' (tiled TIFF and SVS slides are read from the store)",
            )
        order = [Backend.TIFFSLIDE]
    else:
        if not file.exists():
            raise SlideOpenError(file, "no such file")
        if file.is_dir():
            raise SlideOpenError(file, "is a folder, not a slide file")
        if file.stat().st_size == 0:
            raise SlideOpenError(file, "the file is empty")
        order = [Backend.TIFFSLIDE, Backend.OPENSLIDE, Backend.IMAGE] if chosen is Backend.AUTO else [chosen]
    reasons: list[str] = []
    for candidate in order:
        try:
            reader = _reader_class(candidate)(file, openslide_cache_bytes, decode_threads, bool(strict))  # type: ignore[arg-type]
        except RemoteError as exc:  # the store failed, not the format: say so as it is
            raise _open_error(exc, [candidate.value]) from exc
        except Exception as exc:  # each backend refuses in its own exception types
            if candidate is Backend.TIFFSLIDE and not isinstance(file, RemotePath):
                exc = _past_the_end(exc, file)  # the TIFF reader's reason says it once
            reasons.append(f"{candidate.value}: {exc}")
            continue
        if not reader.info.level_dimensions or min(reader.info.dimensions) <= 0:
            reader.close()
            reasons.append(f"{candidate.value}: no image levels")
            continue
        logger.debug("opened %s with %s", file, candidate.value)
        return reader
    raise SlideOpenError(
        file, "cannot be read as a slide: " + "; ".join(reasons), backends=[b.value for b in order]
    )


def _open_error(exc: RemoteError, backends: list[str] | None = None) -> SlideOpenError:
    """A :class:`SlideOpenError` saying what the store said, with its ``status`` and ``attempts``."""
    error = SlideOpenError(exc.path, str(exc.reason), backends=backends or [])
    error.status, error.attempts = exc.status, exc.attempts  # type: ignore[attr-defined]
    return error


def _check_object(file: RemotePath) -> None:
    """Refuse a URL that names no object, a prefix, or an empty object (the request retried as
    :mod:`~bigsmall_torch.io.remote` says); :class:`SlideOpenError` naming the URL and status."""
    try:
        stat = file.stat()
    except FileNotFoundError as exc:
        cause = exc.__cause__
        if isinstance(cause, RemoteError):
            raise _open_error(cause) from exc
        raise SlideOpenError(file, "no such object") from exc
    except IsADirectoryError as exc:
        raise SlideOpenError(file, "is a prefix (a folder), not an object") from exc
    except RemoteError as exc:
        raise _open_error(exc) from exc
    if stat.st_size == 0:
        raise SlideOpenError(file, "the object is empty")


def slide_info(
    path: str | os.PathLike[str],
    *,
    backend: str | Backend = "auto",
    storage_options: dict[str, Any] | None = None,
    remote: RemoteOptions | None = None,
) -> SlideInfo:
    """Open ``path`` (a file or a URL, see :func:`open_slide`), return its :class:`SlideInfo`,
    and close it again."""
    reader = open_slide(path, backend=backend, storage_options=storage_options, remote=remote)
    try:
        return reader.info
    finally:
        reader.close()


def check_mpp_hint(value: Any, where: str | os.PathLike[str]) -> float | None:
    """An mpp hint (a record's ``info["mpp"]``) as a float > 0, or None when ``value`` is None.

    A number or a string of one (``"0.25"`` from a CSV) is accepted; anything else raises a
    :class:`ConfigError` naming ``where`` (the slide or record)."""
    if value is None:
        return None
    mpp: float | None = None
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        mpp = float(value)
    elif isinstance(value, str):
        try:
            mpp = float(value.strip())
        except ValueError:
            mpp = None
    if mpp is None or not math.isfinite(mpp) or mpp <= 0:
        raise ConfigError(
            f"{os.fspath(where)}: the mpp hint (record info['mpp']) must be a number > 0 or a "
            f"string of one, e.g. 0.25, got {value!r}"
        )
    return mpp


class SlideCache:
    """A small LRU of open slide readers, one per process (a DataLoader worker opens its own).

    Opening is lazy; when more than ``capacity`` slides are open the least recently used is closed, so
    file handles stay bounded however many slides a worker streams from. OpenSlide's tile caches
    are bounded too: the process's openslide slides share one cache of ``openslide_cache_bytes``
    (big chunks are read once, so a large tile cache buys little). Plain images decoded whole at
    open (the ``"image"`` backend) count against ``max_decoded_bytes``: while the readers' decoded
    bytes (``resident_bytes``) add up to more, the least recently used reader holding any is closed
    (never the one just returned).
    """

    def __init__(
        self,
        capacity: int = 16,
        *,
        backend: str | Backend = "auto",
        openslide_cache_bytes: int = 32 << 20,
        decode_threads: int = 2,
        strict: bool = True,
        max_decoded_bytes: int = 1 << 30,
    ) -> None:
        if not isinstance(capacity, int) or capacity < 1:
            raise ConfigError(f"SlideCache: capacity must be an int >= 1, got {capacity!r}")
        if not isinstance(openslide_cache_bytes, int) or openslide_cache_bytes < 0:
            raise ConfigError(
                f"SlideCache: openslide_cache_bytes must be an int >= 0, got {openslide_cache_bytes!r}"
            )
        if isinstance(decode_threads, bool) or not isinstance(decode_threads, int) or decode_threads < 1:
            raise ConfigError(f"SlideCache: decode_threads must be an int >= 1, got {decode_threads!r}")
        if (
            isinstance(max_decoded_bytes, bool)
            or not isinstance(max_decoded_bytes, int)
            or max_decoded_bytes < 0
        ):
            raise ConfigError(
                f"SlideCache: max_decoded_bytes must be an int >= 0, got {max_decoded_bytes!r}"
            )
        self.capacity = capacity
        self.max_decoded_bytes = max_decoded_bytes
        self.openslide_cache_bytes = openslide_cache_bytes
        self.decode_threads = decode_threads
        self.strict = bool(strict)
        self.backend = _check_backend(backend)
        self._open: OrderedDict[Path | RemotePath, SlideReader] = OrderedDict()
        self._mpp_hints: dict[Path | RemotePath, float] = {}  # travels with a pickled cache: plain numbers
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._users = 0

    def _own(self) -> None:
        """Forget handles and users inherited through fork (call with the lock held)."""
        if self._pid != os.getpid():
            self._open.clear()
            self._users = 0
            self._pid = os.getpid()

    def acquire(self) -> None:
        """Mark one more user of the cache (an iteration); :meth:`release` closes the readers when
        the last user leaves, so two iterations of one dataset in one process never close slides
        under each other."""
        with self._lock:
            self._own()
            self._users += 1

    def release(self) -> None:
        """One user fewer; the last one out closes every open reader (taken from the cache under
        the lock, so a user arriving meanwhile opens its own)."""
        with self._lock:
            self._own()
            self._users = max(0, self._users - 1)
            if self._users:
                return
            readers = list(self._open.values())
            self._open.clear()
        for reader in readers:
            reader.close()

    def get(self, path: str | os.PathLike[str], *, mpp: float | str | None = None) -> SlideReader:
        """The open reader of ``path``, opening it (and closing the least recently used) if needed.

        ``mpp`` is a fallback resolution for files that record none (a record's ``info["mpp"]``,
        e.g. for a PNG): when the reader's ``info.mpp`` is None its info gets this mpp; an mpp the
        file records is never overridden. The hint is remembered for ``path``, so reopening the
        slide later (after eviction) without one applies it again; a number > 0 or a string of
        one, else :class:`ConfigError` naming the path.
        """
        key = as_path(path)
        hint = check_mpp_hint(mpp, key)
        with self._lock:
            self._own()  # inherited through fork: never share handles
            if hint is not None:
                self._mpp_hints[key] = hint
            reader = self._open.get(key)
            if reader is not None:
                self._open.move_to_end(key)
            else:
                reader = open_slide(
                    key,
                    backend=self.backend,
                    openslide_cache_bytes=self.openslide_cache_bytes,
                    decode_threads=self.decode_threads,
                    strict=self.strict,
                )
                self._open[key] = reader
                while len(self._open) > self.capacity:
                    _, evicted = self._open.popitem(last=False)
                    evicted.close()
            remembered = self._mpp_hints.get(key)
            if remembered is not None and reader.info.mpp is None and isinstance(reader, _ReaderBase):
                reader.info = replace(reader.info, mpp=remembered)
            self._bound_decoded(key)
            return reader

    def _bound_decoded(self, keep: Path | RemotePath) -> None:
        """Close the least recently used readers holding decoded pixels while their bytes add up
        to more than ``max_decoded_bytes`` (never ``keep``); call with the lock held."""
        sizes = {key: int(getattr(reader, "resident_bytes", 0)) for key, reader in self._open.items()}
        total = sum(sizes.values())
        for key in list(self._open):
            if total <= self.max_decoded_bytes:
                break
            if key == keep or not sizes[key]:
                continue
            total -= sizes[key]
            self._open.pop(key).close()
            logger.debug("closed %s: decoded images over max_decoded_bytes", key)

    @property
    def decoded_bytes(self) -> int:
        """Bytes of decoded pixels the open readers hold (see ``max_decoded_bytes``)."""
        with self._lock:
            return sum(int(getattr(reader, "resident_bytes", 0)) for reader in self._open.values())

    def __len__(self) -> int:
        return len(self._open)

    def close(self) -> None:
        """Close every open reader."""
        with self._lock:
            for reader in self._open.values():
                reader.close()
            self._open.clear()

    def __getstate__(self) -> dict[str, Any]:
        # Handles never travel to another process: a pickled cache arrives empty.
        state = self.__dict__.copy()
        state["_open"] = OrderedDict()
        state["_users"] = 0
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
        self._pid = os.getpid()
