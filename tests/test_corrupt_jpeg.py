"""Corrupt JPEG tiles are errors, never wrong pixels (libjpeg's warnings count as errors, as in
OpenSlide), in the fast path, in tiffslide's path, and through the datasets."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import bigsmall_torch as bst
from bigsmall_torch.errors import SlideReadError
from bigsmall_torch.io._tiles import check_jpeg, check_page_tiles
from bigsmall_torch.io.slide import open_slide

tifffile = pytest.importorskip("tifffile")
openslide = pytest.importorskip("openslide")

TILE = 240  # cmu-1-small-region.svs: 240 x 240 JPEG tiles, photometric RGB, JPEGTables
COL, ROW = 3, 2  # the damaged tile


def _tile(path: Path, col: int, row: int) -> tuple[int, int]:
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        index = row * -(-page.imagewidth // page.tilewidth) + col
        return int(page.dataoffsets[index]), int(page.databytecounts[index])


def _damage(source: Path, target: Path, fill: bytes, percent: int) -> Path:
    """A copy of ``source`` with 16 bytes of tile (COL, ROW), from ``percent`` of its length on,
    set to ``fill``."""
    shutil.copy(source, target)
    target.chmod(0o644)
    offset, count = _tile(target, COL, ROW)
    with open(target, "r+b") as f:
        f.seek(offset + count * percent // 100)
        f.write(fill * 16)
    return target


# Zeroed bytes, and 0xFF bytes followed by a byte libjpeg reads as a marker it can skip (where the
# byte read as a marker is one libjpeg refuses, every decoder raises and nothing is silent).
@pytest.fixture(params=[(b"\x00", 50), (b"\xff", 34)], ids=["zeroed", "0xff"])
def damaged(request: pytest.FixtureRequest, cmu1: Path, tmp_path: Path) -> Path:
    return _damage(cmu1, tmp_path / "damaged.svs", *request.param)


def test_openslide_refuses_the_damaged_tile(damaged: Path) -> None:
    """Ground truth for the tests below: the damage is one that libjpeg reports."""
    region = ((COL - 1) * TILE, (ROW - 1) * TILE), 0, (3 * TILE, 3 * TILE)
    with pytest.raises(openslide.OpenSlideError, match="JPEG"):
        slide = openslide.OpenSlide(damaged)
        try:
            slide.read_region(*region)
        finally:
            slide.close()


def test_lenient_reader_gives_wrong_pixels_silently(damaged: Path, cmu1: Path) -> None:
    lenient = open_slide(damaged, backend="tiffslide", strict=False)
    good = open_slide(cmu1, backend="tiffslide")
    try:
        x, y = COL * TILE, ROW * TILE
        wrong = lenient.read(x, y, 0, TILE, TILE)
        assert (wrong != good.read(x, y, 0, TILE, TILE)).any(axis=2).sum() > 100
    finally:
        lenient.close()
        good.close()


@pytest.mark.parametrize("threads", [1, 3])
def test_fast_path_raises_naming_file_level_and_tile(
    damaged: Path, cmu1: Path, threads: int
) -> None:
    reader = open_slide(damaged, backend="tiffslide", decode_threads=threads)
    reference = open_slide(cmu1, backend="tiffslide")
    try:
        with pytest.raises(
            SlideReadError, match=rf"tile \(col, row\) = \({COL}, {ROW}\) of level 0"
        ) as info:
            reader.read((COL - 1) * TILE + 7, (ROW - 1) * TILE + 5, 0, 3 * TILE, 3 * TILE)
        assert info.value.path == damaged
        assert "Corrupt JPEG data" in str(info.value)
        # Tiles around it still read, and equal the undamaged slide.
        np.testing.assert_array_equal(
            reader.read(0, 0, 0, 2 * TILE, 2 * TILE), reference.read(0, 0, 0, 2 * TILE, 2 * TILE)
        )
    finally:
        reader.close()
        reference.close()


def test_tiffslide_path_is_checked_too(damaged: Path) -> None:
    """Pages the fast path does not take go through tiffslide's read_region; the tiles they touch
    are checked the same way."""
    with tifffile.TiffFile(damaged) as tif:
        page = tif.pages[0]
        check_page_tiles(damaged, page, 0, 0, TILE, TILE, level=0)  # an intact tile: no error
        with pytest.raises(SlideReadError, match=rf"\({COL}, {ROW}\) of level 0"):
            check_page_tiles(damaged, page, COL * TILE + 1, ROW * TILE + 1, 10, 10, level=0)


def test_every_intact_tile_passes_the_check(cmu1: Path, slide_folder: Path) -> None:
    """No false alarms: every tile of the real slide and of a synthetic slide passes."""
    for path in [cmu1, sorted(slide_folder.iterdir())[0]]:
        with tifffile.TiffFile(path) as tif, open(path, "rb") as f:
            for page in [level.keyframe for level in tif.series[0].levels]:
                tables = page.jpegtables[:-2] if page.jpegtables else b""
                for offset, count in zip(page.dataoffsets, page.databytecounts, strict=True):
                    f.seek(offset)
                    check_jpeg(f.read(count), tables)


def test_truncated_stream_is_refused() -> None:
    import imagecodecs

    data = imagecodecs.jpeg8_encode(
        np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    )
    check_jpeg(data)
    with pytest.raises(ValueError, match="JPEG"):
        check_jpeg(data[: len(data) // 2] + b"\xff\xd9")


def _dataset(path: Path) -> bst.Dataset:
    return bst.Dataset("damaged", [bst.Patient("p", {"wsi": bst.Record(path)})])


def test_training_raises_or_skips_never_gives_wrong_patches(damaged: Path) -> None:
    loader = bst.RandomRegionLoader(size=3 * TILE)
    collector = bst.RandomCropCollector(patch_size=TILE)
    dataset = bst.BigSmallDataset(
        _dataset(damaged), loader, collector, buffer_size=1, smallchunks_per_bigchunk=8,
        samples_per_epoch=400, seed=0,
    )  # fmt: skip
    with pytest.raises(SlideReadError, match="Corrupt JPEG data"):
        for _ in torch.utils.data.DataLoader(dataset, batch_size=None):
            pass


def test_inference_reports_the_damaged_windows_missing(damaged: Path, cmu1: Path) -> None:
    kwargs = {"patch_size": TILE // 2, "on_error": "skip", "block_size": 2 * TILE}
    windows = bst.SlidingWindowDataset(_dataset(damaged), **kwargs)
    reference = {
        (s["x"], s["y"]): s["image"] for s in bst.SlidingWindowDataset(_dataset(cmu1), **kwargs)
    }
    got = {(s["x"], s["y"]): s["image"] for s in windows}
    lost = set(reference) - set(got)
    assert lost, "the windows over the damaged tile must not be emitted"
    tile_box = (COL * TILE, ROW * TILE, (COL + 1) * TILE, (ROW + 1) * TILE)
    for x, y in lost:  # every lost window touches the damaged tile...
        assert x < tile_box[2] and x + TILE // 2 > tile_box[0]
        assert y < tile_box[3] and y + TILE // 2 > tile_box[1]
    for key, image in got.items():  # ...and every emitted one carries the right pixels
        assert torch.equal(image, reference[key])


def test_jpeg2000_damage_the_codec_detects_is_an_error(tmp_path: Path) -> None:
    """JPEG 2000 tiles (Aperio 33003/33005, 34712) go through tiffslide and OpenJPEG. A codestream
    whose structure is broken is refused with the file named; random bytes inside the packet data
    are not detectable (no checksum; OpenJPEG decodes them silently): docs/tuning.md says so."""
    pytest.importorskip("imagecodecs").jpeg2k_encode  # noqa: B018
    image = np.random.default_rng(0).integers(0, 255, (512, 512, 3), dtype=np.uint8)
    path = tmp_path / "j2k.tiff"
    tifffile.imwrite(path, image, tile=(256, 256), compression="jpeg2000", photometric="rgb")
    with tifffile.TiffFile(path) as tif:
        offset = int(tif.pages[0].dataoffsets[3])
    with open(path, "r+b") as f:  # tile (1, 1): its main header overwritten
        f.seek(offset)
        f.write(b"\x00" * 64)
    reader = open_slide(path, backend="tiffslide")
    try:
        np.testing.assert_array_equal(reader.read(0, 0, 0, 256, 256), image[:256, :256])
        with pytest.raises(SlideReadError, match=r"j2k\.tiff"):
            reader.read(256, 256, 0, 256, 256)
    finally:
        reader.close()


def test_thumbnail_draws_a_damaged_tile_white_and_says_so(
    damaged: Path, cmu1: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Thumbnails (tissue masks, pictures) of a one-level slide read level 0 whole: the damaged
    piece is drawn as background with a warning instead of failing the whole slide."""
    from bigsmall_torch.visualize import slide_thumbnail

    with caplog.at_level("WARNING", logger="bigsmall_torch.io.tissue"):
        thumb, _ = slide_thumbnail(damaged, size=info_size(cmu1))
    assert "cannot be read and are drawn white" in caplog.text and damaged.name in caplog.text
    good, _ = slide_thumbnail(cmu1, size=info_size(cmu1))
    tile = thumb[ROW * TILE : (ROW + 1) * TILE, COL * TILE : (COL + 1) * TILE]
    assert (tile == 255).all()
    thumb[ROW * TILE : (ROW + 1) * TILE, COL * TILE : (COL + 1) * TILE] = 0
    good[ROW * TILE : (ROW + 1) * TILE, COL * TILE : (COL + 1) * TILE] = 0
    np.testing.assert_array_equal(thumb, good)  # full size: the rest is the slide's own pixels


def info_size(path: Path) -> int:
    return max(bst.slide_info(path).dimensions)


def test_tissue_mask_of_a_damaged_slide_raises(damaged: Path) -> None:
    """A tissue mask must not call a damaged region background: it raises like any read."""
    with pytest.raises(SlideReadError, match="Corrupt JPEG data"):
        bst.tissue_mask(damaged)


def test_a_dataset_can_turn_the_check_off(damaged: Path) -> None:
    """``ds.slides.strict = False`` (documented in docs/tuning.md) reaches the readers it opens."""
    loader = bst.RandomRegionLoader(size=3 * TILE)
    dataset = bst.BigSmallDataset(
        _dataset(damaged), loader, bst.RandomCropCollector(TILE), buffer_size=1,
        smallchunks_per_bigchunk=8, samples_per_epoch=64, seed=0,
    )  # fmt: skip
    dataset.slides.strict = False
    assert len(list(dataset)) == 64  # lenient: no error (and made-up pixels where damaged)
