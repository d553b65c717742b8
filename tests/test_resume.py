"""Checkpoint and resume mid-epoch with torchdata's StatefulDataLoader, in a fresh process.

A loader is stopped after a few batches, its ``state_dict()`` is pickled to a file, and
``tests/scripts/resume_child.py`` restores it in a new process and streams the rest; the prefix plus
the resumed part must equal an uninterrupted run sample for sample (patient, position, pixel sum).
"""

from __future__ import annotations

import importlib.util
import json
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from torch.utils.data import DataLoader

import bigsmall_torch as bst

pytest.importorskip(
    "torchdata.stateful_dataloader", reason="needs torchdata>=0.8 (the [test] extra)"
)

CHILD = Path(__file__).parent / "scripts" / "resume_child.py"
_spec = importlib.util.spec_from_file_location("resume_child", CHILD)
assert _spec is not None and _spec.loader is not None
child = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(child)

STOP_AFTER = 5  # batches taken before the checkpoint


def uninterrupted(kind: str, folder: Path, num_workers: int) -> list[list[Any]]:
    loader = child.make_loader(kind, child.build(kind, folder), num_workers)
    return [r for batch in loader for r in child.records(batch)]


def checkpoint(kind: str, folder: Path, num_workers: int, path: Path) -> list[list[Any]]:
    """The first ``STOP_AFTER`` batches; the loader's state is pickled to ``path``."""
    loader = child.make_loader(kind, child.build(kind, folder), num_workers)
    prefix: list[list[Any]] = []
    batches = iter(loader)
    for _ in range(STOP_AFTER):
        prefix += child.records(next(batches))
    path.write_bytes(pickle.dumps(loader.state_dict()))
    del batches  # the job is "killed": workers go away
    return prefix


def resume_in_fresh_process(
    kind: str, folder: Path, num_workers: int, state: Path, tmp: Path
) -> list[list[Any]]:
    out = tmp / "rest.json"
    subprocess.run(
        [sys.executable, "-W", "ignore", str(CHILD), kind, str(folder), str(num_workers), str(state), str(out)],
        check=True, timeout=300,
    )  # fmt: skip
    rest: list[list[Any]] = json.loads(out.read_text())
    return rest


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize(
    ("kind", "num_workers"),
    [("bigsmall", 0), ("bigsmall", 2), ("bigsmall-batched", 2), ("sliding", 2)],
    ids=["bigsmall-w0", "bigsmall-w2", "bigsmall-batched-w2", "sliding-w2"],
)
def test_resumed_stream_equals_uninterrupted(
    slide_folder: Path, tmp_path: Path, kind: str, num_workers: int
) -> None:
    full = uninterrupted(kind, slide_folder, num_workers)
    prefix = checkpoint(kind, slide_folder, num_workers, tmp_path / "state.pkl")
    rest = resume_in_fresh_process(
        kind, slide_folder, num_workers, tmp_path / "state.pkl", tmp_path
    )
    assert 0 < len(prefix) < len(full)
    assert prefix + rest == full
    if kind == "sliding":  # inference: every window exactly once
        assert len({(p, x, y) for p, x, y, _ in full}) == len(full)


def _worker_state(loader_state: dict[str, Any], worker: int) -> dict[str, Any]:
    state: dict[str, Any] = loader_state["_snapshot"]["_worker_snapshots"][f"worker_{worker}"][
        "dataset_state"
    ]
    return state


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("kind", ["bigsmall", "sliding"])
def test_resume_with_other_num_workers_is_a_config_error(
    slide_folder: Path, tmp_path: Path, kind: str
) -> None:
    checkpoint(kind, slide_folder, 2, tmp_path / "state.pkl")
    state = _worker_state(pickle.loads((tmp_path / "state.pkl").read_bytes()), 0)
    assert state["num_workers"] == 2
    ds = child.build(kind, slide_folder)
    ds.load_state_dict(state)
    with pytest.raises(bst.ConfigError, match=r"num_workers=0.*num_workers=2"):
        next(iter(ds))  # main process: num_workers=0
    ds.load_state_dict(state)  # raised in a worker, re-raised in the main process
    with pytest.raises(bst.ConfigError, match=r"num_workers=1.*num_workers=2"):
        next(iter(DataLoader(ds, batch_size=None, num_workers=1)))


