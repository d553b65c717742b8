"""Sliding windows: exactly once across workers and ranks, exact len, pixels, edges, tissue."""

from __future__ import annotations

import collections
import itertools
import pickle
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import bigsmall_torch as bst
from bigsmall_torch.inference.sliding import Edge, _halves, _positions
from bigsmall_torch.io._tiles import TiledRegion


def dataset(folder: Path, n: int | None = None) -> bst.Dataset:
    ds = bst.Dataset.from_folder(folder, pattern="*.tiff")
    return ds if n is None else bst.Dataset("d", ds.patients[:n])


def windows(ds: bst.SlidingWindowDataset, **loader_kwargs: Any) -> list[tuple[Any, int, int]]:
    out = []
    batch_size = None if ds.batch_size else 32
    for batch in DataLoader(ds, batch_size=batch_size, **loader_kwargs):
        out += [
            (p, int(r), int(c))
            for p, r, c in zip(batch["patient_id"], batch["row"], batch["col"], strict=True)
        ]
    return out


@pytest.mark.parametrize(
    ("num_workers", "world_size", "n_slides"),
    [(0, 1, 4), (2, 1, 4), (3, 2, 2), (2, 3, 1), (4, 1, 1)],
)
def test_every_window_exactly_once(
    slide_folder: Path, num_workers: int, world_size: int, n_slides: int
) -> None:
    seen = []
    lengths = []
    for rank in range(world_size):
        ds = bst.SlidingWindowDataset(
            dataset(slide_folder, n_slides),
            256,
            stride=192,
            level=1,
            block_size=512,
            rank=rank,
            world_size=world_size,
        )
        got = windows(ds, num_workers=num_workers)
        assert len(got) == len(ds)  # exact len per rank
        lengths.append(len(got))
        seen += got
    expected = {
        (g.patient_id, r, c) for g in ds.grids for r in range(g.rows) for c in range(g.cols)
    }
    assert len(seen) == len(set(seen)) == len(expected) and set(seen) == expected
    assert max(lengths) - min(lengths) <= 1  # ranks get equal shares


def test_batched_mode_exactly_once_with_exact_len(slide_folder: Path) -> None:
    ds = bst.SlidingWindowDataset(
        dataset(slide_folder, 2), 128, level=1, batch_size=50, block_size=600
    )
    loader = DataLoader(ds, batch_size=None, num_workers=3)
    batches = list(loader)
    assert len(batches) == len(loader) == len(ds) == -(-ds.total_windows // 50)
    sizes = sorted(len(b["row"]) for b in batches)
    assert sizes[1:] == [50] * (len(batches) - 1)  # one partial batch
    got = [
        (p, int(r), int(c))
        for b in batches
        for p, r, c in zip(b["patient_id"], b["row"], b["col"], strict=True)
    ]
    assert len(got) == len(set(got)) == ds.total_windows


@pytest.mark.parametrize("num_workers", [0, 2])
def test_channels_last_batches_equal_contiguous_ones(slide_folder: Path, num_workers: int) -> None:
    """``memory_format=torch.channels_last``: the same ``[n, C, H, W]`` values, stored ``n, H, W, C``
    (through the workers' shared-memory slots too, partial last batch and padded edge included)."""
    options: dict[str, Any] = dict(patch_size=200, level=1, batch_size=24, block_size=700, edge="pad")
    plain = bst.SlidingWindowDataset(dataset(slide_folder, 2), **options)
    last = bst.SlidingWindowDataset(dataset(slide_folder, 2), memory_format=torch.channels_last, **options)
    expected = list(DataLoader(plain, batch_size=None, num_workers=num_workers))
    got = list(DataLoader(last, batch_size=None, num_workers=num_workers))
    assert len(got) == len(expected) == len(last) and min(len(b["image"]) for b in got) < 24
    for a, b in zip(expected, got, strict=True):
        assert b["image"].shape == a["image"].shape and b["image"].dtype == torch.uint8
        assert b["image"].is_contiguous(memory_format=torch.channels_last)
        assert not b["image"].is_contiguous() and a["image"].is_contiguous()
        assert torch.equal(a["image"], b["image"])
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in ("x", "y", "row", "col"))
    pickled = pickle.loads(pickle.dumps(got[0]))  # a copy, strides kept
    assert torch.equal(pickled["image"], got[0]["image"])
    # Batched blocks inside the slide stay as their decoded tiles (no copy into a block), in either
    # memory format; blocks past the slide's edge (edge="pad") are padded arrays.
    for ds in (plain, last):
        kinds = [type(ds._read_block(b, b.cells)[0]) for b in ds._blocks]
        assert set(kinds) == {np.ndarray, TiledRegion} and kinds[0] is TiledRegion
    with pytest.raises(bst.ConfigError, match=r"memory_format must be .* with batch_size"):
        bst.SlidingWindowDataset(dataset(slide_folder, 1), 256, memory_format=torch.channels_last)
    with pytest.raises(bst.ConfigError, match="memory_format must be"):
        bst.SlidingWindowDataset(dataset(slide_folder, 1), 256, batch_size=4, memory_format="nhwc")  # type: ignore[arg-type]


