"""Slide I/O: one small reader protocol over openslide and tiffslide, and a per-worker LRU of handles.

Everything in bigsmall_torch that touches a slide file goes through :func:`open_slide`. Readers return
``H x W x 3`` ``uint8`` numpy arrays; locations are level-0 pixels, sizes are pixels of the level read.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from ..errors import ConfigError, SlideOpenError, SlideReadError
from ._tiles import TileDecoder, check_page_tiles

__all__ = ["Backend", "SlideCache", "SlideInfo", "SlideReader", "open_slide", "slide_info"]

logger = logging.getLogger(__name__)


class Backend(str, Enum):
    """Which library reads a slide. ``AUTO`` tries tiffslide, then openslide, per file."""

    AUTO = "auto"
    OPENSLIDE = "openslide"
    TIFFSLIDE = "tiffslide"


@dataclass(frozen=True)
class SlideInfo:
    """Metadata of one slide, gathered in one place (picklable, no open handle)."""

    path: Path
    backend: str
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    mpp: float | None
    objective_power: float | None
    vendor: str | None
    tile_size: tuple[int, int] | None

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


class _ReaderBase:
    """Region checks shared by the backends."""

    info: SlideInfo

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


class _TiffSlideReader(_ReaderBase):
    """tiffslide, with the tile-direct fast path (:mod:`bigsmall_torch.io._tiles`) for JPEG-tiled levels."""

    def __init__(
        self, path: Path, cache_bytes: int | None = None, decode_threads: int = 1, strict: bool = True
    ) -> None:
        import tiffslide

        self._decode_threads = decode_threads
        self._strict = strict
        self._decoders: dict[int, TileDecoder | None] = {}
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
        )

    def _decoder(self, level: int) -> TileDecoder | None:
        if level not in self._decoders:
            tif = self._slide.ts_tifffile
            page = tif.series[0].levels[level].keyframe
            self._decoders[level] = TileDecoder.for_level(
                tif, page, path=self.info.path, threads=self._decode_threads, level=level,
                strict=self._strict,
            )
        return self._decoders[level]

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


_BACKENDS: dict[Backend, type[_TiffSlideReader] | type[_OpenSlideReader]] = {
    Backend.TIFFSLIDE: _TiffSlideReader,
    Backend.OPENSLIDE: _OpenSlideReader,
}


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
) -> SlideReader:
    """Open a slide with ``backend`` (``"auto"`` tries tiffslide, then openslide).

    With tiffslide, levels whose tiles are 8-bit RGB/YCbCr JPEG are read by decoding the tiles of
    the region straight into the result (``decode_threads`` threads, the GIL released while
    decoding); other levels go through ``read_region``. Pixels are identical either way.

    ``strict=True`` (the default) makes libjpeg's corruption warnings errors, as OpenSlide does:
    a damaged JPEG tile raises :class:`SlideReadError` naming the file, level and tile instead of
    giving made-up pixels (see :mod:`bigsmall_torch.io._tiles`; it costs about a quarter of the decode
    time). ``strict=False`` skips that check (tifffile's own behaviour).

    ``openslide_cache_bytes`` bounds OpenSlide's tile cache (one cache of that size shared by the
    process's slides); None keeps OpenSlide's default (32 MiB per slide).

    Raises:
        SlideOpenError: the file is missing, is a folder, or no backend tried can read it; the
            message names the file, every backend tried and why each refused.
    """
    chosen = _check_backend(backend)
    file = Path(path)
    if not file.exists():
        raise SlideOpenError(file, "no such file")
    if file.is_dir():
        raise SlideOpenError(file, "is a folder, not a slide file")
    if file.stat().st_size == 0:
        raise SlideOpenError(file, "the file is empty")
    order = [Backend.TIFFSLIDE, Backend.OPENSLIDE] if chosen is Backend.AUTO else [chosen]
    reasons: list[str] = []
    for candidate in order:
        try:
            reader = _BACKENDS[candidate](file, openslide_cache_bytes, decode_threads, bool(strict))
        except Exception as exc:  # each backend refuses in its own exception types
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


def slide_info(path: str | os.PathLike[str], *, backend: str | Backend = "auto") -> SlideInfo:
    """Open ``path``, return its :class:`SlideInfo`, and close it again."""
    reader = open_slide(path, backend=backend)
    try:
        return reader.info
    finally:
        reader.close()


class SlideCache:
    """A small LRU of open slide readers, one per process (a DataLoader worker opens its own).

    Opening is lazy; when more than ``capacity`` slides are open the least recently used is closed, so
    file handles stay bounded however many slides a worker streams from. OpenSlide's tile caches
    are bounded too: the process's openslide slides share one cache of ``openslide_cache_bytes``
    (big chunks are read once, so a large tile cache buys little).
    """

    def __init__(
        self,
        capacity: int = 16,
        *,
        backend: str | Backend = "auto",
        openslide_cache_bytes: int = 32 << 20,
        decode_threads: int = 2,
        strict: bool = True,
    ) -> None:
        if not isinstance(capacity, int) or capacity < 1:
            raise ConfigError(f"SlideCache: capacity must be an int >= 1, got {capacity!r}")
        if not isinstance(openslide_cache_bytes, int) or openslide_cache_bytes < 0:
            raise ConfigError(
                f"SlideCache: openslide_cache_bytes must be an int >= 0, got {openslide_cache_bytes!r}"
            )
        if isinstance(decode_threads, bool) or not isinstance(decode_threads, int) or decode_threads < 1:
            raise ConfigError(f"SlideCache: decode_threads must be an int >= 1, got {decode_threads!r}")
        self.capacity = capacity
        self.openslide_cache_bytes = openslide_cache_bytes
        self.decode_threads = decode_threads
        self.strict = bool(strict)
        self.backend = _check_backend(backend)
        self._open: OrderedDict[Path, SlideReader] = OrderedDict()
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

    def get(self, path: str | os.PathLike[str]) -> SlideReader:
        """The open reader of ``path``, opening it (and closing the least recently used) if needed."""
        key = Path(path)
        with self._lock:
            self._own()  # inherited through fork: never share handles
            reader = self._open.get(key)
            if reader is not None:
                self._open.move_to_end(key)
                return reader
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
            return reader

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
