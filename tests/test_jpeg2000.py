"""JPEG 2000 slides: the synthetic writer's Aperio 33005 slides, and the tile-direct fast path for
JPEG 2000 levels (33003, 33004, 33005, 34712) giving tiffslide's pixels (and, for 33005,
openslide's)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bigsmall_torch.errors import ConfigError, SlideReadError
from bigsmall_torch.io._tiles import TileDecoder
from bigsmall_torch.io.slide import open_slide
from bigsmall_torch.synthetic import (
    SyntheticSlideInfo,
    TileCompression,
    synthesize_slides,
    write_synthetic_slide,
)

pytest.importorskip("imagecodecs").jpeg2k_decode  # noqa: B018
tifffile = pytest.importorskip("tifffile")
tiffslide = pytest.importorskip("tiffslide")
openslide = pytest.importorskip("openslide")

# Not multiples of the tile: padded edge tiles at every level (2000x1300, 1000x650, 500x325).
WIDTH, HEIGHT, TILE = 2000, 1300, 256
APERIO_RGB = 33005


@pytest.fixture(scope="module")
def j2k(tmp_path_factory: pytest.TempPathFactory) -> SyntheticSlideInfo:
    path = tmp_path_factory.mktemp("jpeg2000") / "j2k.svs"
    return write_synthetic_slide(path, width=WIDTH, height=HEIGHT, tile_size=TILE, levels=3,
                                 compression="jpeg2000", tissue="blobs", seed=3)  # fmt: skip


def _decoder(path: Path, level: int, *, threads: int = 1) -> TileDecoder:
    with tifffile.TiffFile(path) as tif:
        decoder = TileDecoder.for_level(
            tif, tif.series[0].levels[level].keyframe, path=path, threads=threads
        )
    if decoder is None:
        raise AssertionError(f"level {level} of {path} should be eligible for the fast path")
    return decoder


def _regions(width: int, height: int) -> list[tuple[int, int, int, int]]:
    """(x, y, w, h) in level pixels: across tile boundaries, inside one tile, edges, whole level."""
    return [
        (100, 37, min(500, width - 100), min(455, height - 37)),  # unaligned, several tiles
        (TILE - 8, TILE - 8, 16, 16),  # the corner of four tiles
        (TILE + 10, 20, 100, 50),  # inside one tile
        (width - 300, height - 200, 300, 200),  # bottom-right corner: padded tiles
        (width - 1, 0, 1, height),  # last column
        (0, height - 1, width, 1),  # last row
        (0, 0, width, height),  # the whole level
    ]


_references: dict[tuple[Path, int, tuple[int, int, int, int], str], np.ndarray] = {}


def _reference(path: Path, level: int, region: tuple[int, int, int, int], backend: str) -> Any:
    """The region as ``backend`` reads it (level-0 location = level pixels x 2**level)."""
    key = (path, level, region, backend)
    if key not in _references:
        x, y, w, h = region
        location = (x << level, y << level)
        if backend == "tiffslide":
            with tiffslide.TiffSlide(path) as slide:
                got = slide.read_region(location, level, (w, h), as_array=True)
        else:
            with openslide.OpenSlide(path) as slide:
                got = np.asarray(slide.read_region(location, level, (w, h)))[..., :3]
        _references[key] = np.asarray(got)
    return _references[key]


# -- the synthetic writer ------------------------------------------------------------------------


def test_writer_makes_an_aperio_33005_slide(j2k: SyntheticSlideInfo) -> None:
    assert j2k.compression is TileCompression.JPEG2000
    assert j2k.quality == 32  # quality=None: the default PSNR target for JPEG 2000
    assert j2k.parameters()["compression"] == "jpeg2000"
    with tifffile.TiffFile(j2k.path) as tif:
        assert tif.is_svs
        levels = [level.keyframe for level in tif.series[0].levels]
        assert [page.compression for page in levels] == [APERIO_RGB] * 3
        assert all(page.photometric == tifffile.PHOTOMETRIC.RGB for page in levels)
        thumbnail = tif.pages[1]
        assert not thumbnail.is_tiled and thumbnail.compression == tifffile.COMPRESSION.JPEG
        assert "J2K/KDU Q=32" in tif.pages[0].description
    with openslide.OpenSlide(j2k.path) as slide:
        assert slide.properties["openslide.vendor"] == "aperio"
        assert slide.level_dimensions == j2k.level_dimensions
        assert float(slide.properties["openslide.mpp-x"]) == 0.5


@pytest.mark.parametrize("level", [0, 1, 2])
def test_openslide_and_tiffslide_agree(j2k: SyntheticSlideInfo, level: int) -> None:
    whole = (0, 0, *j2k.level_dimensions[level])
    np.testing.assert_array_equal(
        _reference(j2k.path, level, whole, "openslide"),
        _reference(j2k.path, level, whole, "tiffslide"),
    )


def test_cached_slide_of_another_compression_is_replaced(tmp_path: Path) -> None:
    kwargs: dict[str, Any] = {"width": 256, "height": 256, "tile_size": 128, "seed": 5}
    (jpeg,) = synthesize_slides(tmp_path, n=1, **kwargs)
    assert jpeg.compression is TileCompression.JPEG and jpeg.quality == 90
    (info,) = synthesize_slides(tmp_path, n=1, compression="jpeg2000", **kwargs)
    assert info.path == jpeg.path
    with tifffile.TiffFile(info.path) as tif:
        assert tif.pages[0].compression == APERIO_RGB
    stamp = info.path.stat().st_mtime_ns, info.path.stat().st_ino
    synthesize_slides(tmp_path, n=1, compression=TileCompression.JPEG2000, **kwargs)
    assert (info.path.stat().st_mtime_ns, info.path.stat().st_ino) == stamp  # re-used
    (back,) = synthesize_slides(tmp_path, n=1, **kwargs)
    with tifffile.TiffFile(back.path) as tif:
        assert tif.pages[0].compression == tifffile.COMPRESSION.JPEG


def test_unknown_compression_is_refused(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError, match=r"compression='webp' is invalid; expected one of 'jpeg', 'jpeg2000'"
    ):
        write_synthetic_slide(tmp_path / "x.svs", width=256, height=256, compression="webp")
    assert not list(tmp_path.iterdir())


# -- the fast path -------------------------------------------------------------------------------


def test_fast_path_takes_every_jpeg2000_level(j2k: SyntheticSlideInfo) -> None:
    for level in range(3):
        with _decoder(j2k.path, level) as decoder:
            assert decoder.compression == APERIO_RGB and decoder.level == level


def test_reader_uses_the_fast_path(
    j2k: SyntheticSlideInfo, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through ``open_slide``: tiffslide's read_region (the old path) is never called."""
    want = _reference(j2k.path, 1, (100, 37, 500, 455), "tiffslide")

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("read_region was called: the fast path was not taken")

    monkeypatch.setattr(tiffslide.TiffSlide, "read_region", refuse)
    reader = open_slide(j2k.path, backend="tiffslide", decode_threads=2)
    try:
        np.testing.assert_array_equal(reader.read(200, 74, 1, 500, 455), want)
    finally:
        reader.close()


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("level", [0, 1, 2])
def test_pixels_equal_tiffslide_and_openslide(
    j2k: SyntheticSlideInfo, level: int, threads: int
) -> None:
    with _decoder(j2k.path, level, threads=threads) as decoder:
        assert (decoder.width, decoder.height) == j2k.level_dimensions[level]
        for region in _regions(decoder.width, decoder.height):
            got = decoder.read(*region)
            assert got.shape == (region[3], region[2], 3) and got.dtype == np.uint8
            for backend in ("tiffslide", "openslide"):
                want = _reference(j2k.path, level, region, backend)
                np.testing.assert_array_equal(got, want, err_msg=f"{backend} region={region}")
        planar = decoder.read(10, 7, 300, 300, planar=True)
        np.testing.assert_array_equal(planar, decoder.read(10, 7, 300, 300))
        tiled = decoder.read_tiled(10, 7, 300, 300)  # decoded, then copied into the tiles' slots
        np.testing.assert_array_equal(np.asarray(tiled), planar)


