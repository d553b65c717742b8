"""Stitching: arrays equal a direct computation on slides of known content; validation; files."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader

import bigsmall_torch as bst
from bigsmall_torch.inference.stitching import (
    MissingWindowsError,
    Stitcher,
    StitcherClosedError,
    StitchError,
    StitchResult,
)
from bigsmall_torch.synthetic import SyntheticSlideInfo, synthesize_slides

Model = Callable[[torch.Tensor], torch.Tensor]


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> list[SyntheticSlideInfo]:
    """Two 2048x1536 slides with blobs of tissue; level 1 is 1024x768, level 2 512x384."""
    return synthesize_slides(tmp_path_factory.mktemp("stitch"), n=2, width=2048, height=1536, levels=3,
                             tissue="blobs", seed=3)  # fmt: skip


def windows(slides: list[SyntheticSlideInfo], **kwargs: Any) -> bst.SlidingWindowDataset:
    data = bst.Dataset(
        "s", [bst.Patient(f"slide {i}", {"wsi": bst.Record(s.path)}) for i, s in enumerate(slides)]
    )
    kwargs.setdefault("level", 1)
    return bst.SlidingWindowDataset(data, kwargs.pop("patch_size", 128), block_size=512, **kwargs)


def batches(ds: bst.SlidingWindowDataset, num_workers: int = 0) -> list[dict[str, Any]]:
    return list(DataLoader(ds, batch_size=None if ds.batch_size else 16, num_workers=num_workers))


def stitch(
    ds: bst.SlidingWindowDataset, model: Model, num_workers: int = 0, **kwargs: Any
) -> dict[Any, StitchResult]:
    kwargs.setdefault("progress", False)
    stitcher = Stitcher(ds, kwargs.pop("out_dir", None), **kwargs)
    for batch in DataLoader(ds, batch_size=None if ds.batch_size else 16, num_workers=num_workers):
        stitcher.add(model(batch["image"]), batch)
    return stitcher.finish()


def channel_means(images: torch.Tensor) -> torch.Tensor:
    return images.float().mean(dim=(2, 3))  # [B, 3]


def pooled(images: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(images.float(), 4)  # [B, 3, h / 4, w / 4]


def direct_window_means(grid: bst.Grid) -> np.ndarray:
    """Each window read on its own from the slide, its mean per channel."""
    reader = bst.open_slide(grid.path)
    out = np.full((grid.rows, grid.cols, 3), np.nan)
    for r in range(grid.rows):
        for c in range(grid.cols):
            x, y = grid.level0(r, c)
            out[r, c] = (
                reader.read(x, y, grid.choice.level, *grid.patch_size).reshape(-1, 3).mean(axis=0)
            )
    reader.close()
    return out


def level_image(info: SyntheticSlideInfo, level: int) -> np.ndarray:
    reader = bst.open_slide(info.path)
    try:
        return reader.read(0, 0, level, *reader.info.level_dimensions[level]).astype(np.float64)
    finally:
        reader.close()


def pool(image: np.ndarray, k: int) -> np.ndarray:
    h, w, c = image.shape
    return image.reshape(h // k, k, w // k, k, c).mean(axis=(1, 3))


@pytest.mark.parametrize(("batched", "num_workers"), [(False, 0), (True, 0), (False, 2), (True, 2)])
def test_window_mode_equals_direct_reads(
    slides: list[SyntheticSlideInfo], batched: bool, num_workers: int
) -> None:
    ds = windows(slides, batch_size=16 if batched else None)
    results = stitch(ds, channel_means, num_workers)
    assert set(results) == {"slide 0", "slide 1"}
    for grid in ds.grids:
        result = results[grid.patient_id]
        assert result.array.shape == (6, 8, 3) and result.array.dtype == np.float32
        np.testing.assert_allclose(result.array, direct_window_means(grid), rtol=1e-5)
        assert (result.coverage == 1).all() and result.missing.shape == (0, 2)
        assert result.output_downsample == (256.0, 256.0)  # stride 128 at level 1
    scalar = stitch(ds, lambda images: images.float().mean(dim=(1, 2, 3)))
    np.testing.assert_allclose(
        scalar["slide 0"].array, direct_window_means(ds.grids[0]).mean(axis=2), rtol=1e-5
    )


def test_dense_mode_equals_pooled_slide(slides: list[SyntheticSlideInfo]) -> None:
    ds = windows(slides, patch_size=128)
    results = stitch(ds, pooled, mode="dense")
    result = results["slide 1"]
    assert result.array.shape == (192, 256, 3) and result.output_downsample == (8.0, 8.0)
    np.testing.assert_allclose(result.array, pool(level_image(slides[1], 1), 4), rtol=1e-5)
    assert (result.coverage == 1).all()
    single = stitch(
        ds, lambda images: pooled(images).mean(dim=1), mode="dense"
    )  # [B, h, w]: no channel axis
    np.testing.assert_allclose(single["slide 1"].array, result.array.mean(axis=2), rtol=1e-5)


def test_dense_overlap_is_the_explicit_average(slides: list[SyntheticSlideInfo]) -> None:
    ds = windows(
        slides[:1], stride=64
    )  # 128 px windows every 64 px: each canvas cell in up to 4 windows
    stitcher = Stitcher(ds, mode="dense", progress=False)
    for batch in batches(ds):  # each window's map: the pooled image plus an offset of its own
        offset = (100 * batch["row"] + batch["col"]).float()
        stitcher.add(
            pooled(batch["image"]).mean(dim=1, keepdim=True) + offset[:, None, None, None], batch
        )
    result = stitcher.finish()["slide 0"]
    grid = ds.grids[0]
    assert (grid.rows, grid.cols) == (11, 15) and result.array.shape == (192, 256, 1)
    # Canvas cell i is inside the 32-cell maps of the windows r with 16 r <= i < 16 r + 32.
    rows = [[r for r in range(grid.rows) if 16 * r <= i < 16 * r + 32] for i in range(192)]
    cols = [[c for c in range(grid.cols) if 16 * c <= j < 16 * c + 32] for j in range(256)]
    offsets = (
        100 * np.array([np.mean(r) for r in rows])[:, None]
        + np.array([np.mean(c) for c in cols])[None, :]
    )
    expected = pool(level_image(slides[0], 1), 4).mean(axis=2) + offsets
    np.testing.assert_allclose(result.array[..., 0], expected, rtol=1e-5)
    assert np.array_equal(result.coverage, np.outer([len(r) for r in rows], [len(c) for c in cols]))


@pytest.mark.parametrize("mode", ["window", "dense"])
def test_stream_to_disk_gives_the_same_results(
    slides: list[SyntheticSlideInfo], tmp_path: Path, mode: str
) -> None:
    ds = windows(slides[:1], stride=96)
    model = channel_means if mode == "window" else pooled
    in_ram = stitch(ds, model, mode=mode, out_dir=tmp_path / "ram", png=False)["slide 0"]
    on_disk = stitch(
        ds, model, mode=mode, out_dir=tmp_path / "disk", png=False, stream_to_disk=True
    )["slide 0"]
    assert isinstance(on_disk.array, np.memmap) and not isinstance(in_ram.array, np.memmap)
    assert np.array_equal(in_ram.array, on_disk.array, equal_nan=True)
    assert np.array_equal(in_ram.coverage, on_disk.coverage)
    assert sorted(p.name for p in (tmp_path / "disk").iterdir()) == [
        "slide_0.coverage.npy",
        "slide_0.json",
        "slide_0.npy",
    ]


def test_files_written(slides: list[SyntheticSlideInfo], tmp_path: Path) -> None:
    ds = windows(slides)
    stitcher = Stitcher(ds, tmp_path, progress=False)
    for batch in batches(ds):
        stitcher.add(channel_means(batch["image"]), batch)
    assert set(stitcher.results) == {
        "slide 0",
        "slide 1",
    }  # written as soon as each slide completed
    results = stitcher.finish()
    result = results["slide 0"]
    assert result.paths == {k: tmp_path / f"slide_0.{ext}" for k, ext in
                            [("npy", "npy"), ("coverage", "coverage.npy"), ("json", "json"), ("png", "png")]}  # fmt: skip
    assert np.array_equal(np.load(result.paths["npy"]), result.array)
    assert np.array_equal(np.load(result.paths["coverage"]), result.coverage)
    meta = json.loads(result.paths["json"].read_text())
    assert meta == {**meta, **ds.grids[0].geometry(), "mode": "window", "shape": [6, 8, 3], "dtype": "float32",
                    "output_downsample": [256.0, 256.0], "missing": 0}  # fmt: skip
    assert meta["heatmap"]["channel"] == 0 and meta["heatmap"]["vmin"] < meta["heatmap"]["vmax"]
    reader = bst.open_slide(slides[0].path)
    thumbnail = bst.TissueDetector().thumbnail(reader)
    with Image.open(result.paths["png"]) as png:
        assert (
            png.size == (thumbnail.shape[1], thumbnail.shape[0]) == (1024, 768)
            and png.mode == "RGB"
        )
        drawn = np.asarray(png)
    assert not np.array_equal(
        drawn, thumbnail
    )  # the heatmap is blended over the whole (covered) slide


def test_missing_windows_are_reported(
    slides: list[SyntheticSlideInfo], caplog: pytest.LogCaptureFixture
) -> None:
    ds = windows(slides)
    first, *rest = batches(ds)
    assert set(first["patient_id"]) == {"slide 0"}
    stitcher = Stitcher(ds, progress=False)
    for batch in rest:
        if batch["patient_id"][0] == "slide 0":
            stitcher.add(channel_means(batch["image"]), batch)
    with caplog.at_level(logging.WARNING, logger="bigsmall_torch.inference.stitching"):
        results = stitcher.finish()
    skipped = sorted(zip(first["row"].tolist(), first["col"].tolist(), strict=True))
    result = results["slide 0"]
    assert sorted(map(tuple, result.missing.tolist())) == skipped
    rows, cols = zip(*skipped, strict=True)
    assert np.isnan(result.array[rows, cols]).all() and (result.coverage[rows, cols] == 0).all()
    assert np.isfinite(result.array).sum() == 3 * (48 - 16)
    assert "slide 1" not in results  # nothing received
    messages = [r.getMessage() for r in caplog.records]
    assert any("'slide 0': 16 of 48 windows never received" in m for m in messages)
    assert any("'slide 1': 48 of 48" in m and "nothing received" in m for m in messages)

    strict = Stitcher(ds, progress=False, strict=True)
    strict.add(channel_means(rest[0]["image"]), rest[0])
    with pytest.raises(MissingWindowsError, match="'slide 0': 32") as info:
        strict.finish()
    assert set(info.value.missing) == {"slide 0", "slide 1"} and "slide 0" in strict.results


def fake(pid: Any, rows: list[int], cols: list[int]) -> dict[str, Any]:
    return {"patient_id": [pid] * len(rows), "row": torch.tensor(rows), "col": torch.tensor(cols)}


def test_validation_errors(slides: list[SyntheticSlideInfo]) -> None:
    ds = windows(slides)
    stitcher = Stitcher(ds, progress=False)
    with pytest.raises(StitchError, match=r"batch size 3.*2 patient ids"):
        stitcher.add(torch.zeros(3), fake("slide 0", [0, 0], [0, 1]))
    with pytest.raises(StitchError, match="unknown patient id 'nope'"):
        stitcher.add(torch.zeros(1), fake("nope", [0], [0]))
    with pytest.raises(StitchError, match=r"\(row, col\)=\(6, 0\) is outside its 6x8 grid"):
        stitcher.add(torch.zeros(1), fake("slide 0", [6], [0]))
    with pytest.raises(StitchError, match=r"\(0, -1\) is outside"):
        stitcher.add(torch.zeros(1), fake("slide 0", [0], [-1]))
    with pytest.raises(StitchError, match=r"window \(1, 1\) was added twice"):
        stitcher.add(torch.zeros(3), fake("slide 0", [0, 1, 1], [0, 1, 1]))
    with pytest.raises(StitchError, match="use mode='dense'"):
        stitcher.add(torch.zeros(1, 3, 8, 8), fake("slide 0", [0], [0]))
    # A batch with one bad patient changes nothing (all or nothing).
    good_and_bad = {
        "patient_id": ["slide 1", "nope"],
        "row": torch.tensor([0, 0]),
        "col": torch.tensor([0, 0]),
    }
    with pytest.raises(StitchError, match="unknown"):
        stitcher.add(torch.zeros(2), good_and_bad)
    stitcher.add(torch.zeros(2), fake("slide 0", [0, 0], [0, 1]))
    with pytest.raises(StitchError, match=r"window \(0, 1\) was added twice"):
        stitcher.add(torch.zeros(1), fake("slide 0", [0], [1]))
    with pytest.raises(StitchError, match=r"shape \(2,\) after outputs of shape \(\)"):
        stitcher.add(torch.zeros(1, 2), fake("slide 0", [2], [2]))
    stitcher.add(torch.zeros(1, 2), fake("slide 1", [0], [0]))  # each slide has its own first shape
    with pytest.raises(StitchError, match="lacks"):
        stitcher.add(torch.zeros(1), {"patient_id": ["slide 0"]})
    stitcher.finish()
    with pytest.raises(StitcherClosedError):
        stitcher.add(torch.zeros(1), fake("slide 0", [3], [3]))

    dense = Stitcher(ds, mode="dense", progress=False)
    with pytest.raises(StitchError, match="30x30 must divide the 128x128 patch"):
        dense.add(torch.zeros(1, 3, 30, 30), fake("slide 0", [0], [0]))
    with pytest.raises(StitchError, match=r"needs outputs \[B, 2, h, w\]"):
        Stitcher(ds, mode="dense", channels=2, progress=False).add(
            torch.zeros(1, 3, 32, 32), fake("slide 0", [0], [0])
        )
    with pytest.raises(StitchError, match="channel=4 for the heatmap"):
        Stitcher(ds, channel=4, progress=False).add(torch.zeros(1, 3), fake("slide 0", [0], [0]))


def test_windows_off_tissue_are_refused(slides: list[SyntheticSlideInfo]) -> None:
    ds = windows(slides[:1], tissue_only=True)
    grid = ds.grids[0]
    r, c = np.argwhere(~grid.include)[0]
    with pytest.raises(StitchError, match=rf"window \({r}, {c}\) is not an included window"):
        Stitcher(ds, progress=False).add(torch.zeros(1), fake("slide 0", [int(r)], [int(c)]))
    results = stitch(ds, channel_means)  # only the tissue windows: complete, the others NaN
    assert results["slide 0"].missing.shape == (0, 2)
    assert np.array_equal(np.isfinite(results["slide 0"].array[..., 0]), grid.include)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"mode": "tiles"}, "mode must be 'window' or 'dense'"), ({"stream_to_disk": True}, "needs an out_dir"),
     ({"channels": 2, "channel": 2}, "channel=2 is not one of the 2"), ({"alpha": 1.5}, r"alpha must be in \[0, 1\]"),
     ({"channels": 0}, "channels must be an int >= 1")],
)  # fmt: skip
def test_bad_arguments(
    slides: list[SyntheticSlideInfo], kwargs: dict[str, Any], match: str
) -> None:
    with pytest.raises(bst.ConfigError, match=match):
        Stitcher(windows(slides[:1]), **kwargs)
    with pytest.raises(bst.ConfigError, match="SlidingWindowDataset or a list of Grid"):
        Stitcher([])


def test_progress_bar_per_slide(
    slides: list[SyntheticSlideInfo], capsys: pytest.CaptureFixture[str]
) -> None:
    ds = windows(slides, level=2)
    stitch(ds, channel_means, progress=True)
    err = capsys.readouterr().err
    assert "stitching slide 0" in err and "stitching slide 1" in err and "12/12" in err
    stitch(ds, channel_means, progress=False)
    assert capsys.readouterr().err == ""
