"""Sliding windows: exactly once across workers and ranks, exact len, pixels, edges, tissue."""

from __future__ import annotations

import collections
import itertools
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from torch.utils.data import DataLoader

import bigsmall_torch as bst
from bigsmall_torch.sliding import Edge, _positions


def dataset(folder: Path, n: int | None = None) -> bst.Dataset:
    ds = bst.Dataset.from_folder(folder, pattern="*.tiff")
    return ds if n is None else bst.Dataset("d", ds.patients[:n])


def windows(ds: bst.SlidingWindowDataset, **loader_kwargs: Any) -> list[tuple[Any, int, int]]:
    out = []
    batch_size = None if ds.batch_size else 32
    for batch in DataLoader(ds, batch_size=batch_size, **loader_kwargs):
        out += [(p, int(r), int(c)) for p, r, c in zip(batch["patient_id"], batch["row"], batch["col"], strict=True)]
    return out


@pytest.mark.parametrize(("num_workers", "world_size", "n_slides"), [(0, 1, 4), (2, 1, 4), (3, 2, 2), (2, 3, 1), (4, 1, 1)])
def test_every_window_exactly_once(slide_folder: Path, num_workers: int, world_size: int, n_slides: int) -> None:
    seen = []
    lengths = []
    for rank in range(world_size):
        ds = bst.SlidingWindowDataset(dataset(slide_folder, n_slides), 256, stride=192, level=1,
                                      block_size=512, rank=rank, world_size=world_size)
        got = windows(ds, num_workers=num_workers)
        assert len(got) == len(ds)  # exact len per rank
        lengths.append(len(got))
        seen += got
    expected = {(g.patient_id, r, c) for g in ds.grids for r in range(g.rows) for c in range(g.cols)}
    assert len(seen) == len(set(seen)) == len(expected) and set(seen) == expected
    assert max(lengths) - min(lengths) <= 1  # ranks get equal shares


