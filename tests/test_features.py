"""Whole-cohort feature extraction: rows equal the model on the pixels at their coordinates, the
grid exactly once, resume, crashes, ranks, and the bags read back for MIL."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import bigsmall_torch as bst
from bigsmall_torch.features import deal_by_size, feature_path, is_complete
from bigsmall_torch.io.resolution import read_at
from conftest import run_process_group

h5py = pytest.importorskip("h5py", reason="needs h5py (the [features] extra)")


SCRIPTS = Path(__file__).resolve().parent / "scripts"


class Means(torch.nn.Module):
    """Per-channel means of the uint8 batch: a model whose every row can be checked."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.float().mean((2, 3))


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bst.Dataset]:
    folder = tmp_path_factory.mktemp("feature-slides")
    bst.synthetic.synthesize_slides(folder, n=3, width=1536, height=1024, tile_size=256, tissue="blobs")
    return folder, bst.Dataset.from_folder(folder, pattern="*.tiff")


def _summary_rows(out: Path) -> list[dict[str, str]]:
    with open(out / "summary.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize(
    ("resolution", "tissue_only"),
    [({"level": 0}, False), ({"level": 1}, True), ({"mpp": 0.8}, False)],
    ids=["level-0-all", "level-1-tissue", "mpp-0.8-resampled"],
)
def test_rows_equal_the_model_on_the_pixels_at_their_coordinates(
    cohort: tuple[Path, bst.Dataset], tmp_path: Path, resolution: dict[str, Any], tissue_only: bool
) -> None:
    _, slides = cohort
    summary = bst.extract_features(slides, Means(), tmp_path, patch_size=96, stride=80, dtype="float32",
                                   tissue_only=tissue_only, num_workers=2, batch_size=16, progress=False,
                                   **resolution)  # fmt: skip
    assert [s.status for s in summary.slides] == ["written"] * 3
    windows = bst.SlidingWindowDataset(slides, 96, 80, tissue_only=tissue_only, **resolution)
    for patient in slides.patients:
        bag = bst.read_bag(feature_path(tmp_path, patient.id))
        grid = windows.grid(patient.id)
        # N equals the grid (every window, or the tissue windows), coordinates unique, row by row.
        assert len(bag["features"]) == len(bag["coords"]) == grid.count == bag["attrs"]["windows"]
        assert len({tuple(c) for c in bag["coords"]}) == grid.count
        cells = [(r, c) for r, c in np.argwhere(grid.include)]
        assert [tuple(xy) for xy in bag["coords"]] == [grid.level0(r, c) for r, c in cells]
        assert bag["features"].dtype == np.float32 and bag["features"].shape[1] == 3
        # Each row is the model on what the slide holds at its coordinates.
        reader = bst.open_slide(patient.record("wsi").path)
        try:
            for i in range(0, grid.count, max(1, grid.count // 7)):
                r, c = cells[i]
                x, y = int(grid.xs[c]), int(grid.ys[r])
                pixels = read_at(reader, grid.choice, x, y, 96, 96)
                # Resampled: the block is resized as a whole, a re-read window alone (its edge
                # pixels interpolate other neighbours), so the means agree to a fraction of a level.
                atol = 0.25 if grid.choice.resampled else 1e-3
                np.testing.assert_allclose(bag["features"][i], pixels.reshape(-1, 3).mean(0), atol=atol)
        finally:
            reader.close()
        attrs = bag["attrs"]
        assert attrs["patch_size"] == [96, 96] and attrs["stride"] == [80, 80]
        assert attrs["model"] == "Means" and attrs["bigsmall_torch_version"] == bst.__version__
        assert attrs["level"] == grid.choice.level and attrs["patient_id"] == patient.id
    rows = _summary_rows(tmp_path)
    assert [r["id"] for r in rows] == [p.id for p in slides.patients]
    assert all(r["status"] == "written" and int(r["windows"]) > 0 for r in rows)


def test_default_storage_is_float16_and_a_timm_name_builds_its_encoder(cohort: tuple[Path, bst.Dataset], tmp_path: Path) -> None:
    pytest.importorskip("timm", reason="needs timm (the [features] extra)")
    _, slides = cohort
    one = bst.Dataset("one", slides.patients[:1])
    summary = bst.extract_features(one, "resnet18", tmp_path, pretrained=False, patch_size=128, level=1,
                                   tissue_only=False, num_workers=0, progress=False)  # fmt: skip
    bag = bst.read_bag(summary.slides[0].path)
    assert bag["features"].dtype == np.float16 and bag["features"].shape[1] == 512
    assert bag["attrs"]["model"] == "resnet18" and np.isfinite(bag["features"]).all()
    _, preprocess = bst.timm_encoder("resnet18", pretrained=False)
    x = preprocess(torch.full((2, 3, 128, 128), 255, dtype=torch.uint8))
    assert x.shape == (2, 3, 224, 224)  # resized to the model's input size
    assert torch.allclose(x[0, :, 0, 0], (1 - preprocess.mean.flatten()) / preprocess.std.flatten())


def test_resume_skips_finished_files_and_redoes_a_deleted_one(cohort: tuple[Path, bst.Dataset], tmp_path: Path) -> None:
    _, slides = cohort
    options: dict[str, Any] = dict(patch_size=128, level=1, num_workers=0, progress=False, tissue_only=False)
    bst.extract_features(slides, Means(), tmp_path, **options)
    paths = [feature_path(tmp_path, p.id) for p in slides.patients]
    stamps = {p: p.stat().st_mtime_ns for p in paths}
    paths[1].unlink()
    summary = bst.extract_features(slides, Means(), tmp_path, **options)
    assert [s.status for s in summary.slides] == ["exists", "written", "exists"]
    assert paths[0].stat().st_mtime_ns == stamps[paths[0]] and paths[2].stat().st_mtime_ns == stamps[paths[2]]
    assert is_complete(paths[1])
    assert [r["status"] for r in _summary_rows(tmp_path)] == ["exists", "written", "exists"]
    again = bst.extract_features(slides, Means(), tmp_path, overwrite=True, **options)
    assert [s.status for s in again.slides] == ["written"] * 3


def test_a_killed_run_leaves_no_finished_looking_file(cohort: tuple[Path, bst.Dataset], tmp_path: Path) -> None:
    folder, slides = cohort
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, str(SCRIPTS / "features_child.py"), str(folder), str(out)],
                            stderr=subprocess.PIPE, start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 120
    try:  # kill it once the first slide is written, while the second is being extracted
        while time.monotonic() < deadline and not list(out.glob("*.h5")):
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            time.sleep(0.05)
        time.sleep(0.5)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    finished = sorted(out.glob("*.h5"))
    assert 1 <= len(finished) < 3
    for path in finished:  # everything named like a bag is whole
        assert is_complete(path)
    assert len(list(out.glob("*.partial"))) <= 1
    summary = bst.extract_features(slides, Means(), out, patch_size=128, level=0, tissue_only=False,
                                   num_workers=0, batch_size=8, dtype="float32", progress=False)  # fmt: skip
    assert sorted(s.status for s in summary.slides).count("exists") == len(finished)
    assert all(is_complete(feature_path(out, p.id)) for p in slides.patients)


def test_broken_slide_follows_on_error(cohort: tuple[Path, bst.Dataset], tmp_path: Path) -> None:
    _, slides = cohort
    broken = tmp_path / "broken.tiff"
    broken.write_bytes(b"not a slide" * 100)
    mixed = bst.Dataset("mixed", [*slides.patients[:1], bst.Patient("broken", {"wsi": bst.Record(broken)})])
    with pytest.raises(bst.SlideError, match=r"broken\.tiff"):
        bst.extract_features(mixed, Means(), tmp_path / "a", patch_size=128, level=1, num_workers=0, progress=False)
    summary = bst.extract_features(mixed, Means(), tmp_path / "b", patch_size=128, level=1, num_workers=0,
                                   progress=False, on_error="skip")  # fmt: skip
    status = {s.patient_id: s.status for s in summary.slides}
    assert status[slides.patients[0].id] == "written" and status["broken"].startswith("failed")
    assert [s.patient_id for s in summary.failed] == ["broken"]
    assert not feature_path(tmp_path / "b", "broken").exists()
    assert "failed" in {r["id"]: r["status"] for r in _summary_rows(tmp_path / "b")}["broken"]
    # A re-run where only the broken slide is left to do still reports both.
    again = bst.extract_features(mixed, Means(), tmp_path / "b", patch_size=128, level=1, num_workers=0,
                                 progress=False, on_error="skip")  # fmt: skip
    status = {s.patient_id: s.status for s in again.slides}
    assert status[slides.patients[0].id] == "exists" and status["broken"].startswith("failed")


def test_bad_arguments(cohort: tuple[Path, bst.Dataset], tmp_path: Path) -> None:
    _, slides = cohort
    with pytest.raises(bst.ConfigError, match="dtype"):
        bst.extract_features(slides, Means(), tmp_path, dtype="int8")
    with pytest.raises(bst.ConfigError, match="model"):
        bst.extract_features(slides, 42, tmp_path)  # type: ignore[arg-type]
    with pytest.raises(bst.ConfigError, match="num_workers"):
        bst.extract_features(slides, Means(), tmp_path, num_workers=-1)
    with pytest.raises(bst.ConfigError, match=r"exactly one|level"):
        bst.extract_features(slides, Means(), tmp_path, level=0, mpp=0.5)
    with pytest.raises(bst.ConfigError, match="memory_format must be"):
        bst.extract_features(slides, Means(), tmp_path, memory_format=torch.preserve_format)


class LayoutMeans(Means):
    """Means, noting whether each batch came channels-last."""

    def __init__(self) -> None:
        super().__init__()
        self.channels_last: list[bool] = []

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.channels_last.append(images.is_contiguous(memory_format=torch.channels_last) and not images.is_contiguous())
        return super().forward(images)


def test_batches_are_channels_last_unless_asked(cohort: tuple[Path, bst.Dataset], tmp_path: Path) -> None:
    _, slides = cohort
    one = bst.Dataset("one", slides.patients[:1])
    bags = {}
    for name, fmt in [("last", torch.channels_last), ("contiguous", torch.contiguous_format)]:
        model = LayoutMeans()
        options: dict[str, Any] = {} if name == "last" else {"memory_format": fmt}
        bst.extract_features(one, model, tmp_path / name, patch_size=128, level=0, tissue_only=False,
                             dtype="float32", num_workers=2, batch_size=16, progress=False, **options)  # fmt: skip
        assert model.channels_last and set(model.channels_last) == {name == "last"}
        bags[name] = bst.read_bag(feature_path(tmp_path / name, one.patients[0].id))
    np.testing.assert_array_equal(bags["last"]["features"], bags["contiguous"]["features"])
    np.testing.assert_array_equal(bags["last"]["coords"], bags["contiguous"]["coords"])


def test_integer_patient_ids(cohort: tuple[Path, bst.Dataset], tmp_path: Path) -> None:
    _, slides = cohort
    numbered = bst.Dataset("numbered", [bst.Patient(i, p.records) for i, p in enumerate(slides.patients)])
    summary = bst.extract_features(numbered, Means(), tmp_path, patch_size=128, level=1, tissue_only=False,
                                   num_workers=1, batch_size=7, progress=False)  # fmt: skip
    assert [(s.patient_id, s.status) for s in summary.slides] == [(0, "written"), (1, "written"), (2, "written")]
    assert sorted(p.name for p in tmp_path.glob("*.h5")) == ["0.h5", "1.h5", "2.h5"]
    assert len(bst.FeatureBagDataset(tmp_path, numbered)) == 3


def test_deal_by_size_balances_ranks() -> None:
    sizes = [100, 90, 10, 10, 10, 80, 5]
    owners = deal_by_size(sizes, 2)
    load = [sum(s for s, o in zip(sizes, owners, strict=True) if o == r) for r in range(2)]
    # Largest first, each to the lighter rank: 100 | 90, 80 | 10, 10, 10, 5 -> 135 against 170.
    assert owners == [0, 1, 0, 0, 0, 1, 0] and load == [135, 170]
    assert max(load) - min(load) <= max(sizes) and deal_by_size(sizes, 2) == owners
    assert deal_by_size(sizes, 1) == [0] * len(sizes)
    assert sorted(set(deal_by_size([1] * 5, 3))) == [0, 1, 2]


def test_torchrun_two_ranks_write_each_slide_once(cohort: tuple[Path, bst.Dataset], tmp_path: Path) -> None:
    folder, slides = cohort
    code, stderr = run_process_group(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(SCRIPTS / "torchrun_features.py"), str(folder), str(tmp_path)],
        timeout=240,
    )  # fmt: skip
    assert code == 0, stderr[-3000:]
    ranks = json.loads((tmp_path / "ranks.json").read_text())
    written = [row[0] for rank_rows in ranks for row in rank_rows if row[2] == "written"]
    assert sorted(written) == sorted(p.id for p in slides.patients)  # each slide once
    assert all(rank_rows for rank_rows in ranks)  # both ranks had work
    rows = _summary_rows(tmp_path)  # rank 0 gathered every rank's rows
    assert sorted(r["id"] for r in rows) == sorted(written) and {r["rank"] for r in rows} == {"0", "1"}
    assert all(is_complete(feature_path(tmp_path, p.id)) for p in slides.patients)


