"""The message board: unpicklable values refused without harm, no files left behind (normal exit,
SIGKILL), and many rapid messages and weights reaching persistent workers."""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader

import bigsmall_torch as bst
from bigsmall_torch._engine.messages import MessageBoard, _start_time
from bigsmall_torch.chunks import BigChunk, ChunkContext, SmallChunk
from bigsmall_torch.synthetic import synthesize_slides


def _board_files(board: MessageBoard) -> list[Path]:
    """The board's file and any temporary file of it."""
    return sorted(board.path.parent.glob(f"{board.path.stem}*"))


def _temporary_files(board: MessageBoard) -> list[Path]:
    return sorted(board.path.parent.glob(f"{board.path.stem}*.tmp"))


# --- an unpicklable value -------------------------------------------------------------------------


def test_unpicklable_message_is_refused_and_does_not_poison_the_board() -> None:
    board = MessageBoard()
    board.send({"a": 1})
    version = board.version
    with pytest.raises(bst.ConfigError, match=r"patient id 'b' is a lock.*cannot be pickled"):
        board.send({"b": threading.Lock()})
    assert board.version == version  # nothing published
    assert _temporary_files(board) == []
    assert board.message("b") is None
    board.send({"c": 3})  # a later message arrives
    board.set_weights({"a": 0.5})  # and weights work
    reader = MessageBoard.__new__(MessageBoard)  # what a spawned worker gets
    reader.__setstate__(board.__getstate__())
    reader._messages, reader._weights, reader._seen = {}, {}, 0
    assert (reader.message("a"), reader.message("b"), reader.message("c")) == (1, None, 3)
    assert reader.weights() == {"a": 0.5}
    assert _temporary_files(board) == []


def test_unpicklable_weight_is_refused_too() -> None:
    board = MessageBoard()
    with pytest.raises(
        bst.ConfigError, match=r"set_weights: the value for patient id 7 is a function"
    ):
        board.set_weights({7: lambda: 1.0})  # type: ignore[dict-item]
    board.set_weights({7: 2.0})
    assert board.weights() == {7: 2.0}
    assert _temporary_files(board) == []


def test_failed_write_leaves_no_temporary_file(monkeypatch: pytest.MonkeyPatch) -> None:
    board = MessageBoard()

    def refuse(src: Any, dst: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(OSError, match="No space left"):
        board.send({"a": 1})
    monkeypatch.undo()
    assert _board_files(board) == []
    assert board.message("a") is None
    board.send({"a": 2})
    assert board.message("a") == 2


# --- no files left behind -------------------------------------------------------------------------

_CHILD = """
import sys, time
import bigsmall_torch as bst
from bigsmall_torch.synthetic import synthesize_slides
folder = sys.argv[1]
synthesize_slides(folder, n=1, width=512, height=512, tile_size=256, tissue="full")
ds = bst.BigSmallDataset(bst.Dataset.from_folder(folder, pattern="*.tiff"), bst.RandomRegionLoader(256),
                         bst.RandomCropCollector(32), buffer_size=1, smallchunks_per_bigchunk=2)
ds.send_message("synthetic_000", "hello")
print(ds.board.path, flush=True)
if sys.argv[2] == "wait":
    time.sleep(600)
"""


def _start_child(folder: Path, mode: str) -> tuple[subprocess.Popen[str], Path]:
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(folder), mode], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    assert line, f"the child process failed (exit code {proc.poll()})"
    return proc, Path(line)


def test_normal_exit_leaves_no_board_file(tmp_path: Path) -> None:
    proc, path = _start_child(tmp_path, "exit")
    assert proc.wait(timeout=120) == 0
    assert str(os.getpid()) not in path.name
    assert not list(path.parent.glob(f"{path.stem}*"))


def test_board_of_a_killed_process_is_removed_by_the_next_board(tmp_path: Path) -> None:
    proc, path = _start_child(tmp_path, "wait")
    try:
        assert path.exists() and f"-{proc.pid}-" in path.name
        MessageBoard()  # the owner still runs: its file stays
        assert path.exists()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    assert path.exists()  # SIGKILL: no clean-up ran
    MessageBoard()
    assert not path.exists()


