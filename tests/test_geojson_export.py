"""GeoJSON export of a thresholded stitched heatmap: polygons on the exact level-0 footprint of the
cells at or above the threshold, read back by QuPath-style GeoJSON readers."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

import bigsmall_torch as bst
from bigsmall_torch.inference.stitching import Stitcher, StitchError, StitchResult
from bigsmall_torch.synthetic import SyntheticSlideInfo, synthesize_slides

shapely = pytest.importorskip("shapely")
from shapely.geometry import shape  # noqa: E402


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> list[SyntheticSlideInfo]:
    """Two 2048x1536 slides with blobs of tissue; level 1 (downsample 2) is 1024x768."""
    return synthesize_slides(tmp_path_factory.mktemp("geojson"), n=2, width=2048, height=1536,
                             levels=3, tissue="blobs", seed=5)  # fmt: skip


def windows(slides: list[SyntheticSlideInfo], **kwargs: Any) -> bst.SlidingWindowDataset:
    data = bst.Dataset(
        "s", [bst.Patient(f"slide {i}", {"wsi": bst.Record(s.path)}) for i, s in enumerate(slides)]
    )
    return bst.SlidingWindowDataset(data, 128, level=1, block_size=512, **kwargs)


def stitcher_over(ds: bst.SlidingWindowDataset, model: Any, **kwargs: Any) -> Stitcher:
    stitcher = Stitcher(ds, kwargs.pop("out_dir", None), progress=False, **kwargs)
    for batch in DataLoader(ds, batch_size=16):
        stitcher.add(model(batch["image"]), batch)
    return stitcher


def channel_means(images: torch.Tensor) -> torch.Tensor:
    return images.float().mean(dim=(2, 3))  # [B, 3]


def pooled(images: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(images.float(), 4)  # [B, 3, 32, 32]


def read_back(path: Path, class_name: str = "Tumor") -> tuple[dict[str, Any], Any]:
    """The file as plain JSON, and the union of its polygons; checks that ``read_annotations``
    gives the same area."""
    document = json.loads(path.read_text())
    assert document["type"] == "FeatureCollection"
    parts = [shape(f["geometry"]) for f in document["features"]]
    union = shapely.union_all(parts) if parts else shapely.Polygon()
    annotations = bst.read_annotations(path)
    assert annotations.classes == ((class_name,) if parts else ())
    assert shapely.symmetric_difference(annotations.geometry(class_name), union).area == 0
    return document, union


def boxes(centres_x: np.ndarray, centres_y: np.ndarray, w: float, h: float) -> Any:
    """The union of the ``w x h`` boxes centred on the given points."""
    return shapely.union_all(
        shapely.box(centres_x - w / 2, centres_y - h / 2, centres_x + w / 2, centres_y + h / 2)
    )


def assert_covers_exactly(
    union: Any,
    centres_x: np.ndarray,
    centres_y: np.ndarray,
    selected: np.ndarray,
    w: float,
    h: float,
) -> None:
    """``union`` is the ``w x h`` cells centred on the selected centres, and nothing else."""
    assert selected.any() and not selected.all()  # both sides of the threshold are tested
    assert union.area == pytest.approx(selected.sum() * w * h)
    inside = shapely.contains_xy(union, centres_x, centres_y)
    assert np.array_equal(inside, selected)
    expected = boxes(centres_x[selected], centres_y[selected], w, h)
    assert shapely.symmetric_difference(union, expected).area == pytest.approx(0, abs=1e-6)


@pytest.mark.parametrize("stride", [128, 96, 160], ids=["stride=patch", "overlap", "gaps"])
def test_window_mode_polygons_lie_on_the_windows_cells(
    slides: list[SyntheticSlideInfo], tmp_path: Path, stride: int
) -> None:
    ds = windows(slides[:1], stride=stride)
    stitcher = stitcher_over(ds, channel_means, out_dir=tmp_path, png=False)
    result = stitcher.finish()["slide 0"]
    grid, ds0 = ds.grids[0], ds.grids[0].choice.downsample
    threshold = float(np.median(result.array[..., 0]))
    path = result.to_geojson(tmp_path / "tumor.geojson", threshold=threshold)
    assert path == tmp_path / "tumor.geojson"
    _, union = read_back(path)
    # A cell is one stride step centred on its window's (level-0) centre.
    rows, cols = np.meshgrid(np.arange(grid.rows), np.arange(grid.cols), indexing="ij")
    cx = np.array([grid.level0(0, c)[0] for c in range(grid.cols)])[cols] + 128 * ds0 / 2
    cy = np.array([grid.level0(r, 0)[1] for r in range(grid.rows)])[rows] + 128 * ds0 / 2
    selected = result.array[..., 0] >= threshold
    assert_covers_exactly(union, cx, cy, selected, stride * ds0, stride * ds0)
    meta = json.loads(result.paths["json"].read_text())
    assert meta["origin"] == list(result.origin) == [(128 - stride) / 2 * ds0] * 2


def test_dense_mode_polygons_lie_on_the_canvas_cells(
    slides: list[SyntheticSlideInfo], tmp_path: Path
) -> None:
    ds = windows(slides[1:])
    result = stitcher_over(ds, pooled, mode="dense").finish()["slide 0"]
    assert result.array.shape == (192, 256, 3) and result.output_downsample == (8.0, 8.0)
    threshold = float(np.quantile(result.array[..., 1], 0.3))
    _, union = read_back(
        result.to_geojson(tmp_path / "dense.geojson", threshold=threshold, channel=1)
    )
    rows, cols = np.meshgrid(np.arange(192), np.arange(256), indexing="ij")
    selected = result.array[..., 1] >= threshold
    assert_covers_exactly(union, (cols + 0.5) * 8.0, (rows + 0.5) * 8.0, selected, 8.0, 8.0)


def ring_result(**kwargs: Any) -> StitchResult:
    """A 5x6 result, cells of 32x16 level-0 pixels from (8, 4); channel 1 is a ring around a hole,
    channel 0 its complement; one cell of the ring is NaN in both."""
    ring = np.zeros((5, 6), bool)
    ring[0:4, 1:5], ring[1:3, 2:4] = True, False
    array = np.stack([np.where(ring, 0.2, 0.9), np.where(ring, 0.7, 0.1)], axis=-1).astype(
        np.float32
    )
    array[0, 1] = np.nan
    coverage = np.isfinite(array[..., 0]).astype(np.int32)
    defaults: dict[str, Any] = {"output_downsample": (32.0, 16.0), "origin": (8.0, 4.0)}
    return StitchResult("p", array, coverage, np.zeros((0, 2), np.int64), **(defaults | kwargs))


@pytest.mark.parametrize("channel", [0, 1])
def test_channel_selection_nan_and_anisotropic_cells(tmp_path: Path, channel: int) -> None:
    result = ring_result()
    path = result.to_geojson(tmp_path / "ring.geojson", threshold=0.7, channel=channel)
    document, union = read_back(path)
    rows, cols = np.meshgrid(np.arange(5), np.arange(6), indexing="ij")
    cx, cy = 8.0 + (cols + 0.5) * 32.0, 4.0 + (rows + 0.5) * 16.0
    selected = result.array[..., channel] >= 0.7  # 0.7 itself counts; NaN never does
    assert not selected[0, 1]
    assert_covers_exactly(union, cx, cy, selected, 32.0, 16.0)
    if channel == 1:  # one ring polygon with the 2x2 hole as an interior ring
        assert len(document["features"]) == 1 and len(union.interiors) == 1
        assert shapely.Polygon(union.interiors[0]).area == 4 * 32.0 * 16.0


def test_nan_cells_off_tissue_never_count(slides: list[SyntheticSlideInfo], tmp_path: Path) -> None:
    ds = windows(slides[:1], tissue_only=True)
    grid = ds.grids[0]
    assert grid.include.any() and not grid.include.all()
    result = stitcher_over(ds, channel_means).finish()["slide 0"]
    assert np.array_equal(np.isfinite(result.array[..., 0]), grid.include)
    _, union = read_back(result.to_geojson(tmp_path / "all.geojson", threshold=-1e9))
    rows, cols = np.meshgrid(np.arange(grid.rows), np.arange(grid.cols), indexing="ij")
    cx, cy = (grid.xs[cols] + 64) * 2.0, (grid.ys[rows] + 64) * 2.0
    assert_covers_exactly(union, cx, cy, grid.include, 256.0, 256.0)


def test_qupath_properties(tmp_path: Path) -> None:
    result = ring_result()
    document, _ = read_back(
        result.to_geojson(tmp_path / "a.geojson", threshold=0.5, class_name="Stroma", channel=0,
                          color=(10, 20, 30)),
        "Stroma",
    )  # fmt: skip
    assert len(document["features"]) >= 1
    for feature in document["features"]:
        assert feature["type"] == "Feature"
        assert feature["geometry"]["type"] == "Polygon"
        assert feature["properties"]["objectType"] == "annotation"
        assert feature["properties"]["classification"] == {"name": "Stroma", "color": [10, 20, 30]}
    default = json.loads(result.to_geojson(tmp_path / "b.geojson", channel=1).read_text())
    color = default["features"][0]["properties"]["classification"]["color"]
    assert default["features"][0]["properties"]["classification"]["name"] == "Tumor"
    assert len(color) == 3 and all(isinstance(v, int) and 0 <= v <= 255 for v in color)


def test_nothing_above_threshold_writes_an_empty_collection(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="bigsmall_torch.inference.stitching"):
        path = ring_result().to_geojson(tmp_path / "none.geojson", threshold=1.5)
    assert json.loads(path.read_text()) == {"type": "FeatureCollection", "features": []}
    assert bst.read_annotations(path).regions == ()
    assert any("no cell of channel 0 is >= 1.5" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"threshold": float("nan")}, "threshold must be a finite number"),
     ({"threshold": float("inf")}, "threshold must be a finite number"),
     ({"threshold": "0.5"}, "threshold must be a finite number"),
     ({"threshold": True}, "threshold must be a finite number"),
     ({"class_name": ""}, "class_name must be a non-empty str"),
     ({"class_name": "  "}, "class_name must be a non-empty str"),
     ({"class_name": 3}, "class_name must be a non-empty str"),
     ({"channel": 2}, r"channel must be an int in 0\.\.1, got 2"),
     ({"channel": -1}, r"channel must be an int in 0\.\.1, got -1"),
     ({"channel": 1.0}, "channel must be an int"),
     ({"color": (256, 0, 0)}, r"color must be None or \(r, g, b\)"),
     ({"color": (1, 2)}, r"color must be None or \(r, g, b\)")],
)  # fmt: skip
def test_bad_arguments_name_the_argument(
    tmp_path: Path, kwargs: dict[str, Any], match: str
) -> None:
    with pytest.raises(bst.ConfigError, match=match):
        ring_result().to_geojson(tmp_path / "x.geojson", **kwargs)
    assert not (tmp_path / "x.geojson").exists()


def test_channel_of_an_array_without_channels(tmp_path: Path) -> None:
    base = ring_result()
    single = StitchResult("p", base.array[..., 1], base.coverage, base.missing, (32.0, 16.0))
    assert single.origin == (0.0, 0.0)
    with pytest.raises(
        bst.ConfigError, match=r"channel must be an int in 0 \(the array has no channel"
    ):
        single.to_geojson(tmp_path / "x.geojson", channel=1)
    _, union = read_back(single.to_geojson(tmp_path / "y.geojson", threshold=0.7))
    assert union.area == pytest.approx(int((base.array[..., 1] >= 0.7).sum()) * 32.0 * 16.0)
    with pytest.raises(bst.ConfigError, match=r"path must be a str or os\.PathLike"):
        single.to_geojson(None)  # type: ignore[arg-type]


def test_stitcher_to_geojson(slides: list[SyntheticSlideInfo], tmp_path: Path) -> None:
    ds = windows(slides)
    stitcher = Stitcher(ds, progress=False)
    with pytest.raises(StitchError, match=r"'slide 0' has no result yet \(0 of 48 windows"):
        stitcher.to_geojson("slide 0", tmp_path / "early.geojson")
    for batch in DataLoader(ds, batch_size=16):
        if batch["patient_id"][0] == "slide 0":
            stitcher.add(channel_means(batch["image"]), batch)
    result = stitcher.results["slide 0"]  # complete on its last window, before finish()
    threshold = float(np.median(result.array[..., 2]))
    options: dict[str, Any] = {"threshold": threshold, "class_name": "Blob", "channel": 2}
    path = stitcher.to_geojson("slide 0", tmp_path / "s.geojson", **options)
    assert path.read_text() == result.to_geojson(tmp_path / "r.geojson", **options).read_text()
    _, union = read_back(path, "Blob")
    assert union.area == pytest.approx(int((result.array[..., 2] >= threshold).sum()) * 256.0**2)
    stitcher.finish()
    with pytest.raises(StitchError, match="'slide 1' has no result yet"):
        stitcher.to_geojson("slide 1", tmp_path / "none.geojson")
    with pytest.raises(bst.ConfigError, match="unknown patient_id 'nope'"):
        stitcher.to_geojson("nope", tmp_path / "none.geojson")
    with pytest.raises(bst.ConfigError, match="threshold must be a finite number"):
        stitcher.to_geojson("slide 0", tmp_path / "bad.geojson", threshold=float("nan"))
