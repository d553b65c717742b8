"""Exact coordinates at every level: the level-0 ``(x, y)`` reported for a patch read at level ``L``
maps back to the level-``L`` pixel it starts at under the floor convention (``int(x / downsample)``,
tiffslide's), also when the downsamples are not whole numbers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import bigsmall_torch as bst
from bigsmall_torch.io.resolution import to_level0

tifffile = pytest.importorskip("tifffile")
tiffslide = pytest.importorskip("tiffslide")

WIDTH, HEIGHT = 3001, 2999  # levels 1500 x 1499 and 750 x 749: downsamples 2.0005..., 4.0013...


@pytest.fixture(scope="module")
def fractional(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-level JPEG-tiled pyramid whose levels are floor-halved, as scanners write them."""
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (HEIGHT // 8 + 1, WIDTH // 8 + 1, 3), dtype=np.uint8)
    level0 = np.kron(base, np.ones((8, 8, 1), dtype=np.uint8))[:HEIGHT, :WIDTH]
    level0 = (level0.astype(np.int16) + rng.integers(-20, 20, level0.shape)).clip(0, 255)
    level0 = level0.astype(np.uint8)
    path = tmp_path_factory.mktemp("coords") / "fractional.tiff"
    levels = [level0, level0[::2, ::2][: HEIGHT // 2, : WIDTH // 2], level0[::4, ::4][: HEIGHT // 4, : WIDTH // 4]]
    with tifffile.TiffWriter(path) as tif:
        options = {"tile": (256, 256), "compression": "jpeg", "photometric": "rgb"}
        tif.write(levels[0], subifds=2, **options)
        for level in levels[1:]:
            tif.write(level, subfiletype=1, **options)
    return path


def _reference(path: Path, x: int, y: int, level: int, size: int) -> np.ndarray:
    with tiffslide.TiffSlide(path) as slide:
        return np.asarray(slide.read_region((x, y), level, (size, size), as_array=True))


def test_the_slide_has_fractional_downsamples(fractional: Path) -> None:
    info = bst.slide_info(fractional)
    assert info.level_count == 3
    assert all(ds != round(ds) for ds in info.level_downsamples[1:])


@pytest.mark.parametrize("downsample", [1.0, 2.0, 2.0005, 3.999, 4.0013342228, 7.5])
def test_to_level0_is_the_smallest_coordinate_that_maps_back(downsample: float) -> None:
    for position in range(0, 5000, 7):
        x0 = to_level0(position, downsample)
        assert int(x0 / downsample) == position
        assert x0 == 0 or int((x0 - 1) / downsample) < position


@pytest.mark.parametrize("batch_size", [None, 16], ids=["per-sample", "batched"])
@pytest.mark.parametrize("level", [1, 2])
def test_training_patches_equal_tiffslide_at_the_reported_coordinates(
    fractional: Path, level: int, batch_size: int | None
) -> None:
    dataset = bst.BigSmallDataset(
        bst.Dataset("d", [bst.Patient("p", {"wsi": bst.Record(fractional)})]),
        bst.RandomRegionLoader(size=300, level=level, tile_aligned=False),
        bst.RandomCropCollector(patch_size=37), buffer_size=2, smallchunks_per_bigchunk=8,
        samples_per_epoch=64, seed=3, batch_size=batch_size,
    )  # fmt: skip
    checked = 0
    for item in dataset:
        images = item["image"] if batch_size else item["image"][None]
        xs = item["x"].tolist() if batch_size else [item["x"]]
        ys = item["y"].tolist() if batch_size else [item["y"]]
        for image, x, y in zip(images, xs, ys, strict=True):
            want = torch.from_numpy(_reference(fractional, x, y, level, 37)).permute(2, 0, 1)
            assert torch.equal(image, want), (x, y)
            checked += 1
    assert checked == 64


@pytest.mark.parametrize("level", [1, 2])
def test_sliding_windows_and_stitcher_geometry_map_back_exactly(
    fractional: Path, level: int, tmp_path: Path
) -> None:
    windows = bst.SlidingWindowDataset(
        bst.Dataset("d", [bst.Patient("p", {"wsi": bst.Record(fractional)})]),
        patch_size=64, stride=48, level=level, block_size=300,
    )  # fmt: skip
    grid = windows.grid("p")
    geometry = grid.geometry()
    ds = grid.choice.downsample
    for sample in windows:
        x, y = sample["x"], sample["y"]
        assert (x, y) == (geometry["x0"][sample["col"]], geometry["y0"][sample["row"]])
        assert (int(x / ds), int(y / ds)) == (int(grid.xs[sample["col"]]), int(grid.ys[sample["row"]]))
        want = torch.from_numpy(_reference(fractional, x, y, level, 64)).permute(2, 0, 1)
        assert torch.equal(sample["image"], want), (x, y)
    stitcher = bst.Stitcher(windows, tmp_path, progress=False)
    for sample in windows:
        stitcher.add(torch.zeros(1), {k: [v] for k, v in sample.items() if k != "image"})
    import json

    saved = json.loads(stitcher.finish()["p"].paths["json"].read_text())
    assert saved["x0"] == geometry["x0"] and saved["y0"] == geometry["y0"]
