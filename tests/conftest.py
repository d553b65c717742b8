"""Shared fixtures: synthetic pyramidal slides written by the package's own writer, and the real
slides of ``../shared/slides`` (override with ``BIGSMALL_SHARED_SLIDES``)."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest

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