def test_state_before_iterating_means_start_of_epoch(slide_folder: Path) -> None:
    ds = child.build("bigsmall", slide_folder)
    ds.set_epoch(2)
    state = pickle.loads(pickle.dumps(ds.state_dict()))
    assert state["epoch"] == 2 and state["samples"] == 0 and state["reservoir"] is None
    again = child.build("bigsmall", slide_folder)
    again.load_state_dict(state)
    assert again.epoch == 2
    assert [s["x"] for s in again] == [s["x"] for s in ds]


def test_state_right_after_iter_is_the_new_epochs_start(slide_folder: Path) -> None:
    """torchdata asks each worker for its state right after iter(): it must describe the epoch
    just started, not the previous one (which would resume as finished and lose the epoch)."""
    ds = bst.BigSmallDataset(
        bst.Dataset.from_folder(slide_folder, pattern="*.tiff"), bst.RandomRegionLoader(size=256),
        bst.RandomCropCollector(64), buffer_size=1, smallchunks_per_bigchunk=4, samples_per_epoch=8,
    )  # fmt: skip
    assert len(list(ds)) == 8
    ds.set_epoch(1)
    iter(ds)
    state = ds.state_dict()
    assert (state["epoch"], state["samples"], state["finished"]) == (1, 0, False)
    fresh = bst.BigSmallDataset(
        bst.Dataset.from_folder(slide_folder, pattern="*.tiff"), bst.RandomRegionLoader(size=256),
        bst.RandomCropCollector(64), buffer_size=1, smallchunks_per_bigchunk=4, samples_per_epoch=8,
    )  # fmt: skip
    fresh.load_state_dict(state)
    assert len(list(fresh)) == 8


def test_resume_with_persistent_workers_in_a_later_epoch(slide_folder: Path) -> None:
    from torchdata.stateful_dataloader import StatefulDataLoader

    def make() -> bst.BigSmallDataset:
        return bst.BigSmallDataset(
            bst.Dataset.from_folder(slide_folder, pattern="*.tiff"), bst.RandomRegionLoader(size=256),
            bst.RandomCropCollector(64), buffer_size=1, smallchunks_per_bigchunk=4, samples_per_epoch=16,
        )  # fmt: skip

    ds = make()
    loader = StatefulDataLoader(ds, batch_size=4, num_workers=2, persistent_workers=True,
                                multiprocessing_context="fork")  # fmt: skip
    assert len(list(loader)) == 4
    ds.set_epoch(1)
    it = iter(loader)
    taken = [next(it)["x"].tolist()]
    state = loader.state_dict()
    rest = [b["x"].tolist() for b in it]
    del it, loader
    again = make()
    resumed = StatefulDataLoader(again, batch_size=4, num_workers=2, multiprocessing_context="fork")
    resumed.load_state_dict(state)
    assert [b["x"].tolist() for b in resumed] == rest
    assert len(taken) + len(rest) == 4


def test_sliding_state_of_another_grid_is_refused(slide_folder: Path) -> None:
    """Same number of windows, another order (block size): resuming would repeat or lose windows."""
    dataset = bst.Dataset.from_folder(slide_folder, pattern="*.tiff")
    a = bst.SlidingWindowDataset(dataset, patch_size=128, block_size=512)
    b = bst.SlidingWindowDataset(dataset, patch_size=128, block_size=1024)
    assert a.total_windows == b.total_windows
    it = iter(a)
    next(it)
    b.load_state_dict(a.state_dict())
    with pytest.raises(bst.ConfigError, match="layout"):
        next(iter(b))