def test_feature_bags_return_what_was_written(cohort: tuple[Path, bst.Dataset], tmp_path: Path) -> None:
    _, slides = cohort
    labelled = bst.Dataset("labelled", [bst.Patient(p.id, p.records, label=i % 2) for i, p in enumerate(slides.patients)])
    bst.extract_features(labelled, Means(), tmp_path, patch_size=128, level=1, tissue_only=False,
                         num_workers=0, dtype="float32", progress=False)  # fmt: skip
    bags = bst.FeatureBagDataset(tmp_path, labelled)
    assert len(bags) == 3
    for i, patient in enumerate(labelled.patients):
        item, stored = bags[i], bst.read_bag(feature_path(tmp_path, patient.id))
        assert item["patient_id"] == patient.id and item["label"] == i % 2
        assert torch.equal(item["features"], torch.from_numpy(stored["features"]))
        assert torch.equal(item["coords"], torch.from_numpy(stored["coords"]))
    batch = next(iter(torch.utils.data.DataLoader(bags, batch_size=1)))
    assert batch["features"].shape[0] == 1 and batch["features"].dtype == torch.float32
    # Subsampling: at most max_instances rows, a subset of the bag, the same for the same epoch.
    sub = bst.FeatureBagDataset(tmp_path, labelled, max_instances=5, seed=1)
    first = sub[0]
    full = {tuple(c) for c in bags[0]["coords"].tolist()}
    assert len(first["features"]) == 5 and {tuple(c) for c in first["coords"].tolist()} <= full
    assert torch.equal(sub[0]["coords"], first["coords"])
    sub.set_epoch(1)
    assert not torch.equal(sub[0]["coords"], first["coords"])
    # A patient without a bag: named at construction, or left out.
    extra = bst.Dataset("extra", [*labelled.patients, bst.Patient("ghost", {"wsi": bst.Record("ghost.tiff")})])
    with pytest.raises(bst.DatasetError, match="ghost"):
        bst.FeatureBagDataset(tmp_path, extra)
    assert bst.FeatureBagDataset(tmp_path, extra, missing="skip").missing == ["ghost"]
