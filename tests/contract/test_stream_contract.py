"""The DataLoader contract every stream of the package passes (in the spirit of torchvision's
``DatasetTestCase`` and torchdata's save/load-state checks).

Streams (``contract_streams.CASES``): BigSmallDataset per-sample and batched, SlidingWindowDataset
per-sample and batched, and the stream of PyDmed's ``LightDL`` (endless). Each is run for one epoch
with ``num_workers`` 0, 2 (fork) and 2 (spawn), ``on_error`` "raise" (clean slides) and "skip" (plus
one slide whose central tiles do not decode); one run checks several properties at once, and runs
are shared between tests (:class:`Runner`), so the suite stays small:

- ``len()`` and ``len(DataLoader)`` are what one epoch yields; exact sample counts; every sliding
  window exactly once (all of them, but those touching the damaged tiles under "skip");
- pixels equal the slide at the reported coordinates;
- the same seed gives the same stream (fork and spawn alike), another seed another one;
- a ``StatefulDataLoader`` state taken mid-epoch, resumed in a fresh process, continues the stream
  as if it had never stopped (also after a skipped slide);
- errors raised in workers arrive as the package's types;
- no thread, file descriptor or shared-memory entry is left once the loader is deleted, also after
  a worker was killed with SIGKILL (bounded by the DataLoader's ``timeout``: an error, never a hang).
"""

from __future__ import annotations

import gc
import logging
import math
import multiprocessing.resource_tracker
import os
import pickle
import re
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import bigsmall_torch as bst

sys.path.insert(0, str(Path(__file__).resolve().parent))
import contract_streams as cs

from conftest import run_process_group

pytest.importorskip(
    "torchdata.stateful_dataloader", reason="needs torchdata>=0.8 (the [test] extra)"
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

CHILD = Path(__file__).resolve().parents[1] / "scripts" / "contract_resume_child.py"
TIMEOUT = 60  # DataLoader(timeout=...) of every run with workers: an error instead of a hang
# How long resources may take to go after a loader is deleted: a DataLoader iterator that raised a
# worker's error sits in a reference cycle (the traceback), so gc shuts it down, and torch then waits
# 5 s per worker before terminating workers that never got its stop signal.
RELEASE_S = 15

CONFIGS: dict[str, tuple[int, str | None]] = {
    "w0": (0, None),
    "w2-fork": (2, "fork"),
    "w2-spawn": (2, "spawn"),
}


def _matrix() -> list[Any]:
    cells = []
    for case in cs.CASES:
        for config in CONFIGS:
            for on_error in ("raise", "skip"):
                if on_error == "skip" and (config == "w2-spawn" or case == "lightdl"):
                    continue  # spawn runs are costly; LightDL has no on_error
                cells.append(pytest.param(case, config, on_error, id=f"{case}-{config}-{on_error}"))
    return cells


CASE_ON_ERROR = [
    pytest.param(case, on_error, id=f"{case}-{on_error}")
    for case in cs.CASES
    for on_error in ("raise", "skip")
    if not (case == "lightdl" and on_error == "skip")  # LightDL has no on_error
]


# -- resources a loader must give back -------------------------------------------------------------

_SHM_PID = re.compile(r"^(?:bigsmall-board-|bigsmall-report-|torch_)(\d+)")


@dataclass
class Resources:
    threads: set[threading.Thread]
    fds: dict[str, str]  # open file descriptor -> what it points to
    shm: set[str]

    @classmethod
    def now(cls, pids: set[int]) -> Resources:
        """Live threads named ``bigsmall*``, this process's open file descriptors, and this user's
        ``/dev/shm`` entries named ``bigsmall*`` / ``torch_*`` created by one of ``pids`` (other
        engineers' tests create such entries too, under their own pids)."""
        threads = {
            t for t in threading.enumerate() if t.name.startswith("bigsmall") and t.is_alive()
        }
        shm = set()
        for entry in os.scandir("/dev/shm"):
            if not entry.name.startswith(("bigsmall", "torch_")):
                continue
            match = _SHM_PID.match(entry.name)
            try:
                mine = entry.stat(follow_symlinks=False).st_uid == os.getuid()
            except FileNotFoundError:
                continue
            if mine and (match is None or int(match[1]) in pids):
                shm.add(entry.name)
        fds = {}
        for fd in os.listdir("/proc/self/fd"):
            try:
                fds[fd] = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:  # the descriptor listdir itself used
                continue
        return cls(threads, fds, shm)

    def left_over(self, pids: set[int]) -> dict[str, Any]:
        """What is still held compared with ``self`` (waiting up to RELEASE_S): {} when nothing."""
        deadline = time.monotonic() + RELEASE_S
        while True:
            gc.collect()
            now = Resources.now(pids)
            leaks: dict[str, Any] = {}
            if now.threads - self.threads:
                leaks["threads"] = sorted(t.name for t in now.threads - self.threads)
            if len(now.fds) > len(self.fds):
                leaks["fds"] = sorted(v for k, v in now.fds.items() if self.fds.get(k) != v)
            if now.shm - self.shm:
                leaks["shm"] = sorted(now.shm - self.shm)
            if not leaks or time.monotonic() > deadline:
                return leaks
            time.sleep(0.1)


# -- one epoch of a stream -------------------------------------------------------------------------


@dataclass
class Run:
    records: list[tuple[Any, ...]] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)  # samples per DataLoader output
    length: int | None = None  # len(dataset); None: TypeError
    loader_length: int | None = None  # len(DataLoader); None: TypeError
    error: type[BaseException] | None = None
    message: str = ""
    leaks: dict[str, Any] = field(default_factory=dict)

    @property
    def patients(self) -> set[Any]:
        return {r[0] for r in self.records}

    @property
    def cells(self) -> list[tuple[Any, int, int]]:
        return [(r[0], r[1], r[2]) for r in self.records]


