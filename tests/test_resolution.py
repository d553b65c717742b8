"""Physical resolution: level / mpp / magnification to the level read, resampling, errors."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import bigsmall_torch as bst
from bigsmall_torch.io.resolution import Resolution, resample
from bigsmall_torch.synthetic import write_synthetic_slide


@pytest.fixture(scope="module")
def no_mpp_slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("nompp") / "nompp.tiff"
    write_synthetic_slide(path, width=2048, height=2048, mpp=None, tissue="full")
    return path


@pytest.mark.parametrize(
    ("kwargs", "level", "scale", "mpp"),
    [
        ({}, 0, 1.0, 0.5),
        ({"level": 2}, 2, 1.0, 2.0),
        ({"mpp": 0.5}, 0, 1.0, 0.5),
        ({"mpp": 1.0}, 1, 1.0, 1.0),
        ({"mpp": 1.04}, 1, 1.0, 1.0),  # within the 5% tolerance: level 1 as it is
        ({"mpp": 1.5}, 1, 1.5, 1.5),  # between levels: read level 1, resample by 1.5
        ({"mpp": 8.0}, 2, 4.0, 8.0),  # coarser than the coarsest level
        ({"magnification": 10}, 1, 1.0, 1.0),
        ({"magnification": 5}, 2, 1.0, 2.0),
    ],
)
def test_level_choice(slide_folder: Path, kwargs: dict, level: int, scale: float, mpp: float) -> None:
    info = bst.slide_info(slide_folder / "synthetic_000.tiff")
    assert info.objective_power == 20
    choice = Resolution.from_args("test", **kwargs).choose(info)
    assert (choice.level, choice.scale, choice.mpp) == (level, pytest.approx(scale), pytest.approx(mpp))


def test_real_slide_resolution(cmu1: Path) -> None:
    info = bst.slide_info(cmu1)
    assert Resolution.from_args("t", mpp=0.5).choose(info).scale == 1.0  # 0.499 is within tolerance
    half = Resolution.from_args("t", mpp=1.0).choose(info)
    assert half.level == 0 and half.scale == pytest.approx(1.0 / 0.499)


def test_errors(slide_folder: Path, no_mpp_slide: Path) -> None:
    info = bst.slide_info(slide_folder / "synthetic_000.tiff")
    with pytest.raises(bst.SlideError, match=r"mpp=0\.25 is finer than the slide's finest level"):
        Resolution.from_args("t", mpp=0.25).choose(info)
    with pytest.raises(bst.SlideError, match="level 5 does not exist"):
        Resolution.from_args("t", level=5).choose(info)
    no_mpp = bst.slide_info(no_mpp_slide)
    assert no_mpp.mpp is None
    with pytest.raises(bst.SlideError, match=r"nompp\.tiff: mpp=0\.5 was asked but the slide records no mpp"):
        Resolution.from_args("t", mpp=0.5).choose(no_mpp)
    assert math.isnan(Resolution.from_args("t", level=1).choose(no_mpp).mpp)
    for kwargs, match in [
        ({"mpp": 0}, "mpp must be a number > 0"),
        ({"magnification": -1}, "magnification must be a number > 0"),
        ({"level": -1}, "level must be an int >= 0"),
        ({"mpp": 1, "magnification": 10}, "only one of"),
        ({"tolerance": 1.5}, r"tolerance must be in \[0, 1\)"),
    ]:
        with pytest.raises(bst.ConfigError, match=match):
            Resolution.from_args("t", **kwargs)


def test_dataset_refuses_mpp_of_a_slide_without_mpp(no_mpp_slide: Path) -> None:
    ds = bst.Dataset("d", [bst.Patient("p", {"wsi": bst.Record(no_mpp_slide)})])
    with pytest.raises(bst.SlideError, match=r"nompp\.tiff.*records no mpp"):
        bst.BigSmallDataset(ds, bst.RandomRegionLoader(256, mpp=1.0), bst.RandomCropCollector(64),
                            buffer_size=1, smallchunks_per_bigchunk=4)


def _dataset(folder: Path, loader: bst.RandomRegionLoader) -> bst.BigSmallDataset:
    return bst.BigSmallDataset(
        bst.Dataset.from_folder(folder, pattern="*.tiff"), loader, bst.RandomCropCollector(64),
        buffer_size=2, smallchunks_per_bigchunk=8, samples_per_epoch=24, seed=1,
    )


def test_samples_at_an_exact_level_match_the_reader(slide_folder: Path) -> None:
    reader = bst.open_slide(slide_folder / "synthetic_002.tiff")
    for s in _dataset(slide_folder, bst.RandomRegionLoader(512, mpp=1.0)):
        assert s["level"] == 1 and s["mpp"] == pytest.approx(1.0)
        if s["patient_id"] == "synthetic_002":
            expected = reader.read(s["x"], s["y"], 1, 64, 64)
            assert np.array_equal(s["image"].permute(1, 2, 0).numpy(), expected)


def test_resampled_samples_cover_the_asked_physical_area(slide_folder: Path) -> None:
    reader = bst.open_slide(slide_folder / "synthetic_002.tiff")
    seen = 0
    for s in _dataset(slide_folder, bst.RandomRegionLoader(512, mpp=1.5)):
        assert s["level"] == 1 and s["mpp"] == pytest.approx(1.5)
        assert s["x"] % 1 == 0  # level-0 pixels
        if s["patient_id"] != "synthetic_002":
            continue
        seen += 1
        # 64 px at 1.5 mpp = 96 level-1 px: read them and shrink them the same way.
        level1 = reader.read(s["x"], s["y"], 1, 96, 96)
        expected = resample(level1, 64, 64).astype(int)
        got = s["image"].permute(1, 2, 0).numpy().astype(int)
        assert np.abs(got - expected).mean() < 6  # equal up to resampling at the crop's border
        wrong_scale = reader.read(s["x"], s["y"], 1, 64, 64).astype(int)
        assert np.abs(got - wrong_scale).mean() > np.abs(got - expected).mean()
    assert seen > 0


def test_resample_is_antialiased() -> None:
    stripes = np.zeros((64, 64, 3), np.uint8)
    stripes[:, ::2] = 255
    small = resample(stripes, 32, 32)
    assert small.shape == (32, 32, 3) and 100 < small.mean() < 155  # averaged, not aliased to 0 or 255
    assert np.array_equal(resample(stripes, 64, 64), stripes)
    assert Image.fromarray(small).size == (32, 32)
