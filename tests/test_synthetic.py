"""The synthetic slide writer: layout, agreement of openslide and tiffslide, content, re-use."""

from __future__ import annotations

import itertools
import math
import os
from pathlib import Path

import numpy as np
import pytest

from bigsmall_torch import synthetic
from bigsmall_torch.synthetic import (
    SyntheticSlideInfo,
    TissueMode,
    synthesize_slides,
    write_synthetic_slide,
)

tifffile = pytest.importorskip("tifffile")
tiffslide = pytest.importorskip("tiffslide")
openslide = pytest.importorskip("openslide")

WIDTH, HEIGHT, TILE = 2048, 1536, 256  # three levels: 2048x1536, 1024x768, 512x384


def _near_white(rgb: np.ndarray) -> float:
    return float((rgb.min(axis=-1) >= 215).mean())


def _lowest_level(path: Path) -> np.ndarray:
    with tiffslide.TiffSlide(path) as slide:
        level = slide.level_count - 1
        return slide.read_region((0, 0), level, slide.level_dimensions[level], as_array=True)


def _all_levels(path: Path) -> list[np.ndarray]:
    with tifffile.TiffFile(path) as tif:
        return [level.asarray() for level in tif.series[0].levels]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("synthetic")


@pytest.fixture(scope="module")
def blobs(folder: Path) -> SyntheticSlideInfo:
    return write_synthetic_slide(
        folder / "blobs.tiff", width=WIDTH, height=HEIGHT, tile_size=TILE, levels=3, seed=7
    )


@pytest.fixture(scope="module")
def no_mpp(folder: Path) -> SyntheticSlideInfo:
    return write_synthetic_slide(folder / "no_mpp.tiff", width=1200, height=800, mpp=None, seed=1)


# -- layout and backend agreement --------------------------------------------------------------


def test_info_describes_the_pyramid(blobs: SyntheticSlideInfo) -> None:
    assert blobs.level_dimensions == ((2048, 1536), (1024, 768), (512, 384))
    assert blobs.level_downsamples == (1.0, 2.0, 4.0)
    assert blobs.tissue is TissueMode.BLOBS
    d = blobs.mask_downsample
    assert blobs.tissue_mask.shape == (math.ceil(HEIGHT / d), math.ceil(WIDTH / d))
    assert blobs.tissue_fraction == pytest.approx(blobs.tissue_mask.mean())


def test_tiff_layout_is_svs_like(blobs: SyntheticSlideInfo) -> None:
    with tifffile.TiffFile(blobs.path) as tif:
        assert tif.is_bigtiff and tif.is_svs
        level0, thumbnail = tif.pages[0], tif.pages[1]
        assert level0.tile == (TILE, TILE) and not thumbnail.is_tiled
        assert level0.compression == tifffile.COMPRESSION.JPEG
        assert level0.photometric == tifffile.PHOTOMETRIC.YCBCR
        assert [lvl.shape[:2] for lvl in tif.series[0].levels] == [
            (1536, 2048),
            (768, 1024),
            (384, 512),
        ]


def test_both_backends_agree_on_geometry_and_mpp(blobs: SyntheticSlideInfo) -> None:
    with openslide.OpenSlide(blobs.path) as os_slide, tiffslide.TiffSlide(blobs.path) as ts_slide:
        assert os_slide.level_dimensions == ts_slide.level_dimensions == blobs.level_dimensions
        assert os_slide.level_downsamples == ts_slide.level_downsamples == (1.0, 2.0, 4.0)
        assert float(os_slide.properties["openslide.mpp-x"]) == 0.5
        assert float(os_slide.properties["openslide.mpp-y"]) == 0.5
        assert ts_slide.properties["tiffslide.mpp-x"] == 0.5
        assert os_slide.properties["openslide.vendor"] == "aperio"