def _length(sized: Any) -> int | None:
    try:
        return len(sized)
    except TypeError:
        return None


def run_epoch(
    spec: cs.Spec,
    num_workers: int,
    context: str | None = None,
    *,
    delete: Path | None = None,
    kill_after: int | None = None,
    **build_overrides: Any,
) -> Run:
    """One epoch of ``spec`` through a DataLoader; then the dataset, loader and iterator are
    deleted and what they leave behind is measured. ``delete``: a file removed after construction;
    ``kill_after``: SIGKILL worker 0 once this many batches arrived. An error ends the epoch and
    is kept as its type and message (not the exception: its traceback would keep the iterator)."""
    if context == "spawn":  # Python's resource tracker: started once per process, kept by design
        multiprocessing.resource_tracker.ensure_running()
    pids = {os.getpid()}
    before = Resources.now(pids)
    run = Run()
    ds = cs.build(spec, num_workers, **build_overrides)
    if delete is not None:
        delete.unlink()
    run.length = _length(ds)
    extra = {"timeout": TIMEOUT} if num_workers else {}
    loader = cs.make_loader(spec, ds, num_workers, context, **extra)
    run.loader_length = _length(loader)
    it, batch = iter(loader), None
    try:
        for index, batch in enumerate(it):
            if num_workers:
                pids.update(w.pid for w in it._workers)  # type: ignore[attr-defined]
            if spec.endless and index >= cs.LIGHT_BATCHES:
                break
            run.records += cs.records(spec, batch)
            run.sizes.append(cs.batch_size_of(spec, batch))
            if kill_after is not None and index + 1 == kill_after:
                os.kill(it._workers[0].pid, signal.SIGKILL)  # type: ignore[attr-defined]
    except Exception as exc:
        run.error, run.message = type(exc), str(exc)
        # torch's ExceptionWrapper.reraise keeps the exception in a frame of its own traceback: a
        # cycle holding the iterator, which only a later gc would shut down (waiting out a 5 s join
        # per worker). Without the tracebacks the iterator goes with the `del` below.
        seen: BaseException | None = exc
        while seen is not None:
            seen.__traceback__ = None
            seen = seen.__cause__ or seen.__context__
    # A worker killed while torch's DataLoader shuts down makes torch's SIGCHLD handler raise inside
    # the iterator's __del__; pytest's unraisable-exception hook would keep that exception, and with
    # its traceback the iterator and its pipes, until the test ends. Keep only its type here, so
    # what is measured is what the package and torch leave, not what pytest holds on to.
    hook, sys.unraisablehook = sys.unraisablehook, _note_unraisable
    try:
        del it, loader, ds, batch
        run.leaks = before.left_over(pids)
    finally:
        sys.unraisablehook = hook
    return run


