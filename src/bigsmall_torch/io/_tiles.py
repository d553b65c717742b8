"""The tile-direct fast path: read a region of a JPEG or JPEG 2000 tiled TIFF level from its tiles.

``read_region`` of tiffslide and openslide costs far more than the JPEG decoding it does for big
regions. :class:`TileDecoder` reads the compressed tiles covering a region with ``os.pread`` (one
read per run of tiles adjacent in the file), decodes them with imagecodecs (which releases the GIL)
in the calling thread and ``threads - 1`` pool threads, and copies each tile, cropped at the
region's edges, into one preallocated array. Pixels equal tiffslide's ``read_region`` exactly (same libjpeg, same color
conversion as tifffile); tiles absent from the file (zero byte count) are filled with the page's
``nodata`` value (0, as tiffslide does and as openslide's transparent pixels give without alpha).

JPEG 2000 tiles (TIFF compression 33003 and 33005, Aperio's "YCbCr" and "RGB" codestreams, 33004
and 34712) are decoded by ``imagecodecs.jpeg2k_decode`` (OpenJPEG), called as tifffile calls it, so
the pixels are tiffslide's: OpenJPEG inverts the codestream's own colour transform (Aperio 33005),
imagecodecs converts a 3-component codestream whose chroma components are subsampled from sYCC to
RGB itself (Aperio 33003), and returns any other codestream's components as they are; tifffile adds
no conversion of its own for JPEG 2000, whatever the Photometric tag says. (openslide converts every
33003 tile from YCbCr with its own arithmetic, so on such slides its pixels may differ from
tiffslide's, and so from these.) A tile is decoded whole by one thread (``numthreads=1``: the pool
is the parallelism).

Corrupt tiles are errors, never wrong pixels. imagecodecs (and so tifffile and tiffslide) decodes
through libjpeg but drops libjpeg's *warnings*, and corrupt entropy-coded data is exactly what libjpeg
reports as a warning ("Corrupt JPEG data: premature end of data segment", "N extraneous bytes before
marker") while it fills the rest of the tile with made-up pixels. OpenSlide turns those warnings into
errors; so does this module with ``strict=True`` (the default): YCbCr tiles are decoded by
libjpeg-turbo's TurboJPEG API with stop-on-warning (simplejpeg; same pixels, no extra cost), RGB
tiles (Aperio's, whose colour space only imagecodecs can set) by imagecodecs and then checked by
TurboJPEG at 1/8 scale (:func:`check_jpeg`). A warning raises :class:`~bigsmall_torch.SlideReadError`
naming the file, the level and the tile. What libjpeg cannot see, nobody downstream can: bytes
overwritten so that the Huffman stream still parses to the right length decode to wrong pixels
without any warning (JPEG carries no checksum; ``python -m benchmarks.bench_corruption`` counts both).
JPEG 2000 has no such warnings to promote: a codestream OpenJPEG cannot decode (broken markers,
truncated) raises :class:`~bigsmall_torch.SlideReadError` naming the file, level and tile in either
mode, and damaged packet data decodes silently in every reader (no checksum either).
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from ..errors import ConfigError, SlideReadError

if TYPE_CHECKING:
    import tifffile

    from .remote import RangeSource

__all__ = ["TileDecoder", "TiledRegion", "check_jpeg"]

logger = logging.getLogger(__name__)

_JPEG = 7  # TIFF Compression tag value of "new-style" JPEG
# TIFF Compression tag values of JPEG 2000 codestreams, all decoded alike by tifffile: Aperio's
# "YCbCr" (33003) and "RGB" (33005), "JPEG 2000 lossy" (33004) and the registered one (34712).
_JPEG2000 = frozenset({33003, 33004, 33005, 34712})
_RGB, _YCBCR = 2, 6  # TIFF PhotometricInterpretation values
_MAX_GAP = 64 * 1024  # tiles this close in the file are read in one pread (the gap is read too)
_MAX_RUN = 16 * 1024 * 1024  # largest single pread
# One task: (file offset, byte count, tiles as (col, row, start in buffer, byte count)).
_Task = tuple[int, int, list[tuple[int, int, int, int]]]


class TiledRegion:
    """A region of a level kept as the whole tiles that cover it, each contiguous
    (``tiles[r, c]`` is the ``tile_height x tile_width x 3`` tile ``r`` rows, ``c`` columns from the
    region's first): what :meth:`TileDecoder.read_tiled` decodes into, with no copy into a region
    array. The region is ``height x width`` pixels from ``(left, top)`` of the first tile; pixels of
    the tiles outside it (and past the level's edge) are not part of it.

    :meth:`copy_to` copies any rectangle of the region into an array of any strides, and
    ``numpy.asarray`` gives the region as an ``H x W x 3`` array.
    """

    ndim = 3
    dtype = np.dtype(np.uint8)

    def __init__(self, tiles: np.ndarray, left: int, top: int, width: int, height: int) -> None:
        rows, cols, th, tw = tiles.shape[:4]
        if not (0 <= left < tw and 0 <= top < th and 0 < width <= cols * tw - left
                and 0 < height <= rows * th - top):  # fmt: skip
            raise ValueError(
                f"a {width}x{height} region from ({left}, {top}) does not fit {rows}x{cols} tiles "
                f"of {tw}x{th}"
            )
        self.tiles, self.left, self.top = tiles, left, top
        self.width, self.height = width, height

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.height, self.width, 3)

    def copy_to(self, out: np.ndarray, top: int, left: int) -> None:
        """Copy the region's ``out.shape[0] x out.shape[1]`` pixels from row ``top``, column
        ``left`` into ``out`` (``H x W x 3``, any strides): one copy per tile the rectangle touches."""
        height, width = out.shape[:2]
        if top < 0 or left < 0 or top + height > self.height or left + width > self.width:
            raise ValueError(
                f"rows {top}..{top + height}, columns {left}..{left + width} are outside the "
                f"{self.width}x{self.height} region"
            )
        th, tw = self.tiles.shape[2:4]
        y, x = top + self.top, left + self.left  # in the pixels of the tiles
        y_end, x_end = y + height, x + width
        for r in range(y // th, (y_end - 1) // th + 1):
            ty0, ty1 = max(y, r * th), min(y_end, (r + 1) * th)
            for c in range(x // tw, (x_end - 1) // tw + 1):
                tx0, tx1 = max(x, c * tw), min(x_end, (c + 1) * tw)
                out[ty0 - y : ty1 - y, tx0 - x : tx1 - x] = self.tiles[
                    r, c, ty0 - r * th : ty1 - r * th, tx0 - c * tw : tx1 - c * tw
                ]

    def crop(self, top: int, left: int, height: int, width: int) -> np.ndarray:
        """A new ``height x width x 3`` array of the region's pixels from row ``top``, column ``left``."""
        out = np.empty((height, width, 3), np.uint8)
        self.copy_to(out, top, left)
        return out

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        if copy is False:
            raise ValueError(
                "a TiledRegion's pixels lie in separate tiles: it cannot become an array without a copy"
            )
        region = self.crop(0, 0, self.height, self.width)
        return region if dtype is None else region.astype(dtype, copy=False)

    def __repr__(self) -> str:
        rows, cols, th, tw = self.tiles.shape[:4]
        return f"TiledRegion({self.width}x{self.height} from ({self.left}, {self.top}) of {rows}x{cols} tiles of {tw}x{th})"


# Where a region's tiles go: a region array, or the slots of a TiledRegion.
_Sink = np.ndarray | TiledRegion


class TileDecoder:
    """Reads regions of one tiled JPEG or JPEG 2000 level (8-bit RGB or YCbCr) from its tiles.

    ``compression`` is the level's TIFF Compression tag value: 7 (JPEG; ``jpegtables`` and
    ``colorspace`` as tifffile derives them) or 33003, 33004, 33005, 34712 (JPEG 2000; both None).

    Safe to share between threads, to use after ``fork`` (the child opens its own file descriptor
    and thread pool) and to pickle (the copy reopens the file lazily).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        level: int | str,
        size: tuple[int, int],
        tile: tuple[int, int],
        offsets: np.ndarray,
        bytecounts: np.ndarray,
        jpegtables: bytes | None,
        colorspace: int | None,
        compression: int = _JPEG,
        nodata: int = 0,
        threads: int = 4,
        strict: bool = True,
        fd: int | None = None,
        source: RangeSource | None = None,
    ) -> None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ConfigError(f"TileDecoder: threads must be an int >= 1, got {threads!r}")
        if compression != _JPEG and compression not in _JPEG2000:
            allowed = ", ".join(str(c) for c in sorted({_JPEG, *_JPEG2000}))
            raise ConfigError(
                f"TileDecoder: compression must be a TIFF compression tag value among {allowed}, "
                f"got {compression!r}"
            )
        from .._paths import as_path

        self.path = as_path(path)  # a URL stays a URL
        self.level = level
        self.width, self.height = size
        self.tile_width, self.tile_height = tile
        self.tiles_across = -(-self.width // self.tile_width)
        tiles_down = -(-self.height // self.tile_height)
        if len(offsets) != self.tiles_across * tiles_down or len(bytecounts) != len(offsets):
            raise SlideReadError(
                self.path,
                f"level {level} has {len(offsets)} tile offsets and {len(bytecounts)} byte counts; "
                f"expected {self.tiles_across} x {tiles_down} tiles",
            )
        self._offsets = np.asarray(offsets, dtype=np.int64)  # 8 bytes a tile, for huge levels
        self._bytecounts = np.asarray(bytecounts, dtype=np.int64)
        self._tables = jpegtables
        self._colorspace = colorspace
        self.compression = int(compression)
        self._jpeg2000 = self.compression in _JPEG2000
        self._codec = "JPEG 2000" if self._jpeg2000 else "JPEG"
        self.nodata = nodata
        self.threads = threads
        self.strict = bool(strict)
        # A tile is abbreviated when the tables live in the JPEGTables tag: the strict check needs
        # a whole JPEG stream, the tables' segments (without their EOI) before the tile (without SOI).
        self._prefix = jpegtables[:-2] if jpegtables else b""
        self._lock = threading.Lock()
        # The file descriptor of this process, owned by the decoder: ``fd`` (a duplicate of the
        # descriptor the offsets were read through, so tiles come from the same file even if the
        # path is replaced meanwhile) or opened by path on first use (after fork or unpickling).
        self._fd: int | None = fd
        # A remote object's bytes (:class:`~bigsmall_torch.io.remote.RangeSource`): a region's
        # tiles are fetched together, concurrently, before they are decoded.
        self._source = source
        self._pool: ThreadPoolExecutor | None = None
        self._pid = os.getpid()
        self._closed = False

    @classmethod
    def for_level(
        cls,
        tif: tifffile.TiffFile,
        page: tifffile.TiffPage,
        *,
        path: str | os.PathLike[str] | None = None,
        threads: int = 4,
        level: int | None = None,
        strict: bool = True,
        source: RangeSource | None = None,
    ) -> TileDecoder | None:
        """A decoder for a tiled, 8-bit, 3-sample (RGB or YCbCr) JPEG or JPEG 2000 (TIFF
        compression 33003, 33004, 33005, 34712) page of ``tif``; None when the page is not eligible
        (not tiled, other compression, other sample layout) so callers fall back to
        ``read_region``. ``path`` defaults to the file of ``tif``; ``level`` (for messages) to the
        page's position among the levels of ``tif``'s first series. ``source`` reads the bytes of
        a remote ``tif`` (then ``path`` is its URL)."""
        jpeg2000 = page.compression in _JPEG2000
        eligible = (
            (source is not None or hasattr(os, "pread"))
            and page.is_tiled
            and (page.compression == _JPEG or jpeg2000)
            and page.photometric in (_RGB, _YCBCR)
            # tifffile refuses chroma subsampling (a YCbCr page without YCbCrSubSampling = 1, 1)
            # outside JPEG: such a page stays with read_region and fails there as tiffslide does.
            and not (jpeg2000 and page.is_subsampled)
            and page.bitspersample == 8
            and page.samplesperpixel == 3
            and not page.extrasamples
            and page.planarconfig == 1  # contiguous samples
            and page.imagedepth == 1
            and page.tiledepth == 1
        )
        if not eligible:
            logger.debug("page %d of %s is not eligible for the tile fast path", page.index, path)
            return None
        if level is None:
            levels = [lv.keyframe for lv in tif.series[0].levels] if tif.series else []
            level = next((i for i, kf in enumerate(levels) if kf is page), None)
        # As tifffile.jpeg_decode_colorspace: Aperio's RGB tiles carry no JFIF marker.
        jpeg_rgb = not jpeg2000 and page.photometric == _RGB and not page.is_jfif
        colorspace = _RGB if jpeg_rgb else None
        nodata = page.nodata  # tiffslide fills absent tiles with it (tifffile's zarr fill value)
        fill = int(nodata) if isinstance(nodata, (int, float)) and 0 <= nodata <= 255 else 0
        return cls(
            tif.filehandle.path if path is None else path,
            level=f"page {page.index}" if level is None else level,
            size=(int(page.imagewidth), int(page.imagelength)),
            tile=(int(page.tilewidth), int(page.tilelength)),
            offsets=np.asarray(page.dataoffsets),
            bytecounts=np.asarray(page.databytecounts),
            jpegtables=None if jpeg2000 else page.jpegtables,
            colorspace=colorspace,
            compression=int(page.compression),
            nodata=fill,
            threads=threads,
            strict=strict,
            fd=None if source is not None else _duplicate(tif),
            source=source,
        )

    def read(self, x: int, y: int, width: int, height: int, *, planar: bool = False) -> np.ndarray:
        """``height x width x 3`` uint8 region whose top-left is ``(x, y)`` in this level's pixels;
        the region must lie inside the level. ``planar=True`` writes the tiles straight into
        channel-planar memory (see :func:`bigsmall_torch.chunks.channel_planar`)."""
        self._check_region(x, y, width, height)
        if planar:
            out = np.empty((3, height, width), dtype=np.uint8).transpose(1, 2, 0)
        else:
            out = np.empty((height, width, 3), dtype=np.uint8)
        self._execute(x, y, width, height, out)
        return out

    def read_tiled(self, x: int, y: int, width: int, height: int) -> TiledRegion:
        """The same region as :meth:`read`, kept as the tiles it covers (a :class:`TiledRegion`):
        each tile decoded straight into its own contiguous slot, with no copy into a region array.
        For callers that cut the region into windows anyway (batched sliding windows)."""
        self._check_region(x, y, width, height)
        tw, th = self.tile_width, self.tile_height
        c0, r0 = x // tw, y // th
        tiles = np.empty(
            ((y + height - 1) // th + 1 - r0, (x + width - 1) // tw + 1 - c0, th, tw, 3), np.uint8
        )
        region = TiledRegion(tiles, x - c0 * tw, y - r0 * th, width, height)
        self._execute(x, y, width, height, region)
        return region

    def _check_region(self, x: int, y: int, width: int, height: int) -> None:
        if (
            width < 1
            or height < 1
            or x < 0
            or y < 0
            or x + width > self.width
            or y + height > self.height
        ):
            raise SlideReadError(
                self.path,
                f"region x={x}, y={y}, {width}x{height} is outside level {self.level}'s "
                f"{self.width}x{self.height} pixels (or empty)",
            )

    def _execute(self, x: int, y: int, width: int, height: int, out: _Sink) -> None:
        """Read and decode the tiles of the region into ``out`` (a region array or a
        :class:`TiledRegion`), in this thread and the pool's."""
        fd, pool = self._resources()
        tasks = self._plan(x, y, width, height, out)
        fetched: list[bytes] | None = None
        if self._source is not None and tasks:
            fetched = self._fetch(tasks)
        if pool is None or len(tasks) < 2:
            for i, task in enumerate(tasks):
                self._run(fd, task, x, y, out, None if fetched is None else fetched[i])
            return
        # The caller and threads - 1 pool workers take tasks from one counter until none is left:
        # balanced to the last task, and no future per task.
        counter = itertools.count()
        errors: list[BaseException] = []

        def work() -> None:
            while not errors and (i := next(counter)) < len(tasks):
                try:
                    self._run(fd, tasks[i], x, y, out, None if fetched is None else fetched[i])
                except BaseException as exc:
                    errors.append(exc)

        helpers = [pool.submit(work) for _ in range(min(self.threads, len(tasks)) - 1)]
        work()
        for helper in helpers:
            helper.result()
        if errors:
            raise errors[0]

    def close(self) -> None:
        """Shut the thread pool down and close the file; reading afterwards raises."""
        with self._lock:
            self._closed = True
            pool, fd, owned = self._pool, self._fd, self._pid == os.getpid()
            self._pool = self._fd = None
        if owned and pool is not None:
            pool.shutdown(wait=True)
        if owned and fd is not None and fd >= 0:
            os.close(fd)

    def __enter__(self) -> TileDecoder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for key in ("_lock", "_fd", "_pool"):
            del state[key]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock, self._fd, self._pool, self._pid = threading.Lock(), None, None, os.getpid()

    # -- internals ----------------------------------------------------------------------------

    def _fetch(self, tasks: list[_Task]) -> list[bytes]:
        """The bytes of every task of a remote object, fetched together (see :class:`RangeSource`)."""
        assert self._source is not None
        try:
            return self._source.fetch([(offset, count) for offset, count, _ in tasks])
        except SlideReadError:
            raise
        except OSError as exc:  # the disk cache
            raise SlideReadError(self.path, f"cannot read the tiles of level {self.level}: {exc}") from exc

    def _resources(self) -> tuple[int, ThreadPoolExecutor | None]:
        """This process's file descriptor (-1 for a remote object) and (when ``threads > 1``)
        thread pool, made lazily."""
        with self._lock:
            if self._closed:
                raise SlideReadError(self.path, f"the tile decoder of level {self.level} is closed")
            if self._pid != os.getpid():  # inherited through fork: the pool's threads are gone
                self._fd, self._pool, self._pid = None, None, os.getpid()
            if self._source is not None:
                self._fd = -1
            if self._fd is None:
                try:
                    self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
                except OSError as exc:
                    raise SlideReadError(self.path, f"cannot open for tile reads: {exc}") from exc
            if self._pool is None and self.threads > 1:
                self._pool = ThreadPoolExecutor(
                    self.threads - 1, thread_name_prefix="bigsmall-tiles"
                )
            return self._fd, self._pool

    def _plan(self, x: int, y: int, width: int, height: int, out: _Sink) -> list[_Task]:
        """Group the tiles covering the region into reads; fill absent tiles with ``nodata``."""
        tw, th = self.tile_width, self.tile_height
        cols = range(x // tw, (x + width - 1) // tw + 1)
        rows = range(y // th, (y + height - 1) // th + 1)
        runs: list[_Task] = []
        for row in rows:
            run: _Task | None = None
            for col in cols:
                index = row * self.tiles_across + col
                offset, count = int(self._offsets[index]), int(self._bytecounts[index])
                if count == 0:
                    if isinstance(out, TiledRegion):
                        out.tiles[row - rows.start, col - cols.start] = self.nodata
                    else:
                        oy, ox = max(row * th - y, 0), max(col * tw - x, 0)
                        out[
                            oy : min((row + 1) * th - y, height), ox : min((col + 1) * tw - x, width)
                        ] = self.nodata
                    run = None
                    continue
                if run is not None and 0 <= offset - (run[0] + run[1]) <= _MAX_GAP:
                    end = offset + count - run[0]
                    if end <= _MAX_RUN:
                        run = (run[0], end, [*run[2], (col, row, offset - run[0], count)])
                        runs[-1] = run
                        continue
                run = (offset, count, [(col, row, 0, count)])
                runs.append(run)
        # Split runs into small tasks so that the threads finish together (a tile decodes in about
        # 1 ms; a read of a few tiles costs microseconds).
        n_tiles = sum(len(r[2]) for r in runs)
        per_task = min(8, max(1, n_tiles // (8 * self.threads))) if self.threads > 1 else n_tiles
        tasks: list[_Task] = []
        for start, _, tiles in runs:
            for i in range(0, len(tiles), per_task):
                part = tiles[i : i + per_task]
                first, last = part[0][2], part[-1][2] + part[-1][3]
                tasks.append(
                    (start + first, last - first, [(c, r, s - first, n) for c, r, s, n in part])
                )
        return tasks

    def _decode(self, data: memoryview, slot: np.ndarray | None = None) -> np.ndarray:
        """One tile's pixels (``H x W x 3``), libjpeg's warnings raised as errors when ``strict``;
        written straight into ``slot`` (a contiguous ``tile_height x tile_width x 3`` array) when
        the decoder can and the tile has exactly that size (the returned array is then ``slot``).

        YCbCr tiles (the usual case) are decoded once, by libjpeg-turbo's TurboJPEG API with
        stop-on-warning (simplejpeg): the same pixels as imagecodecs, the check for free. RGB tiles
        without a JFIF marker (Aperio's "RGB" JPEG) need the colour space set, which only imagecodecs
        can; they are decoded by it and then checked (:func:`check_jpeg`). JPEG 2000 tiles are
        decoded by OpenJPEG exactly as tifffile does (see the module's notes)."""
        import imagecodecs

        if self._jpeg2000:
            return cast(np.ndarray, imagecodecs.jpeg2k_decode(cast(bytes, data), numthreads=1))
        if self.strict and self._colorspace is None:
            import simplejpeg

            stream = _whole(data, self._prefix)
            if slot is not None:
                height, width = simplejpeg.decode_jpeg_header(stream)[:2]
                if (height, width) == slot.shape[:2]:
                    simplejpeg.decode_jpeg(stream, colorspace="RGB", strict=True, buffer=slot)
                    return slot
            return simplejpeg.decode_jpeg(stream, colorspace="RGB", strict=True)
        tile = imagecodecs.jpeg8_decode(
            cast(bytes, data),  # any buffer works
            tables=self._tables,
            colorspace=self._colorspace,
            outcolorspace=_RGB,
        )
        if self.strict:
            check_jpeg(data, self._prefix)
        return tile

    def _run(
        self, fd: int, task: _Task, x: int, y: int, out: _Sink, data: bytes | None = None
    ) -> None:
        """Read one task's bytes (unless given), decode its tiles and copy their parts of the
        region into ``out`` (a :class:`TiledRegion`: each whole tile into its slot)."""
        offset, count, tiles = task
        tw, th = self.tile_width, self.tile_height
        height, width = out.shape[:2]
        tiled = out if isinstance(out, TiledRegion) else None
        try:
            if data is None:
                data = os.pread(fd, count, offset)
        except OSError as exc:
            col, row = tiles[0][:2]
            raise SlideReadError(
                self.path,
                f"cannot read {self._codec} tile (col, row) = ({col}, {row}) of level "
                f"{self.level} at file offset {offset}: {exc}",
            ) from exc
        view = memoryview(data)
        for col, row, start, size in tiles:
            left, top = col * tw, row * th
            need_h, need_w = min(th, self.height - top), min(tw, self.width - left)
            try:
                if start + size > len(data):
                    raise ValueError(
                        f"the file ends {start + size - len(data)} bytes into the tile"
                    )
                slot = None
                if tiled is not None:
                    slot = tiled.tiles[row - (y - tiled.top) // th, col - (x - tiled.left) // tw]
                tile = self._decode(view[start : start + size], slot)
                if tile is slot:
                    continue
                if (
                    tile.ndim != 3
                    or tile.shape[2] != 3
                    or tile.shape[0] < need_h
                    or tile.shape[1] < need_w
                    or tile.dtype != np.uint8
                ):
                    raise ValueError(
                        f"decoded {tile.dtype} of shape {tile.shape}, "
                        f"expected uint8 ({th}, {tw}, 3)"
                    )
            except Exception as exc:  # imagecodecs and simplejpeg raise their own error types
                raise SlideReadError(
                    self.path,
                    f"cannot decode {self._codec} tile (col, row) = ({col}, {row}) of level "
                    f"{self.level} at file offset {offset + start}: {exc}",
                ) from exc
            if slot is not None:  # a tile of another size, or decoded elsewhere: its pixels
                slot[:need_h, :need_w] = tile[:need_h, :need_w]
                continue
            assert isinstance(out, np.ndarray)
            oy0, ox0 = max(top - y, 0), max(left - x, 0)
            oy1, ox1 = min(top + th - y, height), min(left + tw - x, width)
            ty0, tx0 = oy0 + y - top, ox0 + x - left
            out[oy0:oy1, ox0:ox1] = tile[ty0 : ty0 + oy1 - oy0, tx0 : tx0 + ox1 - ox0]


def _duplicate(tif: tifffile.TiffFile) -> int | None:
    """A new descriptor of the file ``tif`` reads (None when it is not a plain file)."""
    try:
        fd = os.dup(tif.filehandle.fileno())
    except (AttributeError, OSError, ValueError):
        return None
    os.set_inheritable(fd, False)
    return fd


def _whole(data: bytes | memoryview, tables: bytes) -> bytes | memoryview:
    """A whole JPEG stream: ``data`` itself, or the JPEGTables segments (``tables``, without their
    EOI) followed by the abbreviated tile ``data`` without its SOI."""
    return data if not tables else tables + bytes(data[2:])


def check_jpeg(data: bytes | memoryview, tables: bytes = b"") -> None:
    """Raise ``ValueError`` with libjpeg's message when decoding ``data`` (a JPEG stream, or an
    abbreviated one after ``tables``: the JPEGTables segments without their EOI) gives a libjpeg
    warning or error; return None when libjpeg decodes it cleanly.

    The check decodes at 1/8 scale in grey (the entropy decoding runs in full; the inverse DCT and
    colour conversion barely do), with TurboJPEG's stop-on-warning flag; the GIL is released.
    """
    import simplejpeg

    stream = _whole(data, tables)
    simplejpeg.decode_jpeg(stream, colorspace="GRAY", min_factor=8, strict=True)


def check_page_tiles(
    path: str | os.PathLike[str],
    page: tifffile.TiffPage,
    x: int,
    y: int,
    width: int,
    height: int,
    *,
    level: int | str,
) -> None:
    """Run :func:`check_jpeg` over the tiles of a JPEG-tiled ``page`` that the region (in the page's
    pixels) touches: the strict check for pages read through tiffslide (those the fast path does not
    take). Raises :class:`~bigsmall_torch.SlideReadError` naming the file, level and tile."""
    if page.compression != _JPEG or not page.is_tiled:
        return
    tw, th = int(page.tilewidth), int(page.tilelength)
    across = -(-int(page.imagewidth) // tw)
    per_plane = across * -(-int(page.imagelength) // th)
    planes = int(page.samplesperpixel) if page.planarconfig == 2 else 1
    tables = page.jpegtables[:-2] if page.jpegtables else b""
    offsets, counts = page.dataoffsets, page.databytecounts
    from .._paths import RemotePath

    if isinstance(path, RemotePath):
        from .remote import RemoteFile

        handle: Any = RemoteFile(path)
    else:
        handle = open(path, "rb")  # noqa: SIM115 - closed below
    with handle as f:
        for row in range(y // th, (y + height - 1) // th + 1):
            for col in range(x // tw, (x + width - 1) // tw + 1):
                for plane in range(planes):
                    index = plane * per_plane + row * across + col
                    if index >= len(counts) or not counts[index]:
                        continue
                    f.seek(offsets[index])
                    data = f.read(counts[index])
                    try:
                        check_jpeg(data, tables)
                    except Exception as exc:
                        raise SlideReadError(
                            path,
                            f"corrupt JPEG tile (col, row) = ({col}, {row}) of level {level} at "
                            f"file offset {offsets[index]}: {exc}",
                        ) from exc
