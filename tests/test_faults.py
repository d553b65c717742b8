"""Fault injection: slides truncated, deleted or overwritten while DataLoader workers stream from them,
a corrupt JPEG tile in a real slide followed through the Stitcher, a worker killed with SIGKILL
mid-epoch, and epochs broken off early 24 times over (threads, file descriptors and RSS stay flat).

Damage is made deterministic by the geometry: slides are large relative to the big chunks, every
worker reopens its slides (``max_open_slides=1`` with two patients a worker) or reads the damaged
tiles only after the damage (sliding windows are read block by block, a few blocks ahead). What is
asserted is the documented contract: the package's error naming the file (``on_error="raise"``), or an
epoch of exact length with the loss reported (``"skip"``); never wrong pixels, never a hang (every
DataLoader has a ``timeout`` as a hang guard; it is not a speed limit).
"""

from __future__ import annotations

import collections
import contextlib
import gc
import json
import os
import re
import shutil
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
import torch
from torch.utils.data import DataLoader

import bigsmall_torch as bst
from bigsmall_torch.synthetic import synthesize_slides, write_synthetic_slide

tifffile = pytest.importorskip("tifffile")

HANG_GUARD_S = 60  # DataLoader(timeout=...): a hang fails the test instead of blocking it
SIDE, TILE = 1024, 128  # synthetic slides: 1024 x 1024, 128-px JPEG tiles, 8 x 8 tiles at level 0
DAMAGED_ROW = 4  # truncation and garbage start at this level-0 tile row (level-0 y = 512)
CHUNK, CROP = 256, 32  # training: big chunks and patches
WINDOW = 64  # inference: 16 x 16 windows a slide, blocks of 4 x 4 windows
DAMAGES = ["truncate", "delete", "garbage", "replace"]


# -- slides and their truth ------------------------------------------------------------------------


@dataclass(frozen=True)
class Pristine:
    """Intact synthetic slides, the slide that replaces one in the "replace" damage, and the level-0
    pixels of each (the truth every sample is compared with)."""

    paths: list[Path]
    replacement: Path
    truth: dict[str, np.ndarray]  # file stem -> level-0 pixels (HWC uint8)


def _level0(path: Path) -> np.ndarray:
    reader = bst.open_slide(path)
    try:
        width, height = reader.info.dimensions
        return reader.read(0, 0, 0, width, height)
    finally:
        reader.close()


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Pristine:
    folder = tmp_path_factory.mktemp("fault-slides")
    infos = synthesize_slides(
        folder, n=4, width=SIDE, height=SIDE, tile_size=TILE, levels=2, tissue="full"
    )
    replacement = write_synthetic_slide(
        folder / "replacement.tiff", width=SIDE, height=SIDE, tile_size=TILE, levels=2,
        tissue="full", seed=100,
    ).path  # fmt: skip
    truth = {p.path.stem: _level0(p.path) for p in infos}
    truth["replacement"] = _level0(replacement)
    return Pristine([i.path for i in infos], replacement, truth)


def _copies(pristine: Pristine, folder: Path, n: int) -> list[Path]:
    """Writable copies of the first ``n`` pristine slides in ``folder`` (same file names)."""
    folder.mkdir(parents=True, exist_ok=True)
    return [Path(shutil.copyfile(p, folder / p.name)) for p in pristine.paths[:n]]


