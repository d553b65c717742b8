"""Shared fixtures: synthetic pyramidal slides written by the package's own writer, and the real
slides of ``../shared/slides`` (override with ``BIGSMALL_SHARED_SLIDES``)."""

from __future__ import annotations

import os
import signal
import subprocess
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from torch.utils.data import dataloader as _dataloader

from bigsmall_torch.synthetic import SyntheticSlideInfo, synthesize_slides

REPO = Path(__file__).resolve().parents[1]
SHARED_SLIDES = Path(os.environ.get("BIGSMALL_SHARED_SLIDES", REPO.parent / "shared" / "slides"))


@pytest.fixture(scope="session")
def slide_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four 3072x2560 pyramidal JPEG slides (tiles 256, levels 1x/2x/4x, mpp 0.5)."""
    folder = tmp_path_factory.mktemp("slides")
    synthesize_slides(folder, n=4, width=3072, height=2560, tile_size=256, mpp=0.5, tissue="full")
    return folder


@pytest.fixture(scope="session")
def slide_infos(slide_folder: Path) -> list[SyntheticSlideInfo]:
    return synthesize_slides(
        slide_folder, n=4, width=3072, height=2560, tile_size=256, mpp=0.5, tissue="full"
    )


@pytest.fixture(scope="session")
def shared_slides() -> Path:
    if not (SHARED_SLIDES / "cmu-1-small-region.svs").exists():
        pytest.skip(f"real slides not found in {SHARED_SLIDES} (set BIGSMALL_SHARED_SLIDES)")
    return SHARED_SLIDES


@pytest.fixture(scope="session")
def cmu1(shared_slides: Path) -> Path:
    return shared_slides / "cmu-1-small-region.svs"


@pytest.fixture(scope="session")
def broken_svs(shared_slides: Path) -> Path:
    return shared_slides / "broken.svs"


def run_process_group(command: Sequence[str], *, timeout: float = 300) -> tuple[int, str]:
    """Run ``command`` in its own process group and return (exit code, stderr). On a timeout the
    whole group is killed (a multi-process launcher's children too) and TimeoutExpired is raised."""
    proc = subprocess.Popen(list(command), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip
    try:
        _, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return proc.returncode, stderr


# -- DataLoader iterators left in a reference cycle -----------------------------------------------
#
# After a worker raised, torch's ExceptionWrapper.reraise leaves the exception in a frame of its own
# traceback: a cycle that holds the DataLoader iterator (through pytest.raises' ExceptionInfo, for
# one) until a later garbage collection, whose shutdown of it then waits out a 5 s join per worker,
# in whichever test it happens to run. Each test's iterators are shut down when it ends instead.

_LIVE_ITERATORS: weakref.WeakSet[_dataloader._MultiProcessingDataLoaderIter] = weakref.WeakSet()
_original_init = _dataloader._MultiProcessingDataLoaderIter.__init__


def _tracked_init(self: _dataloader._MultiProcessingDataLoaderIter, *args: object, **kwargs: object) -> None:
    _original_init(self, *args, **kwargs)
    _LIVE_ITERATORS.add(self)  # once whole: a failed __init__ leaves nothing to shut down


_dataloader._MultiProcessingDataLoaderIter.__init__ = _tracked_init  # type: ignore[method-assign]


@pytest.fixture(autouse=True)
def _shut_down_loader_workers() -> Iterator[None]:
    yield
    for iterator in list(_LIVE_ITERATORS):
        iterator._shutdown_workers()