def test_stale_clean_up_spares_live_processes(tmp_path: Path) -> None:
    folder = MessageBoard().path.parent
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        live = folder / f"bigsmall-board-{sleeper.pid}-{_start_time(sleeper.pid)}-abc123.pkl"
        reused = folder / f"bigsmall-board-{sleeper.pid}-{_start_time(sleeper.pid) + 1}-abc124.pkl"
        unknown_start = folder / f"bigsmall-board-{sleeper.pid}-0-abc125.pkl"
        mine = MessageBoard()
        mine.send({"x": 1})
        for path in (live, reused, unknown_start):
            path.write_bytes(b"")
        MessageBoard()
        assert live.exists() and unknown_start.exists() and mine.path.exists()
        assert not reused.exists()  # the pid now names another process than the one that wrote it
    finally:
        sleeper.kill()
        sleeper.wait(timeout=60)
        live.unlink(missing_ok=True)
        unknown_start.unlink(missing_ok=True)


# --- many rapid messages with persistent workers --------------------------------------------------


class BoardCollector(bst.RandomCropCollector):
    """Records the worker, the patient's message and the patient's weight in every sample."""

    def extract_smallchunk(
        self, call_count: int, bigchunk: BigChunk, ctx: ChunkContext
    ) -> SmallChunk | None:
        small = super().extract_smallchunk(call_count, bigchunk, ctx)
        if small is not None:
            info = torch.utils.data.get_worker_info()
            small.info["worker"] = -1 if info is None else info.id
            small.info["msg"] = -1 if ctx.message is None else int(ctx.message)
            weights = {} if ctx.board is None else ctx.board.weights()
            small.info["weight"] = float(weights.get(ctx.patient_id, -1.0))
        return small


@pytest.fixture(scope="module")
def small_slides(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("small-slides")
    synthesize_slides(folder, n=4, width=512, height=512, tile_size=256, mpp=0.5, tissue="full")
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_rapid_messages_and_weights_reach_persistent_workers(
    small_slides: Path, context: str
) -> None:
    ds = bst.BigSmallDataset(
        bst.Dataset.from_folder(small_slides, pattern="*.tiff"), bst.RandomRegionLoader(256),
        BoardCollector(32), buffer_size=2, smallchunks_per_bigchunk=2,
    )  # fmt: skip
    loader = DataLoader(
        ds, batch_size=4, num_workers=2, persistent_workers=True, multiprocessing_context=context
    )
    it = iter(loader)
    ids = [p.id for p in ds.dataset]
    for _ in range(4):
        next(it)
    for i in range(1000):
        ds.send_message(ids[i % len(ids)], i)
        ds.set_weights({ids[i % len(ids)]: 1.0 + i % 7})
        if i % 100 == 0:
            next(it)  # workers read the board while it is being rewritten
    final_msg = {pid: max(i for i in range(1000) if i % len(ids) == k) for k, pid in enumerate(ids)}
    final_weight = {pid: 1.0 + final_msg[pid] % 7 for pid in ids}
    assert ds.board.weights() == final_weight
    # Batches already prefetched carry older values. A worker sees the board as a whole at some
    # moment of the sending loop, and never an earlier moment after a later one: once a sample showed
    # message m (sent at step m), every later sample of that worker shows, for its own patient, at
    # least the last message sent to that patient up to step m. (A single patient's "final" flag is
    # not monotonic: a board read at step 996 holds the final message of one patient only.)
    residue = {pid: k for k, pid in enumerate(ids)}  # ids[k] is sent at the steps = k mod len(ids)
    horizon: dict[int, int] = {}
    current: dict[int, bool] = {}
    for n in range(60):
        batch = next(it)
        for worker, pid, msg, weight in zip(
            batch["worker"], batch["patient_id"], batch["msg"], batch["weight"], strict=True
        ):
            w, m = int(worker), int(msg)
            seen = horizon.get(w, -1)
            k = residue[pid]
            floor = seen - (seen - k) % len(ids) if seen >= k else -1
            assert m >= floor, (
                f"worker {w} went back to an older board: message {m} for {pid!r} after a sample "
                f"showing step {seen}, when {pid!r} had been sent {floor}"
            )
            horizon[w] = max(seen, m)
            current[w] = m == final_msg[pid] and float(weight) == final_weight[pid]
        if len(current) == 2 and all(current.values()) and n > 20:
            break
    assert current == {0: True, 1: True}
    del it, loader
    gc.collect()
    assert _temporary_files(ds.board) == []
    path = ds.board.path
    del ds
    gc.collect()
    assert not list(path.parent.glob(f"{path.stem}*"))