def _rings_unmapped(wait_s: float = RELEASE_S) -> bool:
    from bigsmall_torch._engine import batch_ring

    deadline = time.monotonic() + wait_s
    while batch_ring._MAPPED and time.monotonic() < deadline:
        gc.collect()
        time.sleep(0.1)
    return not batch_ring._MAPPED


def _note_unraisable(unraisable: Any) -> None:
    logging.getLogger(__name__).debug(
        "ignored in %r: %s", unraisable.object, unraisable.exc_type.__name__
    )


class Runner:
    """Epochs shared by the tests of this module (each run once, on first use)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.runs: dict[Any, Run] = {}

    def spec(self, case: str, on_error: str = "raise", **changes: Any) -> cs.Spec:
        return cs.Spec(
            case, str(self.folder), on_error=on_error, broken=on_error == "skip", **changes
        )

    def epoch(self, spec: cs.Spec, config: str, repeat: int = 0) -> Run:
        key = (spec, config, repeat)
        if key not in self.runs:
            self.runs[key] = run_epoch(spec, *CONFIGS[config])
        return self.runs[key]


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return cs.write_slides(tmp_path_factory.mktemp("contract-slides"))


@pytest.fixture(scope="module")
def runner(slides: Path) -> Runner:
    return Runner(slides)


# -- one epoch: lengths, counts, exactly once, pixels, nothing left behind -------------------------


@pytest.mark.parametrize(("case", "config", "on_error"), _matrix())
def test_one_epoch(
    runner: Runner, case: str, config: str, on_error: str, annotated: bool = False
) -> None:
    spec = runner.spec(case, on_error, annotated=annotated)
    run = runner.epoch(spec, config)
    assert run.error is None, f"{run.error.__name__ if run.error else ''}: {run.message}"
    assert run.leaks == {}, "left behind after the loader was deleted"
    assert len(run.records) == sum(run.sizes)
    if spec.endless:
        assert run.length is None and run.loader_length is None  # endless: no len()
        assert run.sizes == [cs.BATCH] * cs.LIGHT_BATCHES
        assert len(run.patients) >= 2
    elif spec.sliding:
        cells, windows, lost = run.cells, cs.all_windows(spec), cs.lost_windows(spec)
        assert len(cells) == len(set(cells)), "a window came twice"
        assert set(cells) == windows - lost  # all of them, once; only those touching bad tiles lost
        unit = cs.WINDOW_BATCH
        assert run.length == (len(windows) if not spec.batched else math.ceil(len(windows) / unit))
        assert run.loader_length == math.ceil(len(windows) / unit)
        if lost:  # lost windows are not yielded: batches of their worker may come out short
            assert len(run.sizes) <= run.loader_length
        elif spec.annotated and not spec.batched:  # per-sample, a window count no batch divides:
            # the DataLoader batches each worker's share apart, so each may end in a short batch
            assert run.loader_length <= len(run.sizes) <= run.loader_length + 1
        else:
            assert len(run.sizes) == run.loader_length
    else:
        expected = cs.SAMPLES if not spec.batched else cs.SAMPLES // cs.BATCH
        assert run.length == expected
        assert run.loader_length == len(run.sizes) == cs.SAMPLES // cs.BATCH
        assert run.sizes == [cs.BATCH] * (cs.SAMPLES // cs.BATCH)
        assert cs.BROKEN_ID not in run.patients
    for record in run.records[:: max(1, len(run.records) // 10)]:
        assert cs.pixels_of(spec, record) == cs.pixel_crc(spec, record), (
            f"pixels differ from the slide at {record}"
        )
        if spec.annotated:
            assert cs.labels_of(spec, record) == record[-2:], f"labels differ at {record}"


# -- annotated streams: the same contract, plus labels at the reported coordinates -----------------

ANNOTATED = [
    pytest.param(case, config, on_error, id=f"{case}-{config}-{on_error}")
    for case in ("bigsmall", "bigsmall-batched", "sliding", "sliding-batched")
    for config, on_error in (("w2-fork", "raise"), ("w2-fork", "skip"))  # workers: the hard case
]


@pytest.mark.parametrize(("case", "config", "on_error"), ANNOTATED)
def test_one_epoch_annotated(runner: Runner, case: str, config: str, on_error: str) -> None:
    test_one_epoch(runner, case, config, on_error, annotated=True)
    spec = runner.spec(case, on_error, annotated=True)
    run = runner.epoch(spec, config)
    targets = {r[-2] for r in run.records}
    assert targets >= {0, 1}, "both classes are sampled"
    # The same seed gives the same stream; batched mode gives the per-sample stream.
    assert runner.epoch(spec, config, repeat=1).records == run.records
    other = runner.spec(case.removesuffix("-batched") if spec.batched else f"{case}-batched",
                        on_error, annotated=True)  # fmt: skip
    if spec.sliding:  # the same windows, labels and pixels (workers' shares are cut by batches)
        assert sorted(runner.epoch(other, config).records) == sorted(run.records)
    else:
        assert runner.epoch(other, config).records == run.records


# -- same seed, same stream ------------------------------------------------------------------------


@pytest.mark.parametrize(("case", "on_error"), CASE_ON_ERROR)
def test_same_seed_same_stream(runner: Runner, case: str, on_error: str) -> None:
    spec = runner.spec(case, on_error)
    fork = runner.epoch(spec, "w2-fork")
    assert fork.records
    if on_error == "raise":  # two runs: fork and spawn workers give the same stream
        assert runner.epoch(spec, "w2-spawn").records == fork.records
        assert runner.epoch(spec, "w0", repeat=1).records == runner.epoch(spec, "w0").records
    else:  # after a skipped slide too
        assert runner.epoch(spec, "w2-fork", repeat=1).records == fork.records
    if case in cs.TRAINING:  # another seed, another stream
        other = runner.epoch(spec.but(seed=1), "w2-fork")
        assert not other.error and set(other.records) != set(fork.records)
    else:  # sliding windows: the same windows and pixels whatever the workers
        assert sorted(runner.epoch(spec, "w0").records) == sorted(fork.records)


@pytest.mark.parametrize("on_error", ["raise", "skip"])
@pytest.mark.parametrize("config", ["w0", "w2-fork"])
@pytest.mark.parametrize("front", ["bigsmall", "sliding"])
def test_batched_mode_gives_the_per_sample_stream(
    runner: Runner, front: str, config: str, on_error: str
) -> None:
    single = runner.epoch(runner.spec(front, on_error), config)
    batched = runner.epoch(runner.spec(f"{front}-batched", on_error), config)
    assert single.records and batched.records == single.records


# -- resume in a fresh process ---------------------------------------------------------------------

RESUME = [
    pytest.param(case, config, on_error, False, id=f"{case}-{config}-{on_error}")
    for case in cs.CASES
    for config in ("w0", "w2-fork")
    for on_error in ("raise", "skip")
    if not (case == "lightdl" and on_error == "skip")
] + [
    pytest.param(case, "w2-fork", on_error, True, id=f"{case}-w2-fork-{on_error}-annotated")
    for case, on_error in (
        ("bigsmall", "skip"),
        ("bigsmall-batched", "raise"),
        ("sliding", "raise"),
        ("sliding-batched", "skip"),
    )
]


@pytest.fixture(scope="module")
def resumed(runner: Runner, tmp_path_factory: pytest.TempPathFactory) -> dict[Any, Any]:
    """For every RESUME cell: (uninterrupted records, records before the checkpoint, records of
    the fresh process that resumed from it). The checkpoints are taken here with torchdata's
    StatefulDataLoader, half-way through the epoch; one child process resumes them all."""
    from torchdata.stateful_dataloader import StatefulDataLoader  # noqa: F401 (required)

    tmp = tmp_path_factory.mktemp("contract-resume")
    jobs, cells = [], []
    for param in RESUME:
        case, config, on_error, annotated = param.values
        spec = runner.spec(case, on_error, annotated=annotated)
        full = runner.epoch(spec, config)
        num_workers, context = CONFIGS[config]
        stop = len(full.sizes) // 2
        loader = cs.make_loader(
            spec, cs.build(spec, num_workers), num_workers, context, stateful=True
        )
        it, prefix = iter(loader), []
        for _ in range(stop):
            prefix += cs.records(spec, next(it))
        state = tmp / f"{case}-{config}-{on_error}-{annotated}.pkl"
        state.write_bytes(pickle.dumps(loader.state_dict()))
        del it, loader  # the job is "killed": its workers go away
        take = cs.LIGHT_BATCHES - stop if spec.endless else None
        jobs.append({"spec": spec, "num_workers": num_workers, "state": str(state), "take": take})
        cells.append(((case, config, on_error, annotated), full.records, prefix))
    (tmp / "jobs.pkl").write_bytes(pickle.dumps(jobs))
    code, stderr = run_process_group(
        [sys.executable, "-W", "ignore", str(CHILD), str(tmp / "jobs.pkl"), str(tmp / "out.pkl")],
        timeout=240,
    )
    assert code == 0, stderr[-4000:]
    rests = pickle.loads((tmp / "out.pkl").read_bytes())
    return {
        key: (full, prefix, rest) for (key, full, prefix), rest in zip(cells, rests, strict=True)
    }


@pytest.mark.parametrize(("case", "config", "on_error", "annotated"), RESUME)
def test_resume_in_a_fresh_process(
    resumed: dict[Any, Any], case: str, config: str, on_error: str, annotated: bool
) -> None:
    full, prefix, rest = resumed[(case, config, on_error, annotated)]
    assert 0 < len(prefix) < len(full)
    assert prefix + rest == full


# -- errors in workers -----------------------------------------------------------------------------


@pytest.fixture
def copied(slides: Path, tmp_path: Path) -> Path:
    """A copy of the slides this test may damage."""
    shutil.copytree(slides / "clean", tmp_path / "clean")
    shutil.copy(slides / "broken.tiff", tmp_path / "broken.tiff")
    return tmp_path


@pytest.mark.parametrize(("case", "on_error"), CASE_ON_ERROR)
def test_slide_deleted_after_construction(copied: Path, case: str, on_error: str) -> None:
    spec = cs.Spec(case, str(copied), on_error=on_error)
    victim = cs.clean_paths(copied)[1]
    run = run_epoch(spec, 2, "fork", delete=victim)
    assert run.leaks == {}, "left behind after the loader was deleted"
    if on_error == "raise":  # raised in a worker, caught as the package's type in this process
        assert run.error is not None and issubclass(run.error, bst.SlideError), (
            run.error,
            run.message,
        )
        assert victim.name in run.message
        return
    assert run.error is None, run.message
    assert victim.stem not in run.patients
    if spec.sliding:
        cells = run.cells
        assert len(cells) == len(set(cells))
        assert set(cells) == {c for c in cs.all_windows(spec) if c[0] != victim.stem}
    else:
        assert sum(run.sizes) == cs.SAMPLES


@pytest.mark.parametrize("case", ["bigsmall-batched", "lightdl"])
def test_broken_extractor_contract_is_an_extractor_error(runner: Runner, case: str) -> None:
    spec = runner.spec(case)
    override = {"collector": cs.WrongTypeCrops(64) if case != "lightdl" else cs.WrongTypeCollector}
    run = run_epoch(spec, 2, "fork", **override)
    assert run.error is not None and issubclass(run.error, bst.ExtractorError), (
        run.error,
        run.message,
    )
    assert run.leaks == {}


# -- a worker killed with SIGKILL ------------------------------------------------------------------


@pytest.mark.parametrize("case", cs.CASES)
def test_killed_worker_is_an_error_not_a_hang(runner: Runner, case: str) -> None:
    run = run_epoch(runner.spec(case), 2, "fork", kill_after=1)
    assert run.error is not None, "the epoch ended normally after a worker was killed"
    assert "timed out" not in run.message, run.message  # found by the loader, not by its timeout
    # torch's own report, or, when the main process was fetching a tensor's shared memory from
    # the worker as it died (the file_descriptor sharing strategy), the broken connection or pipe.
    assert re.search(r"worker.*(killed|exited unexpectedly)", run.message) or (
        run.error is not None and issubclass(run.error, (ConnectionError, EOFError))
    ), (run.error, run.message)
    # What the package owns is gone: its threads, its files, and the batch slots it mapped (the
    # reaper unmaps a dead worker's ring). A worker killed in the middle of sending a tensor can
    # leave that transfer's shared memory (torch's, created by the dead worker and never handed
    # over), so descriptors and torch_* segments are not asserted here; test_one_epoch and
    # test_slide_deleted_after_construction assert them where no worker dies mid-transfer.
    assert "threads" not in run.leaks, run.leaks
    assert not [name for name in run.leaks.get("shm", []) if name.startswith("bigsmall")], run.leaks
    assert _rings_unmapped(), "the killed worker's batch slots are still mapped"
