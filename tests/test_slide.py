from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

import bigsmall_torch as bst


@pytest.mark.parametrize("backend", ["tiffslide", "openslide", "auto"])
def test_backends_read_the_same_pixels(slide_folder: Path, backend: str) -> None:
    path = slide_folder / "synthetic_001.tiff"
    with_tiffslide = bst.open_slide(path, backend="tiffslide")
    reader = bst.open_slide(path, backend=backend)
    assert reader.info.backend == ("tiffslide" if backend == "auto" else backend)
    assert reader.info.level_dimensions == ((3072, 2560), (1536, 1280), (768, 640))
    assert reader.info.level_downsamples == (1.0, 2.0, 4.0)
    assert reader.info.mpp == pytest.approx(0.5)
    for x, y, level, w, h in [(0, 0, 0, 300, 200), (1000, 777, 0, 513, 255), (2048, 1024, 1, 400, 256)]:
        region = reader.read(x, y, level, w, h)
        assert region.shape == (h, w, 3) and region.dtype == np.uint8
        assert np.array_equal(region, with_tiffslide.read(x, y, level, w, h))
    reader.close()
    with_tiffslide.close()


def test_real_slide_metadata(cmu1: Path) -> None:
    info = bst.slide_info(cmu1)
    assert info.dimensions == (2220, 2967) and info.level_count == 1
    assert info.mpp == pytest.approx(0.499, abs=1e-3)
    assert info.tile_size == (240, 240)
    assert bst.slide_info(cmu1, backend="openslide").vendor == "aperio"


def test_open_errors_name_the_file_and_backends(tmp_path: Path, broken_svs: Path) -> None:
    with pytest.raises(bst.SlideOpenError, match=r"missing\.svs: no such file"):
        bst.open_slide(tmp_path / "missing.svs")
    with pytest.raises(bst.SlideOpenError, match="is a folder"):
        bst.open_slide(tmp_path)
    (tmp_path / "empty.svs").write_bytes(b"")
    with pytest.raises(bst.SlideOpenError, match="empty"):
        bst.open_slide(tmp_path / "empty.svs")
    with pytest.raises(bst.SlideOpenError, match=r"broken\.svs.*backends tried: tiffslide, openslide") as info:
        bst.open_slide(broken_svs)
    assert info.value.path == broken_svs and isinstance(info.value, bst.BigSmallError)
    with pytest.raises(bst.SlideOpenError, match=r"backends tried: openslide\)"):
        bst.open_slide(broken_svs, backend="openslide")
    with pytest.raises(bst.ConfigError, match="backend must be one of 'auto', 'openslide', 'tiffslide'"):
        bst.open_slide(broken_svs, backend="vips")


def test_read_outside_the_level_is_refused(slide_folder: Path) -> None:
    reader = bst.open_slide(slide_folder / "synthetic_000.tiff")
    with pytest.raises(bst.SlideReadError, match=r"synthetic_000\.tiff: region .* outside"):
        reader.read(3000, 0, 0, 100, 100)
    with pytest.raises(bst.SlideReadError, match="level 3 does not exist"):
        reader.read(0, 0, 3, 10, 10)
    reader.close()


def test_slide_cache_is_bounded_and_pickles_empty(slide_folder: Path) -> None:
    cache = bst.SlideCache(2)
    paths = sorted(slide_folder.glob("*.tiff"))[:3]
    first = cache.get(paths[0])
    assert cache.get(paths[0]) is first and len(cache) == 1
    cache.get(paths[1])
    cache.get(paths[2])  # evicts paths[0], the least recently used
    assert len(cache) == 2 and cache.get(paths[0]) is not first
    clone = pickle.loads(pickle.dumps(cache))
    assert len(clone) == 0 and clone.capacity == 2
    cache.close()
    assert len(cache) == 0
    with pytest.raises(bst.ConfigError, match="capacity must be an int >= 1"):
        bst.SlideCache(0)


