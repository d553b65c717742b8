"""The tile-direct fast path (:mod:`bigsmall_torch.io._tiles`) gives tiffslide's and openslide's pixels."""

from __future__ import annotations

import multiprocessing
import os
import pickle
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bigsmall_torch.errors import ConfigError, SlideReadError
from bigsmall_torch.io._tiles import TileDecoder, TiledRegion
from bigsmall_torch.synthetic import write_synthetic_slide

tifffile = pytest.importorskip("tifffile")
tiffslide = pytest.importorskip("tiffslide")
openslide = pytest.importorskip("openslide")

WIDTH, HEIGHT, TILE = 3000, 2100, 256  # not multiples of the tile: padded edge tiles


@pytest.fixture(scope="module")
def odd_slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3000x2100 pyramidal JPEG slide, levels 3000x2100, 1500x1050, 750x525."""
    path = tmp_path_factory.mktemp("tiles") / "odd.tiff"
    write_synthetic_slide(path, width=WIDTH, height=HEIGHT, tile_size=TILE, tissue="blobs", seed=3)
    return path


def _decoder(path: Path, level: int, *, threads: int = 4) -> TileDecoder:
    with tifffile.TiffFile(path) as tif:
        decoder = TileDecoder.for_level(
            tif, tif.series[0].levels[level].keyframe, path=path, threads=threads
        )
    if decoder is None:
        raise AssertionError(f"level {level} of {path} should be eligible for the fast path")
    return decoder


def _regions(width: int, height: int, tile: int) -> Iterator[tuple[int, int, int, int]]:
    """(x, y, w, h) in level pixels: aligned, unaligned, single tile, edges, whole level, 1x1."""
    yield from [
        (tile, 2 * tile, 2 * tile, tile),  # aligned, two tiles
        (100, 37, 700, 555),  # unaligned, many tiles
        (tile + 10, tile + 20, 100, 50),  # inside one tile
        (tile, tile, tile, tile),  # exactly one tile
        (width - 300, height - 200, 300, 200),  # bottom-right corner (padded tiles)
        (width - 1, 0, 1, height),  # last column, full height
        (0, height - 1, width, 1),  # last row, full width
        (0, 0, width, height),  # the whole level
        (0, 0, 1, 1),
        (width - 1, height - 1, 1, 1),
    ]


def _reference(path: Path, level: int, region: tuple[int, int, int, int]) -> list[np.ndarray]:
    """The region as tiffslide and openslide read it (level-0 location = level pixels x 2**level)."""
    x, y, w, h = region
    with tiffslide.TiffSlide(path) as ts:
        ds = ts.level_downsamples[level]
        location = (round(x * ds), round(y * ds))
        by_tiffslide = np.asarray(ts.read_region(location, level, (w, h), as_array=True))
    with openslide.OpenSlide(path) as osl:
        by_openslide = np.asarray(osl.read_region(location, level, (w, h)))[..., :3]
    return [by_tiffslide, by_openslide]


@pytest.mark.parametrize("threads", [1, 4])
@pytest.mark.parametrize("level", [0, 1])
def test_pixels_equal_tiffslide_and_openslide(odd_slide: Path, level: int, threads: int) -> None:
    with _decoder(odd_slide, level, threads=threads) as decoder:
        assert (decoder.width, decoder.height) == (WIDTH >> level, HEIGHT >> level)
        for region in _regions(decoder.width, decoder.height, TILE):
            got = decoder.read(*region)
            assert got.shape == (region[3], region[2], 3) and got.dtype == np.uint8
            for name, want in zip(
                ("tiffslide", "openslide"), _reference(odd_slide, level, region), strict=True
            ):
                np.testing.assert_array_equal(got, want, err_msg=f"{name} region={region}")


@pytest.mark.parametrize("threads", [1, 4])
def test_pixels_equal_on_real_aperio_slide(cmu1: Path, threads: int) -> None:
    with _decoder(cmu1, 0, threads=threads) as decoder:
        assert (decoder.width, decoder.height, decoder.tile_width) == (2220, 2967, 240)
        for region in _regions(decoder.width, decoder.height, 240):
            got = decoder.read(*region)
            for name, want in zip(
                ("tiffslide", "openslide"), _reference(cmu1, 0, region), strict=True
            ):
                np.testing.assert_array_equal(got, want, err_msg=f"{name} region={region}")


def _check_tiled(decoder: TileDecoder, region: tuple[int, int, int, int], seed: int = 0) -> None:
    """``read_tiled`` holds ``read``'s pixels: whole, and cut at random rectangles into HWC and
    channel-planar (transposed) arrays."""
    want = decoder.read(*region)
    tiled = decoder.read_tiled(*region)
    assert isinstance(tiled, TiledRegion) and tiled.shape == want.shape
    tw, th = decoder.tile_width, decoder.tile_height
    assert tiled.tiles.shape[2:] == (th, tw, 3) and tiled.tiles[0, 0].flags.c_contiguous
    np.testing.assert_array_equal(np.asarray(tiled), want, err_msg=f"region={region}")
    rng = np.random.default_rng(seed)
    for _ in range(8):
        h, w = int(rng.integers(1, want.shape[0] + 1)), int(rng.integers(1, want.shape[1] + 1))
        top, left = int(rng.integers(0, want.shape[0] - h + 1)), int(rng.integers(0, want.shape[1] - w + 1))
        np.testing.assert_array_equal(tiled.crop(top, left, h, w), want[top : top + h, left : left + w])
        planar = np.zeros((3, h, w), np.uint8)
        tiled.copy_to(planar.transpose(1, 2, 0), top, left)
        np.testing.assert_array_equal(planar.transpose(1, 2, 0), want[top : top + h, left : left + w])


@pytest.mark.parametrize("threads", [1, 4])
@pytest.mark.parametrize("level", [0, 1])
def test_tiled_regions_hold_the_pixels_of_read(odd_slide: Path, level: int, threads: int) -> None:
    with _decoder(odd_slide, level, threads=threads) as decoder:
        for i, region in enumerate(_regions(decoder.width, decoder.height, TILE)):
            _check_tiled(decoder, region, seed=i)


def test_tiled_regions_on_real_aperio_slide(cmu1: Path) -> None:
    with _decoder(cmu1, 0) as decoder:
        for i, region in enumerate(_regions(decoder.width, decoder.height, 240)):
            _check_tiled(decoder, region, seed=i)


def test_tiled_region_bounds_are_checked(odd_slide: Path) -> None:
    with _decoder(odd_slide, 0) as decoder:
        tiled = decoder.read_tiled(100, 37, 700, 555)
        with pytest.raises(SlideReadError, match="outside level 0"):
            decoder.read_tiled(2990, 0, 11, 10)
    assert tiled.tiles.shape[:2] == (3, 4)  # rows 0-2, columns 0-3 of 256 px tiles
    with pytest.raises(ValueError, match="outside the 700x555 region"):
        tiled.copy_to(np.empty((10, 10, 3), np.uint8), 550, 0)
    with pytest.raises(ValueError, match="outside the 700x555 region"):
        tiled.crop(0, -1, 5, 5)
    with pytest.raises(ValueError, match="does not fit"):
        TiledRegion(tiled.tiles, 100, 37, 1000, 555)


def test_level_number_is_found(odd_slide: Path) -> None:
    with _decoder(odd_slide, 1) as decoder:
        assert decoder.level == 1


@pytest.mark.parametrize(
    "options",
    [
        pytest.param({"tile": (256, 256), "compression": "zlib"}, id="tiled-zlib"),
        pytest.param({"tile": (256, 256), "compression": "lzw"}, id="tiled-lzw"),
        pytest.param({"tile": (256, 256)}, id="tiled-raw"),
        pytest.param({"compression": "jpeg"}, id="stripped-jpeg"),
        pytest.param({"tile": (256, 256), "compression": "jpeg", "gray": True}, id="gray-jpeg"),
    ],
)
def test_ineligible_pages_give_none(tmp_path: Path, options: dict[str, Any]) -> None:
    path = tmp_path / "plain.tiff"
    gray = options.pop("gray", False)
    data = np.random.default_rng(0).integers(0, 255, (300, 400, 3), dtype=np.uint8)
    tifffile.imwrite(path, data[..., 0] if gray else data, **options)
    with tifffile.TiffFile(path) as tif:
        assert TileDecoder.for_level(tif, tif.pages[0], path=path) is None


def test_stripped_thumbnail_of_real_slide_gives_none(cmu1: Path) -> None:
    with tifffile.TiffFile(cmu1) as tif:
        assert not tif.pages[1].is_tiled
        assert TileDecoder.for_level(tif, tif.pages[1], path=cmu1) is None


def _tile_location(path: Path, level: int, col: int, row: int) -> tuple[int, int]:
    with tifffile.TiffFile(path) as tif:
        page = tif.series[0].levels[level].keyframe
        index = row * -(-page.imagewidth // page.tilewidth) + col
        return int(page.dataoffsets[index]), int(page.databytecounts[index])


@pytest.mark.parametrize("threads", [1, 4])
def test_corrupted_tile_raises_naming_it(odd_slide: Path, tmp_path: Path, threads: int) -> None:
    path = tmp_path / "corrupt.tiff"
    shutil.copy(odd_slide, path)
    offset, count = _tile_location(path, 0, 2, 1)
    with open(path, "r+b") as file:
        file.seek(offset)
        file.write((b"garbage!" * count)[:count])
    with _decoder(path, 0, threads=threads) as decoder:
        with pytest.raises(
            SlideReadError, match=r"tile \(col, row\) = \(2, 1\) of level 0"
        ) as info:
            decoder.read(0, 0, 1024, 1024)
        assert info.value.path == path
        with pytest.raises(SlideReadError, match=r"tile \(col, row\) = \(2, 1\) of level 0"):
            decoder.read_tiled(300, 200, 500, 200)  # tiles decoded into their slots
        good = decoder.read(0, 0, 512, 256)  # tiles (0, 0) and (1, 0) still read
        np.testing.assert_array_equal(good, _reference(odd_slide, 0, (0, 0, 512, 256))[0])


def test_tile_past_the_end_of_file_raises_naming_it(odd_slide: Path, tmp_path: Path) -> None:
    path = tmp_path / "truncated.tiff"
    shutil.copy(odd_slide, path)
    with tifffile.TiffFile(path, mode="r+b") as tif:
        page = tif.pages[0]
        offsets = list(page.dataoffsets)
        offsets[14] = path.stat().st_size - 10  # tile (2, 1) runs 10 bytes into the tile, then EOF
        page.tags["TileOffsets"].overwrite(offsets)
    with _decoder(path, 0) as decoder, pytest.raises(SlideReadError, match=r"\(2, 1\) of level 0"):
        decoder.read(0, 0, 1024, 1024)


def test_absent_tiles_are_filled_like_tiffslide(odd_slide: Path, tmp_path: Path) -> None:
    path = tmp_path / "sparse.tiff"
    shutil.copy(odd_slide, path)
    with tifffile.TiffFile(path, mode="r+b") as tif:
        page = tif.pages[0]
        offsets, counts = list(page.dataoffsets), list(page.databytecounts)
        offsets[13] = counts[13] = 0  # tile (1, 1): 12 tiles across
        page.tags["TileOffsets"].overwrite(offsets)
        page.tags["TileByteCounts"].overwrite(counts)
    # The first region starts in tile (0, 0); the second in tile (1, 1) itself, so that the absent
    # tile is the region's first: a slot index taken relative to the wrong origin shows.
    for region, hole in [((200, 200, 600, 300), np.s_[56:, 56:312]), ((300, 300, 400, 300), np.s_[:212, :212])]:
        with _decoder(path, 0) as decoder:
            got = decoder.read(*region)
            tiled = decoder.read_tiled(*region)
        assert (got[hole] == 0).all()
        assert got.any(axis=2).sum() > got.shape[0] * got.shape[1] // 3  # the other tiles are there
        np.testing.assert_array_equal(np.asarray(tiled), got, err_msg=f"region={region}")
        for name, want in zip(("tiffslide", "openslide"), _reference(path, 0, region), strict=True):
            np.testing.assert_array_equal(got, want, err_msg=f"{name} region={region}")


def test_tiles_of_other_sizes_than_the_tag_says(tmp_path: Path) -> None:
    """Tiles whose JPEG is not tile-sized (cropped edge tiles as some writers store them, a tile
    larger than the tag says) and an absent tile: ``read`` shows the level's pixels, and
    ``read_tiled``, which decodes tile-sized JPEGs straight into their slots, holds the same."""
    simplejpeg = pytest.importorskip("simplejpeg")
    width, height, tile = 700, 600, 256  # row 1: tile-sized JPEGs; row 2 and column 2 cropped
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 255, ((height + 300) // 8, (width + 300) // 8, 3), dtype=np.uint8)
    image = np.ascontiguousarray(np.kron(blocks, np.ones((8, 8, 1), np.uint8)))  # JPEG-friendly
    offsets, counts, data = [], [], bytearray()
    for row in range(-(-height // tile)):
        for col in range(-(-width // tile)):
            if (row, col) == (0, 1):  # absent
                offsets.append(0)
                counts.append(0)
                continue
            h, w = min(tile, height - row * tile), min(tile, width - col * tile)
            if (row, col) == (0, 0):
                h = w = tile + 16
            y, x = row * tile, col * tile
            encoded = simplejpeg.encode_jpeg(np.ascontiguousarray(image[y : y + h, x : x + w]), quality=95)
            offsets.append(len(data))
            counts.append(len(encoded))
            data += encoded
    path = tmp_path / "tiles.bin"
    path.write_bytes(bytes(data))
    regions = [(0, 0, width, height), (100, 37, 600, 463), (width - 1, height - 1, 1, 1),
               (255, 255, 2, 2), (300, 0, 400, 600), (0, 300, 700, 200)]  # fmt: skip
    for threads in (1, 4):
        decoder = TileDecoder(
            path, level=0, size=(width, height), tile=(tile, tile), offsets=np.array(offsets),
            bytecounts=np.array(counts), jpegtables=None, colorspace=None, threads=threads, nodata=7,
        )  # fmt: skip
        with decoder:
            whole = decoder.read(0, 0, width, height)
            assert (whole[:tile, tile : 2 * tile] == 7).all()
            present = np.ones(whole.shape[:2], bool)
            present[:tile, tile : 2 * tile] = False
            error = np.abs(whole.astype(int) - image[:height, :width])[present]
            assert error.mean() < 4, "decoded tiles are not the image's pixels where they belong"
            for i, region in enumerate(regions):
                _check_tiled(decoder, region, seed=i)


def test_tiled_region_as_array(odd_slide: Path) -> None:
    with _decoder(odd_slide, 0) as decoder:
        tiled = decoder.read_tiled(100, 37, 300, 200)
        want = decoder.read(100, 37, 300, 200)
    np.testing.assert_array_equal(np.asarray(tiled), want)
    np.testing.assert_array_equal(np.array(tiled, dtype=np.float32), want.astype(np.float32))
    with pytest.raises(ValueError, match="copy"):
        np.asarray(tiled, copy=False)  # its pixels are spread over tiles: no view exists


@pytest.mark.parametrize(
    "region",
    [(-1, 0, 10, 10), (0, -1, 10, 10), (2990, 0, 11, 10), (0, 2095, 10, 6), (0, 0, 0, 5),
     (0, 0, 5, 0), (3000, 2100, 1, 1)],
)  # fmt: skip
def test_region_outside_level_raises(odd_slide: Path, region: tuple[int, int, int, int]) -> None:
    with _decoder(odd_slide, 0) as decoder, pytest.raises(SlideReadError, match="outside level 0"):
        decoder.read(*region)


def test_threads_must_be_positive(odd_slide: Path) -> None:
    with tifffile.TiffFile(odd_slide) as tif, pytest.raises(ConfigError, match="threads"):
        TileDecoder.for_level(tif, tif.pages[0], path=odd_slide, threads=0)


def test_close_is_idempotent_and_final(odd_slide: Path) -> None:
    decoder = _decoder(odd_slide, 0)
    decoder.read(0, 0, 600, 600)
    decoder.close()
    decoder.close()
    with pytest.raises(SlideReadError, match="closed"):
        decoder.read(0, 0, 10, 10)


def test_pickled_decoder_reads_the_same(odd_slide: Path) -> None:
    with _decoder(odd_slide, 1) as decoder:
        want = decoder.read(10, 20, 700, 500)
        copy = pickle.loads(pickle.dumps(decoder))
    with copy:
        np.testing.assert_array_equal(copy.read(10, 20, 700, 500), want)


def test_concurrent_reads_share_one_decoder(odd_slide: Path) -> None:
    regions = [(i * 211, i * 97, 900, 700) for i in range(8)]
    with _decoder(odd_slide, 0, threads=2) as decoder:
        want = [decoder.read(*region) for region in regions]
        with ThreadPoolExecutor(4) as pool:
            got = list(pool.map(lambda region: decoder.read(*region), regions))
    for region, a, b in zip(regions, got, want, strict=True):
        np.testing.assert_array_equal(a, b, err_msg=f"region={region}")


def _read_in_child(decoder: TileDecoder, region: tuple[int, int, int, int], queue: Any) -> None:
    try:
        queue.put(decoder.read(*region))
    except BaseException as exc:
        queue.put(repr(exc))


@pytest.mark.skipif(
    "fork" not in multiprocessing.get_all_start_methods(), reason="needs the fork start method"
)
def test_works_after_fork(odd_slide: Path) -> None:
    region = (100, 100, 1200, 900)
    ctx = multiprocessing.get_context("fork")
    with _decoder(odd_slide, 0, threads=4) as decoder:
        want = decoder.read(*region)  # the parent's pool and descriptor exist before the fork
        queue = ctx.Queue()
        child = ctx.Process(target=_read_in_child, args=(decoder, region, queue))
        child.start()
        got = queue.get(timeout=60)
        child.join(timeout=60)
        assert child.exitcode == 0
        assert isinstance(got, np.ndarray), got
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(decoder.read(*region), want)  # the parent still reads


def test_tiles_come_from_the_file_the_offsets_were_read_from(
    odd_slide: Path, tmp_path: Path
) -> None:
    """A slide replaced (``os.replace``) after it was opened: the decoder reads the tiles of the
    file whose tile offsets it holds, not whatever file the path names now."""
    path = tmp_path / "moving.tiff"
    shutil.copy(odd_slide, path)
    other = tmp_path / "other.tiff"
    write_synthetic_slide(other, width=WIDTH, height=HEIGHT, tile_size=TILE, tissue="blobs", seed=9)
    with tifffile.TiffFile(path) as tif:
        decoder = TileDecoder.for_level(tif, tif.series[0].levels[0].keyframe, path=path)
    assert decoder is not None
    os.replace(other, path)
    with decoder:
        got = decoder.read(100, 37, 700, 555)
    np.testing.assert_array_equal(got, _reference(odd_slide, 0, (100, 37, 700, 555))[0])