def test_grid_geometry_and_pixels(slide_folder: Path) -> None:
    ds = bst.SlidingWindowDataset(
        dataset(slide_folder, 1), 200, stride=150, level=1, block_size=700
    )
    grid = ds.grid("synthetic_000")
    # edge="drop": only whole windows
    assert (grid.cols, grid.rows) == ((1536 - 200) // 150 + 1, (1280 - 200) // 150 + 1)
    assert grid.count == len(ds) == grid.rows * grid.cols
    reader = bst.open_slide(slide_folder / "synthetic_000.tiff")
    for s in itertools.islice(ds, 0, None, 7):
        assert (
            (s["x"], s["y"]) == grid.level0(s["row"], s["col"]) == (s["col"] * 300, s["row"] * 300)
        )
        expected = reader.read(s["x"], s["y"], 1, 200, 200)
        assert np.array_equal(s["image"].permute(1, 2, 0).numpy(), expected)
    geometry = grid.geometry()
    assert (
        geometry["x0"][1] == 300
        and geometry["level"] == 1
        and geometry["mpp"] == pytest.approx(1.0)
    )


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("level", [0, 1])
def test_batched_windows_equal_the_reader(
    slide_folder: Path, level: int, memory_format: torch.memory_format
) -> None:
    """Batched windows are cut straight from the decoded tiles (TiledRegion): every one, overlapping
    (stride < patch size) and across tile and block edges, equals the reader at its coordinates."""
    ds = bst.SlidingWindowDataset(
        dataset(slide_folder, 1), 200, stride=150, level=level, block_size=700, batch_size=16,
        edge="pad", memory_format=memory_format,
    )  # fmt: skip
    assert any(isinstance(ds._read_block(b, b.cells)[0], TiledRegion) for b in ds._blocks)
    reader = bst.open_slide(slide_folder / "synthetic_000.tiff")
    width, height = reader.info.level_dimensions[level]
    scale = 2**level
    n = padded = 0
    for batch in DataLoader(ds, batch_size=None):
        for image, x, y in zip(batch["image"], batch["x"], batch["y"], strict=True):
            got = image.permute(1, 2, 0).numpy()
            lx, ly = int(x) // scale, int(y) // scale
            w, h = min(200, width - lx), min(200, height - ly)  # the part inside the slide
            want = reader.read(int(x), int(y), level, w, h)
            assert np.array_equal(got[:h, :w], want), (int(x), int(y))
            assert (got[h:] == 255).all() and (got[:, w:] == 255).all()  # edge="pad": white
            n, padded = n + 1, padded + (w < 200 or h < 200)
    assert n == ds.total_windows and 0 < padded < n


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
    # level 1: 1536x1280
    ds = bst.SlidingWindowDataset(dataset(slide_folder, 1), 1000, level=1, edge=edge)
    grid = ds.grid("synthetic_000")
    expected = {
        "drop": ([0], [0]),
        "shift": ([0, 536], [0, 280]),
        "pad": ([0, 1000], [0, 1000]),
    }[edge]
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

    info = write_synthetic_slide(
        tmp_path / "blobs.tiff", width=2048, height=2048, tissue="blobs", seed=5
    )
    ds = bst.SlidingWindowDataset(
        bst.Dataset("d", [bst.Patient("b", {"wsi": bst.Record(info.path)})]),
        128,
        tissue_only=True,
        min_tissue=0.5,
    )
    grid = ds.grid("b")
    d = info.mask_downsample
    truth = [
        info.tissue_mask[
            int(y) // d : (int(y) + 128) // d, int(x) // d : (int(x) + 128) // d
        ].mean()
        for y in grid.ys
        for x in grid.xs
    ]
    kept = grid.include.ravel()
    assert 0 < kept.sum() < kept.size
    assert (
        np.mean(np.array(truth)[kept] >= 0.4) > 0.95
        and np.mean(np.array(truth)[~kept] < 0.6) > 0.95
    )
    assert len(list(ds)) == grid.count


def test_bad_input(slide_folder: Path) -> None:
    ds = dataset(slide_folder, 1)
    for kwargs, match in [
        ({"patch_size": 0}, "patch_size must be an int >= 1, got 0"),
        ({"stride": -1}, "stride must be an int >= 1, got -1"),
        ({"edge": "wrap"}, "edge must be one of"),
        ({"block_size": 0}, "block_size must be an int >= 1"),
    ]:
        with pytest.raises(bst.ConfigError, match=match):
            bst.SlidingWindowDataset(ds, **kwargs)
    with pytest.raises(bst.SlideError, match=r"smaller than patch_size=5000x5000; use edge='pad'"):
        bst.SlidingWindowDataset(ds, patch_size=5000)
    with pytest.raises(bst.ConfigError, match="unknown patient id 'x'"):
        bst.SlidingWindowDataset(ds, 256).grid("x")


def test_unreadable_block_is_reported_not_dropped_silently(
    slide_folder: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    ds = bst.SlidingWindowDataset(
        dataset(slide_folder, 2), 256, level=1, block_size=512, on_error="skip"
    )
    original = ds._read_block
    grid = ds.grids[1]

    def failing(
        block: Any, cells: np.ndarray
    ) -> Any:  # level-1 tile (0, 0) of slide 1 is "corrupt"
        if (
            block.slide == 1
            and grid.xs[cells[:, 1].min()] < 256
            and grid.ys[cells[:, 0].min()] < 256
        ):
            raise bst.SlideReadError("synthetic_001.tiff", "tile (0, 0) of level 1 is corrupt")
        return original(block, cells)

    monkeypatch.setattr(ds, "_read_block", failing)
    with caplog.at_level("WARNING", logger="bigsmall_torch"):
        got = list(ds)
    assert len(got) == len(ds) - 1  # the 2x2 block is re-read in pieces: only window (0, 0) is lost
    assert ds.last_skipped == [("synthetic_001", 0, 0)]
    message = " ".join(r.getMessage() for r in caplog.records)
    assert (
        "skipping 1 windows of patient 'synthetic_001' (rows 0-0, cols 0-0; the other 3" in message
    )
    monkeypatch.setattr(ds, "on_error", bst.OnError.RAISE)
    with pytest.raises(bst.SlideReadError, match="tile \\(0, 0\\) of level 1 is corrupt"):
        list(ds)
    assert (
        collections.Counter(s["patient_id"] for s in got)["synthetic_000"]
        == ds.grid("synthetic_000").count
    )


# -- a slide with one corrupt JPEG tile ----------------------------------------------------------

BAD_TILE = (512, 256, 256, 256)  # level-0 x, y, width, height of the corrupt tile (col 2, row 1)


@pytest.fixture(scope="module")
def corrupt_slide(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A 1024x1024 slide (256-px JPEG tiles) whose level-0 tile (col 2, row 1) does not decode, and
    an intact copy of it."""
    import tifffile

    from bigsmall_torch.synthetic import write_synthetic_slide

    folder = tmp_path_factory.mktemp("corrupt")
    info = write_synthetic_slide(folder / "clean.tiff", width=1024, height=1024, levels=2, seed=11)
    clean = info.path
    bad = folder / "bad.tiff"
    shutil.copyfile(clean, bad)
    with tifffile.TiffFile(bad) as tif:
        page = tif.series[0].levels[0].keyframe
        per_row = page.shape[1] // page.tilewidth
        index = BAD_TILE[1] // page.tilelength * per_row + BAD_TILE[0] // page.tilewidth
        offset, count = page.dataoffsets[index], page.databytecounts[index]
    with open(bad, "r+b") as f:  # no SOI marker: the decoder raises
        f.seek(offset)
        f.write(b"\x00" * count)
    return bad, clean


def one_slide(path: Path, pid: str = "bad") -> bst.Dataset:
    return bst.Dataset("c", [bst.Patient(pid, {"wsi": bst.Record(path)})])


def touching_bad_tile(grid: bst.Grid) -> set[tuple[Any, int, int]]:
    """The windows of ``grid`` (level 0) whose pixels overlap :data:`BAD_TILE`."""
    bx, by, bw, bh = BAD_TILE
    (pw, ph) = grid.patch_size
    rows = [r for r, y in enumerate(grid.ys) if y < by + bh and y + ph > by]
    cols = [c for c, x in enumerate(grid.xs) if x < bx + bw and x + pw > bx]
    return {(grid.patient_id, r, c) for r in rows for c in cols}


def all_windows(*grids: bst.Grid) -> set[tuple[Any, int, int]]:
    return {
        (g.patient_id, r, c)
        for g in grids
        for r in range(g.rows)
        for c in range(g.cols)
        if g.include[r, c]
    }


def test_corrupt_tile_loses_only_the_windows_touching_it(corrupt_slide: tuple[Path, Path]) -> None:
    bad, clean = corrupt_slide
    ds = bst.SlidingWindowDataset(
        one_slide(bad), 96, stride=64, level=0, block_size=1024, on_error="skip"
    )
    grid = ds.grid("bad")
    assert len(ds._blocks) == 1 and grid.count == 15 * 15  # one block holds the whole grid
    lost = touching_bad_tile(grid)
    assert len(lost) == 5 * 5
    got = {(s["patient_id"], s["row"], s["col"]): s["image"] for s in ds}
    assert set(got) == all_windows(grid) - lost and len(got) == grid.count - len(lost)
    assert set(ds.last_skipped) == lost and len(ds.last_skipped) == len(lost)
    truth = bst.open_slide(clean).read(0, 0, 0, 1024, 1024)
    for (_, row, col), image in got.items():
        x, y = int(grid.xs[col]), int(grid.ys[row])
        expected = truth[y : y + 96, x : x + 96]
        assert np.array_equal(image.permute(1, 2, 0).numpy(), expected), (row, col)
    strict = bst.SlidingWindowDataset(one_slide(bad), 96, stride=64, level=0, block_size=1024)
    with pytest.raises(bst.SlideReadError, match=r"tile \(col, row\) = \(2, 1\) of level 0"):
        list(strict)  # on_error="raise": unchanged


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("mode", ["samples", "batched", "loader-w2"])
def test_resume_after_skipped_windows_repeats_nothing(
    corrupt_slide: tuple[Path, Path], mode: str
) -> None:
    bad, clean = corrupt_slide
    data = bst.Dataset(
        "c",
        [
            bst.Patient("bad", {"wsi": bst.Record(bad)}),
            bst.Patient("clean", {"wsi": bst.Record(clean)}),
        ],
    )

    def make() -> bst.SlidingWindowDataset:  # 3x3 blocks of 5x5 windows per slide
        batch_size = 8 if mode == "batched" else None
        return bst.SlidingWindowDataset(
            data, 96, stride=64, level=0, block_size=384, on_error="skip", batch_size=batch_size
        )

    def cells(item: dict[str, Any]) -> list[tuple[Any, int, int]]:
        if mode == "samples":
            return [(item["patient_id"], item["row"], item["col"])]
        return [
            (p, int(r), int(c))
            for p, r, c in zip(item["patient_id"], item["row"], item["col"], strict=True)
        ]

    ds, counted = make(), None  # counted: skipped windows at the checkpoint and at the end
    if mode == "loader-w2":
        from_loader = pytest.importorskip(
            "torchdata.stateful_dataloader", reason="needs torchdata>=0.8"
        )
        loader = from_loader.StatefulDataLoader(ds, batch_size=8, num_workers=2)
        it = iter(loader)
        first = [w for _ in range(16) for w in cells(next(it))]  # worker 0 is past two skipped runs
        state = pickle.loads(pickle.dumps(loader.state_dict()))
        del it
        worker0 = state["_snapshot"]["_worker_snapshots"]["worker_0"]["dataset_state"]
        assert worker0["position"] == worker0["samples"] + worker0["skipped"] > worker0["samples"]
        resumed = from_loader.StatefulDataLoader(make(), batch_size=8, num_workers=2)
        resumed.load_state_dict(state)
        rest = [w for batch in resumed for w in cells(batch)]
    else:
        first, it = [], iter(ds)
        while not ds.last_skipped or len(first) < 60:  # a few windows past the first skipped ones
            first += cells(next(it))
        state = pickle.loads(pickle.dumps(ds.state_dict()))
        assert state["samples"] == len(first)
        assert state["position"] == state["samples"] + state["skipped"] > state["samples"]
        again = make()
        again.load_state_dict(state)
        rest = [w for item in again for w in cells(item)]
        counted = (state["skipped"], again.state_dict()["skipped"])
    seen = first + rest
    stitcher = bst.Stitcher(ds, progress=False)
    for start in range(0, len(seen), 8):  # "added twice" on any repeat
        chunk = seen[start : start + 8]
        pids, rows, cols = zip(*chunk, strict=True)
        stitcher.add(torch.zeros(len(chunk)), {"patient_id": pids, "row": rows, "col": cols})
    lost = touching_bad_tile(ds.grid("bad"))
    assert {("bad", int(r), int(c)) for r, c in stitcher.finish()["bad"].missing} == lost
    assert len(seen) == len(set(seen)) and set(seen) == all_windows(*ds.grids) - lost
    if counted is not None:  # each lost window counted once, before or after the checkpoint
        assert 0 < counted[0] < counted[1] == len(lost)


def test_halves_cut_at_row_boundaries_in_order() -> None:
    cells = np.array([(0, 3), (0, 4), (1, 0), (1, 1), (1, 2), (1, 3), (1, 4), (2, 0)])
    assert _halves(cells, 0, 8) == ((0, 2), (2, 8))  # the row boundary nearest the middle
    assert _halves(cells, 2, 7) == ((2, 4), (4, 7))  # one row: its middle
    assert _halves(cells, 0, 3) == ((0, 2), (2, 3))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"min_tissue": "0.5"}, r"min_tissue must be a number in \[0, 1\], got '0.5'"),
        ({"min_tissue": 1.5}, r"min_tissue must be a number in \[0, 1\], got 1.5"),
        ({"min_tissue": True}, r"min_tissue must be a number in \[0, 1\], got True"),
        ({"min_tissue": float("nan")}, r"min_tissue must be a number in \[0, 1\], got nan"),
        ({"tolerance": "0.05"}, r"tolerance must be a number in \[0, 1\), got '0.05'"),
        ({"tolerance": False}, r"tolerance must be a number in \[0, 1\), got False"),
        ({"tissue_only": "yes"}, r"tissue_only must be True or False, got 'yes'"),
        ({"tissue_only": 1}, r"tissue_only must be True or False, got 1"),
        (
            {"tissue_detector": "otsu"},
            r"tissue_detector must be a TissueDetector or None, got 'otsu'",
        ),
        ({"record_key": 3}, r"record_key must be a str, got 3"),
        ({"rank": "0", "world_size": 1}, r"rank must be an int >= 0, got '0'"),
        ({"rank": 0, "world_size": 2.0}, r"world_size must be an int >= 1, got 2.0"),
        ({"decode_threads": 0}, r"decode_threads must be an int >= 1, got 0"),
    ],
    ids=lambda v: ",".join(f"{k}={v[k]!r}" for k in v) if isinstance(v, dict) else "",
)
def test_bad_option_types_are_config_errors(
    slide_folder: Path, kwargs: dict[str, Any], match: str
) -> None:
    with pytest.raises(bst.ConfigError, match=f"SlidingWindowDataset: {match}"):
        bst.SlidingWindowDataset(dataset(slide_folder, 1), 256, **kwargs)
    numpy_scalar = bst.SlidingWindowDataset(
        dataset(slide_folder, 1), 256, min_tissue=np.float32(0.25)
    )
    assert numpy_scalar.min_tissue == 0.25


def test_blocks_start_on_tile_edges() -> None:
    """Windows per block are chosen so a block spans whole tiles (no tile decoded by two blocks)."""
    from bigsmall_torch.inference.sliding import _aligned

    assert _aligned(9, 224, 256, 100) == 8  # 8 x 224 = 1792 = 7 tiles of 256
    assert _aligned(4, 128, 256, 100) == 4  # already whole tiles
    assert _aligned(3, 96, 256, 100) == 3  # no aligned count keeps half the block: unchanged
    assert _aligned(9, 224, 256, 9) == 9  # one block spans the row anyway
    assert _aligned(9, 224, 0, 100) == 9  # untiled or resampled: unchanged