def test_stripped_tiffs_are_plain_images_and_truncated_ones_are_refused(tmp_path: Path, slide_folder: Path) -> None:
    import tifffile

    tifffile.imwrite(tmp_path / "strip.tiff", np.zeros((100, 120, 3), np.uint8))
    with pytest.raises(bst.SlideOpenError, match=r"strip\.tiff.*level 0 is not tiled"):
        bst.open_slide(tmp_path / "strip.tiff", backend="tiffslide")
    assert bst.slide_info(tmp_path / "strip.tiff").backend == "image"  # auto: a plain image
    data = (slide_folder / "synthetic_000.tiff").read_bytes()
    (tmp_path / "truncated.tiff").write_bytes(data[: len(data) // 2])
    with pytest.raises(bst.SlideOpenError, match=r"truncated\.tiff.*the file is truncated"):
        bst.open_slide(tmp_path / "truncated.tiff")
    (tmp_path / "header.tiff").write_bytes(data[:4000])
    with pytest.raises(bst.SlideOpenError, match=r"header\.tiff.*backends tried: tiffslide, openslide"):
        bst.open_slide(tmp_path / "header.tiff")


@pytest.mark.parametrize("where", ["at the second IFD", "inside the second IFD", "inside the last IFD"])
def test_a_tiff_cut_at_an_ifd_is_refused_not_opened_with_levels_missing(
    tmp_path: Path, slide_folder: Path, where: str
) -> None:
    """tifffile stops at an IFD past the end with a logged error and lists the levels before it."""
    import tifffile

    source = slide_folder / "synthetic_000.tiff"
    with tifffile.TiffFile(source) as tif:
        offsets = [page.offset for page in tif.pages]
    assert len(offsets) >= 3 and bst.slide_info(source).level_count >= 2
    cut = {"at the second IFD": offsets[1], "inside the second IFD": offsets[1] + 40,
           "inside the last IFD": offsets[-1] + 2}[where]  # fmt: skip
    (tmp_path / "cut.tiff").write_bytes(source.read_bytes()[:cut])
    with pytest.raises(bst.SlideOpenError, match=rf"cut\.tiff.*tiffslide: the file is truncated: an IFD .* at byte {offsets[1] if 'second' in where else offsets[-1]} "):
        bst.open_slide(tmp_path / "cut.tiff")


def test_jpeg_tiled_levels_use_the_tile_fast_path(slide_folder: Path, cmu1: Path) -> None:
    import openslide

    for path in (slide_folder / "synthetic_003.tiff", cmu1):
        reader = bst.open_slide(path, decode_threads=2)
        assert reader._decoder(0) is not None  # type: ignore[attr-defined]
        slide = openslide.OpenSlide(path)
        region = reader.read(100, 200, 0, 777, 555)
        assert np.array_equal(region, np.asarray(slide.read_region((100, 200), 0, (777, 555)).convert("RGB")))
        slide.close()
        reader.close()
    with pytest.raises(bst.ConfigError, match="decode_threads must be an int >= 1"):
        bst.SlideCache(decode_threads=0)


def test_planar_reads_hold_the_same_pixels(slide_folder: Path) -> None:
    from bigsmall_torch.chunks import channel_planar

    reader = bst.open_slide(slide_folder / "synthetic_002.tiff")
    hwc = reader.read(300, 200, 0, 700, 500)
    planar = reader.read(300, 200, 0, 700, 500, planar=True)
    assert hwc.flags.c_contiguous and planar.transpose(2, 0, 1).flags.c_contiguous
    assert np.array_equal(hwc, planar)
    assert channel_planar(planar) is planar  # nothing to do
    converted = channel_planar(hwc)
    assert np.array_equal(converted, hwc) and converted.transpose(2, 0, 1).flags.c_contiguous
    reader.close()


@pytest.mark.parametrize(("bigtiff", "byteorder"), [(False, ">"), (True, "<"), (True, ">")])
def test_the_ifd_walk_reads_bigtiff_and_big_endian_files(tmp_path: Path, bigtiff: bool, byteorder: str) -> None:
    import io

    import tifffile

    from bigsmall_torch.io.slide import _truncated_ifds

    path = tmp_path / "two.tiff"
    for _ in range(2):
        tifffile.imwrite(path, np.zeros((64, 64, 3), np.uint8), bigtiff=bigtiff, byteorder=byteorder,
                         tile=(16, 16), append=True)  # fmt: skip
    with tifffile.TiffFile(path) as tif:
        second = tif.pages[1].offset
    data = path.read_bytes()
    assert _truncated_ifds(io.BytesIO(data), len(data)) is None
    cut = data[: second + 4]
    why = _truncated_ifds(io.BytesIO(cut), len(cut))
    assert why is not None and f"an IFD (a level or image) at byte {second} ends at byte" in why