def test_batched_mode_exactly_once_with_exact_len(slide_folder: Path) -> None:
    ds = bst.SlidingWindowDataset(dataset(slide_folder, 2), 128, level=1, batch_size=50, block_size=600)
    loader = DataLoader(ds, batch_size=None, num_workers=3)
    batches = list(loader)
    assert len(batches) == len(loader) == len(ds) == -(-ds.total_windows // 50)
    assert sorted(len(b["row"]) for b in batches)[1:] == [50] * (len(batches) - 1)  # one partial batch
    got = [(p, int(r), int(c)) for b in batches for p, r, c in zip(b["patient_id"], b["row"], b["col"], strict=True)]
    assert len(got) == len(set(got)) == ds.total_windows


def test_grid_geometry_and_pixels(slide_folder: Path) -> None:
    ds = bst.SlidingWindowDataset(dataset(slide_folder, 1), 200, stride=150, level=1, block_size=700)
    grid = ds.grid("synthetic_000")
    assert (grid.cols, grid.rows) == ((1536 - 200) // 150 + 1, (1280 - 200) // 150 + 1)  # edge="drop"
    assert grid.count == len(ds) == grid.rows * grid.cols
    reader = bst.open_slide(slide_folder / "synthetic_000.tiff")
    for s in itertools.islice(ds, 0, None, 7):
        assert (s["x"], s["y"]) == grid.level0(s["row"], s["col"]) == (s["col"] * 300, s["row"] * 300)
        expected = reader.read(s["x"], s["y"], 1, 200, 200)
        assert np.array_equal(s["image"].permute(1, 2, 0).numpy(), expected)
    geometry = grid.geometry()
    assert geometry["x0"][1] == 300 and geometry["level"] == 1 and geometry["mpp"] == pytest.approx(1.0)


def test_blocks_are_read_once(slide_folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ds = bst.SlidingWindowDataset(dataset(slide_folder, 1), 64, level=0, block_size=1024)
    reads: list[tuple[int, int, int, int]] = []
    original = ds._read_block

    def counting(block: Any, cells: np.ndarray) -> Any:
        data, x0, y0 = original(block, cells)
        reads.append((x0, y0, data.shape[1], data.shape[0]))
        return data, x0, y0

    monkeypatch.setattr(ds, "_read_block", counting)
    assert len(list(ds)) == (3072 // 64) * (2560 // 64)
    assert len(reads) == len(ds._blocks) == 3 * 3  # 1024-px blocks: each read once
    assert sum(w * h for *_, w, h in reads) == 3072 * 2560  # no pixel read twice


@pytest.mark.parametrize("edge", ["drop", "shift", "pad"])
def test_edges(slide_folder: Path, edge: str) -> None:
    ds = bst.SlidingWindowDataset(dataset(slide_folder, 1), 1000, level=1, edge=edge)  # level 1: 1536x1280
    grid = ds.grid("synthetic_000")
    expected = {"drop": ([0], [0]), "shift": ([0, 536], [0, 280]), "pad": ([0, 1000], [0, 1000])}[edge]
    assert (grid.xs.tolist(), grid.ys.tolist()) == expected
    images = {(s["row"], s["col"]): s["image"] for s in ds}
    if edge == "pad":
        corner = images[(1, 1)].permute(1, 2, 0).numpy()
        assert (corner[280:, :] == 255).all() and (corner[:, 536:] == 255).all()  # outside: white
        assert not (corner[:280, :536] == 255).all()


def test_positions_helper() -> None:
    assert _positions(10, 4, 3, Edge.DROP).tolist() == [0, 3, 6]
    assert _positions(10, 4, 3, Edge.SHIFT).tolist() == [0, 3, 6]
    assert _positions(11, 4, 3, Edge.SHIFT).tolist() == [0, 3, 6, 7]
    assert _positions(11, 4, 3, Edge.PAD).tolist() == [0, 3, 6, 9]
    assert _positions(3, 4, 3, Edge.DROP).tolist() == []
    assert _positions(3, 4, 3, Edge.PAD).tolist() == [0]


def test_tissue_only_windows(tmp_path: Path) -> None:
    from bigsmall_torch.synthetic import write_synthetic_slide

    info = write_synthetic_slide(tmp_path / "blobs.tiff", width=2048, height=2048, tissue="blobs", seed=5)
    ds = bst.SlidingWindowDataset(bst.Dataset("d", [bst.Patient("b", {"wsi": bst.Record(info.path)})]),
                                  128, tissue_only=True, min_tissue=0.5)
    grid = ds.grid("b")
    d = info.mask_downsample
    truth = [info.tissue_mask[int(y) // d : (int(y) + 128) // d, int(x) // d : (int(x) + 128) // d].mean()
             for y in grid.ys for x in grid.xs]
    kept = grid.include.ravel()
    assert 0 < kept.sum() < kept.size
    assert np.mean(np.array(truth)[kept] >= 0.4) > 0.95 and np.mean(np.array(truth)[~kept] < 0.6) > 0.95
    assert len(list(ds)) == grid.count


def test_bad_input(slide_folder: Path) -> None:
    ds = dataset(slide_folder, 1)
    for kwargs, match in [
        ({"patch_size": 0}, "patch_size must be an int >= 1, got 0"),
        ({"stride": -1}, "stride must be an int >= 1, got -1"),
        ({"patch_size": 5000}, "patch_size=5000x5000 is larger than"),
        ({"edge": "wrap"}, "edge must be one of"),
        ({"block_size": 0}, "block_size must be an int >= 1"),
    ]:
        with pytest.raises(bst.ConfigError, match=match):
            bst.SlidingWindowDataset(ds, **kwargs)
    with pytest.raises(bst.ConfigError, match="unknown patient id 'x'"):
        bst.SlidingWindowDataset(ds, 256).grid("x")


def test_unreadable_block_is_reported_not_dropped_silently(
    slide_folder: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    ds = bst.SlidingWindowDataset(dataset(slide_folder, 2), 256, level=1, block_size=512, on_error="skip")
    original = ds._read_block

    def failing(block: Any, cells: np.ndarray) -> Any:
        if block.slide == 1 and cells[:, 0].min() == 0 and cells[:, 1].min() == 0:
            raise bst.SlideReadError("synthetic_001.tiff", "tile (0, 0) of level 1 is corrupt")
        return original(block, cells)

    monkeypatch.setattr(ds, "_read_block", failing)
    with caplog.at_level("WARNING", logger="bigsmall_torch"):
        got = list(ds)
    assert len(got) == len(ds) - 4  # one 2x2 block of windows not produced
    message = " ".join(r.getMessage() for r in caplog.records)
    assert "skipping 4 windows of patient 'synthetic_001' (rows 0-1, cols 0-1)" in message
    monkeypatch.setattr(ds, "on_error", bst.OnError.RAISE)
    with pytest.raises(bst.SlideReadError, match="tile \\(0, 0\\) of level 1 is corrupt"):
        list(ds)
    assert collections.Counter(s["patient_id"] for s in got)["synthetic_000"] == ds.grid("synthetic_000").count