@pytest.mark.parametrize(
    "tag", [33003, 33004, 34712], ids=["aperio-ycbcr-33003", "lossy-33004", "jpeg2000-34712"]
)
def test_other_jpeg2000_tags_equal_tiffslide(
    j2k: SyntheticSlideInfo, tmp_path: Path, tag: int
) -> None:
    """The same codestreams under Aperio's "YCbCr" tag 33003, 33004 and the generic 34712: tifffile
    (so tiffslide) decodes every JPEG 2000 tag alike, with imagecodecs and no conversion of its own,
    and so does the fast path. (openslide would read these 33003 tiles' RGB components as YCbCr, and
    refuses the others.)"""
    path = tmp_path / f"j2k-{tag}.svs"
    shutil.copy(j2k.path, path)
    with tifffile.TiffFile(path, mode="r+b") as tif:
        for level in tif.series[0].levels:
            level.keyframe.tags["Compression"].overwrite(tag)
    for level in range(3):
        with _decoder(path, level, threads=2) as decoder:
            assert decoder.compression == tag
            for region in _regions(decoder.width, decoder.height)[:4]:
                want = _reference(path, level, region, "tiffslide")
                np.testing.assert_array_equal(decoder.read(*region), want, err_msg=f"{region}")


def _tile(path: Path, col: int, row: int) -> tuple[int, int]:
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        index = row * -(-page.imagewidth // page.tilewidth) + col
        return int(page.dataoffsets[index]), int(page.databytecounts[index])


@pytest.mark.parametrize("strict", [True, False], ids=["strict", "lenient"])
@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("damage", ["header", "truncated"])
def test_broken_codestream_raises_naming_file_level_and_tile(
    j2k: SyntheticSlideInfo, tmp_path: Path, damage: str, threads: int, strict: bool
) -> None:
    """A codestream OpenJPEG cannot decode is an error in either mode (lenient only skips libjpeg's
    warnings, which JPEG 2000 does not have); the tiles around it still read."""
    path = tmp_path / "broken.svs"
    shutil.copy(j2k.path, path)
    if damage == "header":  # the main header (SIZ, COD, QCD) overwritten
        offset, _ = _tile(path, 2, 1)
        with open(path, "r+b") as f:
            f.seek(offset)
            f.write(b"\x00" * 64)
    else:  # the codestream cut in half (as a file written only partly)
        with tifffile.TiffFile(path, mode="r+b") as tif:
            counts = list(tif.pages[0].databytecounts)
            counts[1 * -(-WIDTH // TILE) + 2] //= 2
            tif.pages[0].tags["TileByteCounts"].overwrite(counts)
    reader = open_slide(path, backend="tiffslide", decode_threads=threads, strict=strict)
    try:
        with pytest.raises(
            SlideReadError, match=r"JPEG 2000 tile \(col, row\) = \(2, 1\) of level 0"
        ) as info:
            reader.read(300, 100, 0, 700, 400)
        assert info.value.path == path
        np.testing.assert_array_equal(
            reader.read(0, 0, 0, 2 * TILE, 2 * TILE),
            _reference(j2k.path, 0, (0, 0, 2 * TILE, 2 * TILE), "tiffslide"),
        )
    finally:
        reader.close()


def test_decoder_refuses_an_unknown_compression(j2k: SyntheticSlideInfo) -> None:
    with pytest.raises(ConfigError, match=r"compression must be .* got 50001"):
        TileDecoder(j2k.path, level=0, size=(256, 256), tile=(256, 256), offsets=np.zeros(1),
                    bytecounts=np.zeros(1), jpegtables=None, colorspace=None,
                    compression=50001)  # fmt: skip