def _level0_tiles(path: Path) -> tuple[np.ndarray, np.ndarray, int]:
    """Level-0 tile offsets, byte counts and tiles per row of a tiled TIFF."""
    with tifffile.TiffFile(path) as tif:
        page = tif.series[0].levels[0].keyframe
        across = -(-page.imagewidth // page.tilewidth)
        return np.asarray(page.dataoffsets), np.asarray(page.databytecounts), across


def _damage(path: Path, how: str, replacement: Path) -> None:
    """Damage ``path`` in place, while readers may have it open.

    ``truncate``: cut the file where level-0 tile row :data:`DAMAGED_ROW` starts (that row, the rows
    below and every later level are gone; a reopen is refused). ``garbage``: overwrite that one tile
    row with random bytes (same file, same inode). ``delete``: unlink it (open handles still read it).
    ``replace``: move another slide of the same geometry over it (``os.replace``: a new inode; open
    handles still read the old one, a reopen reads the new one).
    """
    if how == "delete":
        path.unlink()
        return
    if how == "replace":
        incoming = path.with_name(path.name + ".incoming")
        shutil.copyfile(replacement, incoming)
        os.replace(incoming, path)
        return
    offsets, counts, across = _level0_tiles(path)
    row = slice(DAMAGED_ROW * across, (DAMAGED_ROW + 1) * across)
    start, end = int(offsets[row].min()), int((offsets[row] + counts[row]).max())
    assert start >= int((offsets[: row.start] + counts[: row.start]).max())  # rows lie in order
    if how == "truncate":
        os.truncate(path, start)
    elif how == "garbage":
        noise = np.random.default_rng(0).integers(0, 256, end - start, dtype=np.uint8)
        with open(path, "r+b") as f:
            f.seek(start)
            f.write(noise.tobytes())
    else:
        raise AssertionError(f"unknown damage {how!r}")


def _patch_equals(truth: np.ndarray, image: torch.Tensor, x: int, y: int) -> bool:
    """Whether a CHW uint8 patch equals ``truth`` at level-0 ``(x, y)``."""
    h, w = image.shape[-2:]
    return bool(np.array_equal(image.permute(1, 2, 0).numpy(), truth[y : y + h, x : x + w]))


def _rows(batch: dict[str, Any]) -> Iterator[tuple[str, int, int, torch.Tensor]]:
    for i in range(len(batch["patient_id"])):
        yield batch["patient_id"][i], int(batch["x"][i]), int(batch["y"][i]), batch["image"][i]


def _forget(exc: BaseException) -> tuple[type[BaseException], str]:
    """The type and message of ``exc``, its tracebacks dropped: they hold the DataLoader iterator in a
    reference cycle, whose workers would otherwise be shut down whenever the garbage collector runs
    (in a later test, waiting out torch's 5 s join timeouts)."""
    seen: BaseException | None = exc
    while seen is not None:
        seen.__traceback__ = None
        seen = seen.__cause__ or seen.__context__
    return type(exc), str(exc)


# -- 1a. training: a slide damaged while two workers stream from it ------------------------------


@pytest.mark.parametrize("on_error", ["raise", "skip"])
@pytest.mark.parametrize("how", DAMAGES)
def test_training_slide_damaged_while_workers_stream(
    pristine: Pristine, tmp_path: Path, how: str, on_error: str
) -> None:
    paths = _copies(pristine, tmp_path / "slides", 4)
    victim = paths[1]
    ds = bst.BigSmallDataset(
        bst.Dataset.from_folder(tmp_path / "slides", pattern="*.tiff"),
        bst.RandomRegionLoader(CHUNK),
        bst.RandomCropCollector(CROP),
        buffer_size=1, smallchunks_per_bigchunk=4, prefetch=1, samples_per_epoch=1024, seed=0,
        on_error=on_error, max_open_slides=1,  # two patients a worker: every big chunk reopens
    )  # fmt: skip
    loader = DataLoader(ds, batch_size=16, num_workers=2, timeout=HANG_GUARD_S)
    counts: collections.Counter[str] = collections.Counter()
    from_replacement = batches = 0
    error: tuple[type[BaseException], str] | None = None
    try:
        for batch in loader:
            for pid, x, y, image in _rows(batch):
                counts[pid] += 1
                if _patch_equals(pristine.truth[pid], image, x, y):
                    continue
                # Only a slide moved over the victim may give other pixels, and then its own.
                assert how == "replace" and pid == victim.stem, (pid, x, y)
                assert _patch_equals(pristine.truth["replacement"], image, x, y), (pid, x, y)
                from_replacement += 1
            batches += 1
            if batches == 4:
                _damage(victim, how, pristine.replacement)
    except bst.SlideError as exc:
        error = _forget(exc)
    if how == "replace":  # a valid slide: read through the old handle, then reopened
        assert error is None
        # The reopened file is the replacement: its pixels, not made-up ones.
        assert from_replacement > 0
    elif on_error == "raise":
        assert error is not None, "the damage must surface as the package's error"
        assert victim.name in error[1]
        assert batches < len(loader)  # promptly: the epoch did not run to its end first
        return
    else:
        assert error is None
        # Skipped after the damage; the other patient of its worker filled in.
        assert counts[victim.stem] < 1024 // 4 < max(counts.values())
    assert batches == len(loader) == 64 and sum(counts.values()) == 1024  # the exact epoch
    assert set(counts) == {p.stem for p in paths}


def test_training_skip_reports_the_slide_in_process(pristine: Pristine, tmp_path: Path) -> None:
    """``num_workers=0``: the skip report names the damaged file."""
    paths = _copies(pristine, tmp_path / "slides", 2)
    ds = bst.BigSmallDataset(
        bst.Dataset.from_folder(tmp_path / "slides", pattern="*.tiff"),
        bst.RandomRegionLoader(CHUNK), bst.RandomCropCollector(CROP),
        buffer_size=1, smallchunks_per_bigchunk=4, prefetch=1, samples_per_epoch=256, seed=0,
        on_error="skip", max_open_slides=1,
    )  # fmt: skip
    seen = 0
    for sample in ds:
        pid = sample["patient_id"]
        assert _patch_equals(pristine.truth[pid], sample["image"], sample["x"], sample["y"])
        seen += 1
        if seen == 16:
            _damage(paths[0], "truncate", pristine.replacement)
    assert seen == 256
    assert [Path(what).name for what in ds.skipped] == [paths[0].name]
    assert "truncated" in next(iter(ds.skipped.values()))


# -- 1b. inference: a slide damaged while workers stream from it -----------------------------------


def _checksums(images: torch.Tensor) -> torch.Tensor:
    """Per window: the sum of each channel and of 5 fixed random pixel subsets, exact in float32
    (each sum is below 2**24), so that the Stitcher's arrays compare exactly and any changed pixel
    shows."""
    flat = images.reshape(images.shape[0], -1).to(torch.int64)
    rng = np.random.default_rng(1)
    masks = torch.from_numpy(rng.random((5, flat.shape[1])) < 0.5).to(torch.int64)
    per_channel = images.reshape(images.shape[0], images.shape[1], -1).to(torch.int64).sum(-1)
    return torch.cat([per_channel, flat @ masks.T], dim=1).to(torch.float32)


def _window_truth(truth: np.ndarray, grid: bst.Grid) -> np.ndarray:
    """:func:`_checksums` of every window of ``grid`` (level 0), read from ``truth``."""
    (pw, ph), out = grid.patch_size, []
    for row in range(grid.rows):
        for col in range(grid.cols):
            x, y = grid.level0(row, col)
            out.append(torch.from_numpy(truth[y : y + ph, x : x + pw]).permute(2, 0, 1))
    return _checksums(torch.stack(out)).numpy().reshape(grid.rows, grid.cols, -1)


def _lost_rows(how: str) -> range:
    """Window rows (64-px windows, level 0) whose pixels touch the tiles ``how`` damages."""
    first = DAMAGED_ROW * TILE // WINDOW
    if how == "truncate":
        return range(first, SIDE // WINDOW)
    if how == "garbage":
        return range(first, (DAMAGED_ROW + 1) * TILE // WINDOW)
    return range(0)  # delete, replace: open handles keep reading the file that was there


def _windows(folder: Path, **kwargs: Any) -> bst.SlidingWindowDataset:
    return bst.SlidingWindowDataset(
        bst.Dataset.from_folder(folder, pattern="*.tiff"), WINDOW, level=0, block_size=4 * WINDOW,
        **kwargs,
    )  # fmt: skip


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("on_error", ["raise", "skip"])
@pytest.mark.parametrize("how", DAMAGES)
def test_inference_slide_damaged_while_workers_stream(
    pristine: Pristine, tmp_path: Path, how: str, on_error: str
) -> None:
    stateful = pytest.importorskip("torchdata.stateful_dataloader", reason="needs torchdata>=0.8")
    paths = _copies(pristine, tmp_path / "slides", 2)
    victim = paths[1]  # worker 1's range: all of slide 1, read block by block
    ds = _windows(tmp_path / "slides", batch_size=16, on_error=on_error)
    loader = stateful.StatefulDataLoader(ds, batch_size=None, num_workers=2, timeout=HANG_GUARD_S)
    stitcher = bst.Stitcher(ds, progress=False)
    received = 0
    error: tuple[type[BaseException], str] | None = None
    try:
        for index, batch in enumerate(loader):
            stitcher.add(_checksums(batch["image"]), batch)
            received += len(batch["patient_id"])
            # A worker runs at most 2 batches (prefetch_factor) and one block ahead of what has
            # arrived here: worker 1 has read at most 5 of slide 1's 4 x 4-window blocks (window
            # rows < 8), so the damaged rows are read after the damage.
            if index == 1:
                _damage(victim, how, pristine.replacement)
    except bst.SlideError as exc:
        error = _forget(exc)
    results = stitcher.finish()
    lost = {(r, c) for r in _lost_rows(how) for c in range(SIDE // WINDOW)}
    if lost and on_error == "raise":
        assert error is not None and victim.name in error[1]
        assert received < ds.total_windows
        return
    assert error is None
    for path in paths:
        result = results[path.stem]
        missing = {(int(r), int(c)) for r, c in result.missing}
        assert missing == (lost if path == victim else set())
        expected = _window_truth(pristine.truth[path.stem], ds.grid(path.stem))
        got = result.array
        kept = result.coverage > 0
        np.testing.assert_array_equal(got[kept], expected[kept])  # no wrong pixels
        assert np.isnan(got[~kept]).all() and int((~kept).sum()) == len(missing)
    assert received == ds.total_windows - len(lost)
    workers = loader.state_dict()["_snapshot"]["_worker_snapshots"]
    assert sum(w["dataset_state"]["skipped"] for w in workers.values()) == len(lost)


@pytest.mark.parametrize("on_error", ["raise", "skip"])
@pytest.mark.parametrize("how", ["truncate", "garbage", "delete"])
def test_inference_slide_damaged_in_process(
    pristine: Pristine, tmp_path: Path, how: str, on_error: str
) -> None:
    """``num_workers=0``: slide 0 truncated or overwritten while open (after its first block), or
    slide 1 deleted before it was ever opened (then every window of it is lost)."""
    paths = _copies(pristine, tmp_path / "slides", 2)
    ds = _windows(tmp_path / "slides", on_error=on_error)
    victim = paths[1] if how == "delete" else paths[0]
    cols = range(SIDE // WINDOW)
    rows = range(SIDE // WINDOW) if how == "delete" else _lost_rows(how)
    lost = {(victim.stem, r, c) for r in rows for c in cols}
    got: dict[tuple[str, int, int], torch.Tensor] = {}
    stream = iter(ds)
    with pytest.raises(bst.SlideError) if on_error == "raise" else contextlib.nullcontext() as info:
        for sample in stream:
            got[(sample["patient_id"], sample["row"], sample["col"])] = sample["image"]
            if len(got) == 16:  # slide 0's first block consumed, its second being read
                _damage(victim, how, pristine.replacement)
    if on_error == "raise":
        assert info is not None and info.value.path == victim
        assert len(got) < ds.total_windows
        return
    assert set(ds.last_skipped) == lost and len(ds.last_skipped) == len(lost)
    assert ds.state_dict()["skipped"] == len(lost)
    assert len(got) == ds.total_windows - len(lost) and not set(got) & lost
    for (pid, row, col), image in got.items():
        x, y = ds.grid(pid).level0(row, col)
        assert _patch_equals(pristine.truth[pid], image, x, y), (pid, row, col)
    # The core's report (StreamingDataset.skipped: what on_error="skip" left out, here in this
    # process's latest iteration) lists every lost window too, also those after the last emitted.
    assert len(ds.skipped) == len(lost), (
        f"ds.skipped has {len(ds.skipped)} of {len(lost)} lost windows"
    )


# -- 2. a corrupt JPEG tile in a real slide, through the Stitcher ----------------------------------

REAL_TILE = 240  # cmu-1-small-region.svs: 2220 x 2967, 240 x 240 JPEG tiles
BAD_COL, BAD_ROW = 3, 2  # the damaged tile: level-0 x 720-960, y 480-720


def _corrupt_real(source: Path, target: Path) -> Path:
    """A copy of ``source`` with 16 bytes in the middle of tile (BAD_COL, BAD_ROW) zeroed (libjpeg
    reports "Corrupt JPEG data"; tests/test_corrupt_jpeg.py shows every decoder path refuses it)."""
    shutil.copyfile(source, target)
    with tifffile.TiffFile(target) as tif:
        page = tif.pages[0]
        index = BAD_ROW * -(-page.imagewidth // page.tilewidth) + BAD_COL
        offset, count = int(page.dataoffsets[index]), int(page.databytecounts[index])
    with open(target, "r+b") as f:
        f.seek(offset + count // 2)
        f.write(b"\x00" * 16)
    return target


def _one(path: Path, pid: str) -> bst.Dataset:
    return bst.Dataset("real", [bst.Patient(pid, {"wsi": bst.Record(path)})])


REAL_KWARGS: dict[str, Any] = dict(
    patch_size=160, stride=100, block_size=480, batch_size=16, on_error="skip"
)


def _touching_bad_tile(grid: bst.Grid) -> set[tuple[int, int]]:
    """The windows of ``grid`` (level 0) whose pixels overlap tile (BAD_COL, BAD_ROW)."""
    x0, y0 = BAD_COL * REAL_TILE, BAD_ROW * REAL_TILE
    (pw, ph) = grid.patch_size
    return {
        (r, c)
        for r, y in enumerate(grid.ys)
        for c, x in enumerate(grid.xs)
        if x < x0 + REAL_TILE and x + pw > x0 and y < y0 + REAL_TILE and y + ph > y0
    }


@pytest.fixture(scope="module")
def real_reference(shared_slides: Path) -> bst.StitchResult:
    """:func:`_checksums` of every window of the intact real slide, stitched."""
    ds = bst.SlidingWindowDataset(
        _one(shared_slides / "cmu-1-small-region.svs", "cmu1"), **REAL_KWARGS
    )
    stitcher = bst.Stitcher(ds, progress=False)
    for batch in DataLoader(ds, batch_size=None):
        stitcher.add(_checksums(batch["image"]), batch)
    result = stitcher.finish()["cmu1"]
    assert len(result.missing) == 0
    return result


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_real_slide_corrupt_tile_stitched_missing_exactly(
    cmu1: Path, tmp_path: Path, real_reference: bst.StitchResult
) -> None:
    """Overlapping windows straddling tile borders (21 x 29 of them), two workers, batched: the
    Stitcher reports exactly the 16 windows touching the bad tile missing, every other window equals
    the intact slide's, and the workers' states count the 16 as skipped."""
    stateful = pytest.importorskip("torchdata.stateful_dataloader", reason="needs torchdata>=0.8")
    damaged = _corrupt_real(cmu1, tmp_path / "damaged.svs")
    ds = bst.SlidingWindowDataset(_one(damaged, "cmu1"), **REAL_KWARGS)
    grid = ds.grid("cmu1")
    touching = _touching_bad_tile(grid)
    assert len(touching) == 16  # x in 600..900, y in 400..700
    stitcher = bst.Stitcher(ds, progress=False)
    loader = stateful.StatefulDataLoader(ds, batch_size=None, num_workers=2, timeout=HANG_GUARD_S)
    for batch in loader:
        stitcher.add(_checksums(batch["image"]), batch)
    result = stitcher.finish()["cmu1"]
    assert {(int(r), int(c)) for r, c in result.missing} == touching
    kept = np.ones((grid.rows, grid.cols), dtype=bool)
    kept[tuple(np.array(sorted(touching)).T)] = False
    np.testing.assert_array_equal(result.coverage > 0, kept)
    np.testing.assert_array_equal(result.array[kept], real_reference.array[kept])
    assert np.isnan(result.array[~kept]).all()
    workers = loader.state_dict()["_snapshot"]["_worker_snapshots"]
    assert sum(w["dataset_state"]["skipped"] for w in workers.values()) == len(touching)


def test_real_slide_corrupt_tile_stitcher_writes_its_files(cmu1: Path, tmp_path: Path) -> None:
    """With ``out_dir`` the Stitcher writes the slide's files (the heatmap over a thumbnail of the
    damaged slide included) and its JSON counts the missing windows: the run that skipped the bad
    tile's windows must not fail at the end over the same tile."""
    damaged = _corrupt_real(cmu1, tmp_path / "damaged.svs")
    ds = bst.SlidingWindowDataset(_one(damaged, "cmu1"), **REAL_KWARGS)
    stitcher = bst.Stitcher(ds, tmp_path / "out", progress=False)
    for batch in DataLoader(ds, batch_size=None):
        stitcher.add(_checksums(batch["image"]), batch)
    result = stitcher.finish()["cmu1"]
    assert {(int(r), int(c)) for r, c in result.missing} == _touching_bad_tile(ds.grid("cmu1"))
    assert set(result.paths) == {"npy", "coverage", "json", "png"}
    assert all(path.exists() for path in result.paths.values())
    assert json.loads(result.paths["json"].read_text())["missing"] == 16


@pytest.mark.parametrize("on_error", ["raise", "skip"])
def test_real_slide_corrupt_tile_in_training_with_workers(
    cmu1: Path, tmp_path: Path, on_error: str
) -> None:
    """Four patients (the damaged slide and three intact copies), two workers: "raise" names the
    file and libjpeg's complaint; "skip" keeps the exact epoch and never gives a wrong patch."""
    folder = tmp_path / "slides"
    folder.mkdir()
    _corrupt_real(cmu1, folder / "damaged.svs")
    for name in ("a", "b", "c"):
        shutil.copyfile(cmu1, folder / f"{name}.svs")
    truth = _level0(cmu1)
    ds = bst.BigSmallDataset(
        bst.Dataset.from_folder(folder, pattern="*.svs"),
        bst.RandomRegionLoader((2220, 720)),  # full width: 3 of its 11 places cover the bad tile's row
        bst.RandomCropCollector(64),
        buffer_size=1, smallchunks_per_bigchunk=8, prefetch=1, samples_per_epoch=256, seed=0,
        on_error=on_error,
    )  # fmt: skip
    loader = DataLoader(ds, batch_size=16, num_workers=2, timeout=HANG_GUARD_S)
    counts: collections.Counter[str] = collections.Counter()
    if on_error == "raise":
        error: tuple[type[BaseException], str] | None = None
        try:
            for batch in loader:
                counts.update(batch["patient_id"])
        except bst.SlideError as exc:
            error = _forget(exc)
        assert error is not None and issubclass(error[0], bst.SlideReadError)
        assert "damaged.svs" in error[1] and "Corrupt JPEG data" in error[1]
        assert sum(counts.values()) < 256
        return
    for batch in loader:
        for pid, x, y, image in _rows(batch):
            counts[pid] += 1
            assert _patch_equals(truth, image, x, y), (pid, x, y)
    assert sum(counts.values()) == 256 and len(loader) == 16
    assert counts["damaged"] < 256 // 4  # skipped once its bad tile was read


# -- 3. a worker killed with SIGKILL mid-epoch ------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two 512 x 512 slides with 128-px tiles, one level."""
    folder = tmp_path_factory.mktemp("tiny-slides")
    synthesize_slides(folder, n=2, width=512, height=512, tile_size=128, levels=1, tissue="full")
    return folder


def _tiny_dataset(folder: Path, batched: bool, **kwargs: Any) -> bst.BigSmallDataset:
    options: dict[str, Any] = dict(
        buffer_size=2, smallchunks_per_bigchunk=8, samples_per_epoch=512, seed=0, decode_threads=2,
        batch_size=8 if batched else None,
    )  # fmt: skip
    options.update(kwargs)
    return bst.BigSmallDataset(
        bst.Dataset.from_folder(folder, pattern="*.tiff"), bst.RandomRegionLoader(128),
        bst.RandomCropCollector(32), **options,
    )  # fmt: skip


def _shm_of(pids: set[int]) -> set[str]:
    """Entries of /dev/shm named like ours ("bigsmall*", "torch_*") that carry one of ``pids``."""
    if not os.path.isdir("/dev/shm"):
        return set()
    return {
        name
        for name in os.listdir("/dev/shm")
        if name.startswith(("bigsmall", "torch_"))
        and {int(n) for n in re.findall(r"\d+", name)} & pids
    }


# What the main process may see when a worker dies: torch's RuntimeError (its SIGCHLD handler, or
# its check of the workers after a failed read of the queue), or, when the dead worker's last batch
# is being unpickled at that moment, the error of fetching its shared-memory file descriptor from the
# dead process (torch re-raises that one as it is when it cannot yet see the worker as dead).
WORKER_DEATH = (RuntimeError, ConnectionError, EOFError)


def _kill_and_drain(it: Any, pid: int) -> tuple[type[BaseException], str]:
    """SIGKILL worker ``pid`` of iterator ``it``, go on iterating, and return the error the main
    process got (its type and message; the exception itself would keep the iterator alive).

    torch's SIGCHLD handler raises in whatever line runs when the signal arrives: waiting for the
    worker to be dead (not reaped, so that torch still sees how it died) keeps that line in here.
    """
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
        for _ in it:
            pass
    except WORKER_DEATH as exc:
        return type(exc), str(exc)
    raise AssertionError("the main process went on as if the worker were alive")


@pytest.mark.parametrize("batched", [False, True], ids=["per-sample", "batched"])
def test_worker_killed_mid_epoch(tiny: Path, batched: bool) -> None:
    before = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
    ds = _tiny_dataset(tiny, batched)
    ds.send_message("synthetic_000", "hello")  # the message board: a file in /dev/shm
    board = ds.board.path
    assert board.exists()
    batch_size = None if batched else 8
    it: Any = iter(DataLoader(ds, batch_size=batch_size, num_workers=2, timeout=HANG_GUARD_S))
    try:
        kept = [next(it) for _ in range(4)]  # two batches of each worker
        copies = [b["image"].clone() for b in kept]
        workers = [w.pid for w in it._workers]
        error, message = _kill_and_drain(it, workers[0])
    finally:
        it = None  # shuts the other worker down
    gc.collect()
    if issubclass(error, RuntimeError):  # not the timeout: the hang guard did not fire
        assert re.search(
            rf"worker \(pid(\(s\))? {workers[0]}\) (exited unexpectedly|is killed by signal)",
            message,
        )
    assert not [pid for pid in workers if psutil.pid_exists(pid)]  # both reaped, none orphaned
    # Batches kept from the dead worker (batched mode: views of its shared-memory slots) are intact.
    for batch, copy in zip(kept, copies, strict=True):
        assert torch.equal(batch["image"], copy)
    # The dataset is still usable: a fresh loader runs a whole epoch.
    fresh = DataLoader(ds, batch_size=batch_size, num_workers=2, timeout=HANG_GUARD_S)
    assert sum(len(b["patient_id"]) for b in fresh) == 512
    del kept, batch, fresh, ds
    gc.collect()
    assert not board.exists()
    after = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
    # Nothing of the main process or of the surviving worker is left. The killed worker may leave
    # one segment: SIGKILL between torch's creating a shared-memory file and its unlinking it (a
    # window of microseconds inside torch's allocator) leaves that file, and nothing can remove it.
    assert _shm_of({os.getpid(), workers[1]}) & (after - before) == set(), (os.getpid(), workers)
    assert len(_shm_of({workers[0]}) & (after - before)) <= 1, (os.getpid(), workers)


# -- 4. breaking out of an epoch early, 24 times -----------------------------------------------------


@dataclass(frozen=True)
class Usage:
    threads: int
    fds: int
    rss: int
    workers: dict[int, tuple[int, int, int]]  # pid -> threads, fds, rss of a persistent worker


def _usage(children: bool, ignore: frozenset[int] | set[int] = frozenset()) -> Usage:
    """This process's threads, open file descriptors and RSS (and, with ``children``, those of each
    child process: the persistent workers), after a garbage collection."""
    gc.collect()
    me = psutil.Process()
    workers = {}
    if children:
        for child in me.children():
            if child.pid in ignore:
                continue
            with child.oneshot():
                workers[child.pid] = (child.num_threads(), child.num_fds(), child.memory_info().rss)
    return Usage(
        len(threading.enumerate()), len(os.listdir("/proc/self/fd")), me.memory_info().rss, workers
    )


MIB = 1 << 20
# 18 iterations lie between the two measurements: a leak of one thread or file descriptor, or of
# about 1.4 MiB, per iteration exceeds these.
THREAD_SLACK, FD_SLACK, RSS_SLACK = 3, 8, 24 * MIB
ITERATIONS, FIRST_CHECK = 24, 6


@pytest.mark.parametrize(
    ("workers", "persistent"),
    [(0, False), (2, False), (2, True)],
    ids=["w0", "w2", "w2-persistent"],
)
@pytest.mark.parametrize("kind", ["per-sample", "batched", "sliding"])
def test_break_early_and_reiterate_stays_flat(
    tiny: Path, kind: str, workers: int, persistent: bool
) -> None:
    if kind == "sliding":
        ds: Any = bst.SlidingWindowDataset(
            bst.Dataset.from_folder(tiny, pattern="*.tiff"), 32, level=0, block_size=128,
            batch_size=8,
        )  # fmt: skip
    else:
        ds = _tiny_dataset(tiny, kind == "batched", samples_per_epoch=None)
    loader = DataLoader(
        ds, batch_size=None if ds.batch_size else 8, num_workers=workers,
        persistent_workers=persistent, timeout=HANG_GUARD_S if workers else 0,
    )  # fmt: skip
    # Helpers earlier tests started stay for the whole session (multiprocessing's resource tracker,
    # torch_shm_manager): only children this test starts count.
    helpers = {child.pid for child in psutil.Process().children()}
    checkpoints: dict[int, Usage] = {}
    for iteration in range(1, ITERATIONS + 1):
        if isinstance(ds, bst.BigSmallDataset):
            ds.set_epoch(iteration)
        for index, batch in enumerate(loader):
            assert batch["image"].shape[0] == 8
            if index == 2:
                break
        del batch
        if iteration in (FIRST_CHECK, ITERATIONS):
            checkpoints[iteration] = _usage(children=persistent, ignore=helpers)
    first, last = checkpoints[FIRST_CHECK], checkpoints[ITERATIONS]
    assert last.threads - first.threads <= THREAD_SLACK, (first, last)
    assert last.fds - first.fds <= FD_SLACK, (first, last)
    assert last.rss - first.rss <= RSS_SLACK, (first.rss / MIB, last.rss / MIB)
    if persistent:
        assert len(first.workers) == 2 and set(last.workers) == set(first.workers)  # not restarted
        for pid, (threads, fds, rss) in last.workers.items():
            threads0, fds0, rss0 = first.workers[pid]
            assert threads - threads0 <= THREAD_SLACK and fds - fds0 <= FD_SLACK, (pid, first, last)
            assert rss - rss0 <= RSS_SLACK, (pid, rss0 / MIB, rss / MIB)
    else:
        left = [c for c in psutil.Process().children() if c.pid not in helpers]
        assert not left  # every worker of every iteration is gone