@pytest.mark.parametrize("level", [0, 1, 2])
@pytest.mark.parametrize(
    ("x", "y", "w", "h"),
    [(0, 0, 300, 200), (248, 248, 20, 20), (700, 300, 513, 257), (1900, 1400, 148, 136)],
    ids=["origin", "tile-corner", "across-tiles", "bottom-right"],
)
def test_both_backends_return_identical_pixels(
    blobs: SyntheticSlideInfo, level: int, x: int, y: int, w: int, h: int
) -> None:
    # Level-0 coordinates are multiples of every downsample: elsewhere openslide interpolates a
    # sub-pixel shift while tiffslide rounds down, a difference of the backends, not of the file.
    ds = int(blobs.level_downsamples[level])
    w, h = min(w, blobs.width // ds - x // ds), min(h, blobs.height // ds - y // ds)
    with openslide.OpenSlide(blobs.path) as os_slide, tiffslide.TiffSlide(blobs.path) as ts_slide:
        ours = np.asarray(os_slide.read_region((x, y), level, (w, h)))
        theirs = ts_slide.read_region((x, y), level, (w, h), as_array=True)
    assert (ours[..., 3] == 255).all()
    assert np.array_equal(ours[..., :3], theirs)


def test_levels_are_exact_halvings(blobs: SyntheticSlideInfo) -> None:
    levels = _all_levels(blobs.path)
    for upper, lower in itertools.pairwise(levels):
        halved = upper.reshape(lower.shape[0], 2, lower.shape[1], 2, 3).mean(axis=(1, 3))
        assert np.abs(halved - lower).mean() < 4  # only JPEG differs


def test_default_levels_stop_at_1024(no_mpp: SyntheticSlideInfo) -> None:
    assert no_mpp.level_dimensions == ((1200, 800), (600, 400))
    tiny = write_synthetic_slide(
        no_mpp.path.with_name("tiny.tiff"), width=1000, height=40, tile_size=16
    )
    assert tiny.level_dimensions == ((1000, 40),)


def test_mpp_none_writes_no_resolution(no_mpp: SyntheticSlideInfo) -> None:
    assert no_mpp.mpp is None
    with openslide.OpenSlide(no_mpp.path) as os_slide, tiffslide.TiffSlide(no_mpp.path) as ts_slide:
        assert "openslide.mpp-x" not in os_slide.properties
        assert ts_slide.properties.get("tiffslide.mpp-x") is None
        region = (1200 - 333, 800 - 222)
        ours = np.asarray(os_slide.read_region(region, 0, (333, 222)))[..., :3]
        assert np.array_equal(ours, ts_slide.read_region(region, 0, (333, 222), as_array=True))


# -- content ---------------------------------------------------------------------------------------


def test_blobs_cover_a_plausible_fraction(blobs: SyntheticSlideInfo) -> None:
    assert 0.3 - 0.02 <= blobs.tissue_fraction <= 0.6 + 0.02
    assert _near_white(_lowest_level(blobs.path)) == pytest.approx(
        1 - blobs.tissue_fraction, abs=0.1
    )


def test_tissue_looks_like_h_and_e(blobs: SyntheticSlideInfo) -> None:
    level0 = _all_levels(blobs.path)[0]
    d = blobs.mask_downsample
    inside = np.repeat(np.repeat(blobs.tissue_mask, d, 0), d, 1)[: blobs.height, : blobs.width]
    tissue = level0[inside].astype(float)
    red, green, blue = tissue.mean(axis=0)
    assert red > green and blue > green  # pink/purple
    assert (tissue.max(axis=-1) < 120).mean() > 0.005  # some dark nuclei
    assert _near_white(level0[~inside]) > 0.98  # glass


@pytest.mark.parametrize(("mode", "white"), [("none", 1.0), ("full", 0.0)])
def test_tissue_extremes(folder: Path, mode: str, white: float) -> None:
    info = write_synthetic_slide(folder / f"{mode}.tiff", width=512, height=512, tissue=mode)
    assert info.tissue is TissueMode(mode)
    assert info.tissue_fraction == 1.0 - white
    assert _near_white(_lowest_level(info.path)) == pytest.approx(white, abs=0.03)


def test_same_arguments_give_identical_pixels(tmp_path: Path) -> None:
    kwargs = {"width": 1024, "height": 768, "tile_size": 128, "levels": 2, "seed": 11}
    first = write_synthetic_slide(tmp_path / "a.tiff", **kwargs)
    synthetic._procedural_texture.cache_clear()
    synthetic._glass.cache_clear()
    second = write_synthetic_slide(tmp_path / "b.tiff", **kwargs)
    assert np.array_equal(first.tissue_mask, second.tissue_mask)
    assert first.path.read_bytes() == second.path.read_bytes()  # even the files are identical
    for a, b in zip(_all_levels(first.path), _all_levels(second.path), strict=True):
        assert np.array_equal(a, b)
    other = write_synthetic_slide(tmp_path / "c.tiff", **{**kwargs, "seed": 12})
    assert not np.array_equal(_all_levels(first.path)[0], _all_levels(other.path)[0])


def test_texture_from_a_real_slide(tmp_path: Path, cmu1: Path) -> None:
    info = write_synthetic_slide(tmp_path / "real.tiff", width=1024, height=1024, tile_size=240,
                                 levels=2, texture_source=cmu1, tissue="full")  # fmt: skip
    with openslide.OpenSlide(info.path) as os_slide, tiffslide.TiffSlide(info.path) as ts_slide:
        for level in (0, 1):
            ours = np.asarray(os_slide.read_region((100, 200), level, (400, 300)))[..., :3]
            assert np.array_equal(
                ours, ts_slide.read_region((100, 200), level, (400, 300), as_array=True)
            )
    assert _near_white(_lowest_level(info.path)) < 0.15  # crops are chosen from stained areas


# -- synthesize_slides: naming, seeds, re-use ------------------------------------------------------


def _stamps(paths: list[Path]) -> list[tuple[int, int]]:
    return [(p.stat().st_ino, p.stat().st_mtime_ns) for p in paths]


def test_synthesize_slides_reuses_identical_files(tmp_path: Path) -> None:
    kwargs = {"width": 256, "height": 256, "tile_size": 128, "seed": 5}
    infos = synthesize_slides(tmp_path, n=3, prefix="s", **kwargs)
    paths = [info.path for info in infos]
    assert [p.name for p in paths] == ["s_000.tiff", "s_001.tiff", "s_002.tiff"]
    assert [info.seed for info in infos] == [5, 6, 7]
    assert all(0.28 <= info.tissue_fraction <= 0.62 for info in infos)
    before = _stamps(paths)

    again = synthesize_slides(tmp_path, n=3, prefix="s", **kwargs)
    assert _stamps(paths) == before
    assert [a.tissue_fraction for a in again] == [i.tissue_fraction for i in infos]

    changed = synthesize_slides(tmp_path, n=3, prefix="s", **{**kwargs, "quality": 80})
    assert all(a != b for a, b in zip(_stamps(paths), before, strict=True))
    assert all(info.quality == 80 for info in changed)
    with tifffile.TiffFile(paths[0]) as tif:
        assert "Q=80" in tif.pages[0].description
    assert not list(tmp_path.glob("*.partial"))


def test_synthesize_slides_replaces_a_foreign_file(tmp_path: Path) -> None:
    (tmp_path / "synthetic_000.tiff").write_bytes(b"not a tiff")
    (info,) = synthesize_slides(tmp_path, n=1, width=256, height=256)
    with tiffslide.TiffSlide(info.path) as slide:
        assert slide.dimensions == (256, 256)


# -- validation ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tile_size": 0}, r"tile_size=0 is invalid; expected an int >= 16 and a multiple of 16"),
        ({"tile_size": 100}, r"tile_size=100 .* multiple of 16"),
        ({"tile_size": -256}, r"tile_size=-256"),
        ({"width": 0}, r"width=0 is invalid; expected an int >= 1"),
        ({"height": -4}, r"height=-4"),
        ({"width": 100.0}, r"width=100.0"),
        ({"mpp": 0}, r"mpp=0 is invalid; expected None or a finite number > 0"),
        ({"mpp": -0.5}, r"mpp=-0.5"),
        (
            {"tissue": "bogus"},
            r"tissue='bogus' is invalid; expected one of 'blobs', 'full', 'none'",
        ),
        ({"quality": 101}, r"quality=101 is invalid; expected an int in 1..100"),
        ({"levels": 0}, r"levels=0"),
        ({"width": 1000, "levels": 5}, r"levels=5 is invalid for width=1000, .* multiples of 16"),
        ({"width": 4095}, r"levels=None is invalid for width=4095, .* multiples of 4"),
        ({"seed": -1}, r"seed=-1"),
        ({"texture_source": "/nonexistent/slide.svs"}, r"texture_source='/nonexistent/slide.svs'"),
    ],
    ids=lambda value: (
        ",".join(f"{k}={v}" for k, v in value.items()) if isinstance(value, dict) else None
    ),
)
def test_invalid_arguments_raise(tmp_path: Path, kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        write_synthetic_slide(tmp_path / "x.tiff", **kwargs)  # type: ignore[arg-type]
    assert not list(tmp_path.iterdir())


def test_existing_file_needs_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "exists.tiff"
    path.write_bytes(b"keep me")
    with pytest.raises(ValueError, match=r"path='.*exists\.tiff' exists; pass overwrite=True"):
        write_synthetic_slide(path, width=256, height=256)
    assert path.read_bytes() == b"keep me"
    write_synthetic_slide(path, width=256, height=256, overwrite=True)
    assert path.stat().st_size > 1000


@pytest.mark.parametrize(
    ("kwargs", "message"), [({"n": -1}, r"n=-1"), ({"prefix": "a/b"}, r"prefix='a/b'")]
)
def test_synthesize_slides_validates(
    tmp_path: Path, kwargs: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        synthesize_slides(tmp_path / "out", **kwargs)  # type: ignore[arg-type]


def test_no_stray_files_after_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object) -> str:
        raise RuntimeError("disk full")

    monkeypatch.setattr(synthetic, "_description", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        write_synthetic_slide(tmp_path / "x.tiff", width=256, height=256)
    assert os.listdir(tmp_path) == []
