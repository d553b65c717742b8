"""Skipping that keeps the cohort balanced, reported where the main process sees it, and shards
dealt by expected cost.

- a slide that breaks while streaming is skipped; its worker's quota is served by the worker's other
  patients or, when none is left, by the rest of the cohort (never a shortened epoch);
- what workers skipped and how many samples each patient gave reach the main process
  (``ds.skipped``, ``ds.epoch_report()``);
- ``skip_errors`` extends ``on_error="skip"`` to the user's own exceptions;
- ``sharding="cost"`` deals patients so that workers finish together.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import bigsmall_torch as bst
from bigsmall_torch._engine.sharding import IMBALANCE, Topology, assign_shards
from bigsmall_torch.synthetic import write_synthetic_slide

SIDE, TILE, CHUNK, CROP = 512, 128, 256, 64


@pytest.fixture(scope="module")
def masters(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("rebalance-masters")
    out = {}
    for index in range(4):
        path = folder / f"s{index}.tiff"
        write_synthetic_slide(path, width=SIDE, height=SIDE, tile_size=TILE, levels=1, seed=10 + index)
        out[path.stem] = path
    return out


@pytest.fixture(scope="module")
def truth(masters: dict[str, Path]) -> dict[str, np.ndarray]:
    return {name: bst.open_slide(path).read(0, 0, 0, SIDE, SIDE) for name, path in masters.items()}


def _copy(masters: dict[str, Path], folder: Path, names: list[str]) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for name in names:
        target = folder / f"{name}.tiff"
        target.write_bytes(masters[name].read_bytes())
        out[name] = target
    return out


def _truncate(path: Path) -> None:
    """Cut the file in the middle of its tiles: the header still opens, reads fail."""
    os.truncate(path, path.stat().st_size // 2)


def _dataset(paths: dict[str, Path], **kwargs: Any) -> bst.BigSmallDataset:
    patients = [bst.Patient(name, {"wsi": bst.Record(path)}) for name, path in sorted(paths.items())]
    options: dict[str, Any] = dict(
        buffer_size=1, smallchunks_per_bigchunk=4, prefetch=1, samples_per_epoch=256, seed=0,
        on_error="skip", max_open_slides=1,
    )  # fmt: skip
    options.update(kwargs)
    return bst.BigSmallDataset(
        bst.Dataset("rebalance", patients), bst.RandomRegionLoader(CHUNK), bst.RandomCropCollector(CROP),
        **options,
    )  # fmt: skip


def _check_pixels(truth: dict[str, np.ndarray], pid: str, x: int, y: int, image: torch.Tensor) -> None:
    h, w = image.shape[-2:]
    assert np.array_equal(image.permute(1, 2, 0).numpy(), truth[pid][y : y + h, x : x + w]), (pid, x, y)


# -- 2 slides, 2 workers, one broken mid-stream ---------------------------------------------------


def test_two_workers_one_slide_broken_mid_stream_the_epoch_completes(
    masters: dict[str, Path], truth: dict[str, np.ndarray], tmp_path: Path
) -> None:
    paths = _copy(masters, tmp_path / "slides", ["s0", "s1"])
    ds = _dataset(paths, sharding="count")
    loader = DataLoader(ds, batch_size=16, num_workers=2, timeout=120)
    counts: Counter[str] = Counter()
    for index, batch in enumerate(loader):
        for i, pid in enumerate(batch["patient_id"]):
            counts[pid] += 1
            _check_pixels(truth, pid, int(batch["x"][i]), int(batch["y"][i]), batch["image"][i])
        if index == 2:
            _truncate(paths["s1"])
    # The exact epoch: the broken slide's worker went on from the other slide.
    assert sum(counts.values()) == 256 and index + 1 == len(loader) == 16
    assert counts["s1"] < 128 < counts["s0"]
    # What the workers skipped, and the samples per patient, are seen in the main process.
    assert [Path(what).name for what in ds.skipped] == ["s1.tiff"]
    report = ds.epoch_report()
    assert report.complete and len(report.workers) == 2
    assert report.samples == dict(counts)
    assert [Path(w).name for w in report.skipped] == ["s1.tiff"]
    assert all(w.busy is not None and 0 <= w.busy <= 1 for w in report.workers)
    assert "256 samples from 2 patients" in report.summary()


def test_a_worker_whose_patients_all_fail_serves_its_quota_from_the_cohort(
    masters: dict[str, Path], truth: dict[str, np.ndarray], tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    paths = _copy(masters, tmp_path / "slides", ["s0", "s1", "s2", "s3"])
    ds = _dataset(paths, sharding="count", rank=0, world_size=2)  # shard 0 of 2, in this process
    owned = [c.patient.id for c in ds.make_reservoir(ds.topology()).candidates]
    assert len(owned) == 2
    for pid in owned:
        _truncate(paths[pid])
    with caplog.at_level(logging.WARNING):
        samples = list(ds)
    assert len(samples) == 128  # this rank's share, not cut short
    used = Counter(s["patient_id"] for s in samples)
    assert set(used) == set(paths) - set(owned)  # the rest of the cohort, more than one slide
    for s in samples:
        _check_pixels(truth, s["patient_id"], s["x"], s["y"], s["image"])
    assert sorted(Path(p).stem for p in ds.skipped) == sorted(owned)
    assert any("served from the other 2 patients of the cohort" in r.getMessage() for r in caplog.records)


def test_one_slide_left_in_a_worker_is_warned(
    masters: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    paths = _copy(masters, tmp_path / "slides", ["s0", "s1", "s2"])
    _truncate(paths["s1"])
    _truncate(paths["s2"])
    ds = _dataset(paths, validate=False)  # the damage shows only while streaming
    with caplog.at_level(logging.WARNING):
        samples = list(ds)
    assert len(samples) == 256 and {s["patient_id"] for s in samples} == {"s0"}
    assert any(
        "'s0' is the only one left" in r.getMessage() and "2 of its 3 patients" in r.getMessage()
        for r in caplog.records
    )
    assert ds.epoch_report().samples == {"s0": 256}


def test_every_slide_failing_is_an_error_not_a_short_epoch(
    masters: dict[str, Path], tmp_path: Path
) -> None:
    paths = _copy(masters, tmp_path / "slides", ["s0", "s1"])
    ds = _dataset(paths)
    for path in paths.values():
        _truncate(path)
    with pytest.raises(bst.StreamError, match="was skipped"):
        list(ds)


def test_resume_after_adoption_continues_the_same_stream(
    masters: dict[str, Path], tmp_path: Path
) -> None:
    paths = _copy(masters, tmp_path / "slides", ["s0", "s1", "s2", "s3"])

    def fresh() -> bst.BigSmallDataset:
        return _dataset(paths, sharding="count", rank=1, world_size=2)

    ds = fresh()
    for c in ds.make_reservoir(ds.topology()).candidates:
        _truncate(paths[c.patient.id])
    stream = iter(ds)
    head = [next(stream) for _ in range(40)]
    state = ds.state_dict()
    tail = list(stream)
    assert len(head) + len(tail) == 128
    resumed = fresh()
    resumed.load_state_dict(state)
    again = list(resumed)
    assert [(s["patient_id"], s["x"], s["y"]) for s in again] == [
        (s["patient_id"], s["x"], s["y"]) for s in tail
    ]


def test_resume_after_a_slide_became_unusable_goes_on_without_it(
    masters: dict[str, Path], truth: dict[str, np.ndarray], tmp_path: Path
) -> None:
    paths = _copy(masters, tmp_path / "slides", ["s0", "s1", "s2", "s3"])

    def fresh() -> bst.BigSmallDataset:
        return _dataset(paths, sharding="count", rank=0, world_size=2, buffer_size=2)

    ds = fresh()
    owned = [c.patient.id for c in ds.make_reservoir(ds.topology()).candidates]
    stream = iter(ds)
    head = [next(stream) for _ in range(40)]
    state = ds.state_dict()
    stream.close()
    _truncate(paths[owned[0]])  # while the job was down
    resumed = fresh()
    assert list(resumed.skipped) == [owned[0]]  # refused at construction
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert len(head) + len(rest) == 128  # the exact epoch
    assert {s["patient_id"] for s in rest} == {owned[1]}
    for s in rest:
        _check_pixels(truth, s["patient_id"], s["x"], s["y"], s["image"])
    # With "raise", the resume names the slide instead.
    strict = _dataset(paths, sharding="count", rank=0, world_size=2, buffer_size=2, on_error="raise",
                      validate=False)  # fmt: skip
    strict.load_state_dict(state)
    with pytest.raises(bst.SlideError, match=f"{owned[0]}.tiff"):
        list(strict)


# -- skip_errors: the user's own exceptions ------------------------------------------------------


class LabError(Exception):
    """A user's loader refusing a patient."""


class _PickyLoader(bst.RandomRegionLoader):
    def extract_bigchunk(self, patient: bst.Patient, ctx: bst.ChunkContext) -> bst.BigChunk | None:
        if patient.id == "s1":
            raise LabError(f"no consent for {patient.id}")
        return super().extract_bigchunk(patient, ctx)


class _PickyCollector(bst.RandomCropCollector):
    def extract_smallchunk(
        self, call_count: int, bigchunk: bst.BigChunk, ctx: bst.ChunkContext
    ) -> bst.SmallChunk | None:
        if bigchunk.patient.id == "s0":
            raise LabError("stain too faint")
        return super().extract_smallchunk(call_count, bigchunk, ctx)


def _picky(paths: dict[str, Path], loader: bst.BigChunkLoader, collector: bst.SmallChunkCollector,
           **kwargs: Any) -> bst.BigSmallDataset:
    patients = [bst.Patient(name, {"wsi": bst.Record(path)}) for name, path in sorted(paths.items())]
    return bst.BigSmallDataset(
        bst.Dataset("picky", patients), loader, collector, buffer_size=1,
        smallchunks_per_bigchunk=4, prefetch=1, samples_per_epoch=64, seed=0, **kwargs,
    )  # fmt: skip


def test_skip_errors_skips_the_users_loader_and_collector_exceptions(
    masters: dict[str, Path], tmp_path: Path
) -> None:
    paths = _copy(masters, tmp_path / "slides", ["s0", "s1", "s2"])
    ds = _picky(paths, _PickyLoader(CHUNK), _PickyCollector(CROP), on_error="skip",
                skip_errors=(LabError,))  # fmt: skip
    samples = list(ds)
    assert len(samples) == 64 and {s["patient_id"] for s in samples} == {"s2"}
    assert ds.skipped == {
        "patient 's0'": "collecting small chunks: LabError: stain too faint",
        "patient 's1'": "loading a big chunk: LabError: no consent for s1",
    }
    # Not listed: it propagates as it is.
    ds = _picky(paths, _PickyLoader(CHUNK), bst.RandomCropCollector(CROP), on_error="skip")
    with pytest.raises(LabError, match="no consent"):
        list(ds)


def test_skip_errors_is_checked_at_construction(masters: dict[str, Path], tmp_path: Path) -> None:
    paths = _copy(masters, tmp_path / "slides", ["s0"])
    with pytest.raises(bst.ConfigError, match="only applies with on_error='skip'"):
        _picky(paths, bst.RandomRegionLoader(CHUNK), bst.RandomCropCollector(CROP),
               skip_errors=(LabError,))  # fmt: skip
    with pytest.raises(bst.ConfigError, match="skip_errors must be a tuple of Exception"):
        _picky(paths, bst.RandomRegionLoader(CHUNK), bst.RandomCropCollector(CROP),
               on_error="skip", skip_errors=("LabError",))  # fmt: skip
    with pytest.raises(bst.ConfigError, match="sharding"):
        _picky(paths, bst.RandomRegionLoader(CHUNK), bst.RandomCropCollector(CROP), sharding="fast")


# -- sharding by cost ------------------------------------------------------------------------------


def test_equal_costs_deal_as_round_robin() -> None:
    for n, shards in ((7, 3), (12, 4), (2, 5)):
        plain = assign_shards(n, shards, seed=3, epoch=1)
        assert assign_shards(n, shards, seed=3, epoch=1, costs=[2.0] * n, max_parts=[9] * n) == plain


def test_unequal_costs_keep_counts_and_balance_the_shards() -> None:
    rng = np.random.default_rng(0)
    costs = list(rng.choice([1.0, 1.0, 1.0, 6.0], size=40) * rng.uniform(0.5, 1.0, size=40))
    shards = assign_shards(40, 4, seed=0, epoch=0, costs=costs, max_parts=[1] * 40)
    assert sorted(i for shard in shards for i, _, _ in shard) == list(range(40))  # each once
    assert [len(s) for s in shards] == [10] * 4  # every patient keeps its share
    totals = [sum(costs[i] for i, _, _ in shard) for shard in shards]
    plain = assign_shards(40, 4, seed=0, epoch=0)
    plain_totals = [sum(costs[i] for i, _, _ in shard) for shard in plain]
    assert max(totals) / min(totals) < max(plain_totals) / min(plain_totals)
    assert max(totals) / min(totals) < IMBALANCE


def test_few_patients_of_very_different_cost_are_banded_over_every_shard() -> None:
    costs = [10.0, 1.0, 1.0]
    shards = assign_shards(3, 2, seed=0, epoch=0, costs=costs, max_parts=[4, 4, 4])
    assert shards == [[(i, s, 2) for i in _order(shards)] for s in range(2)]
    # Bands that would not hold a patch: dealt whole, unbalanced but correct.
    shards = assign_shards(3, 2, seed=0, epoch=0, costs=costs, max_parts=[4, 1, 4])
    assert sorted(i for shard in shards for i, _, _ in shard) == [0, 1, 2]
    assert all(parts == 1 for shard in shards for _, _, parts in shard)


def _order(shards: list[list[tuple[int, int, int]]]) -> list[int]:
    return [i for i, _, _ in shards[0]]


def test_labels_stay_balanced_with_costs() -> None:
    labels = ["a"] * 8 + ["b"] * 8
    costs = [1.0 + (i % 5) for i in range(16)]
    shards = assign_shards(16, 4, seed=1, epoch=2, labels=labels, costs=costs, max_parts=[1] * 16)
    for shard in shards:
        assert Counter(labels[i] for i, _, _ in shard) == {"a": 2, "b": 2}


def test_the_dataset_measures_costs_at_construction_and_deals_by_them(
    masters: dict[str, Path], tmp_path: Path
) -> None:
    paths = _copy(masters, tmp_path / "slides", ["s0"])
    small = tmp_path / "slides" / "tiny.tiff"
    write_synthetic_slide(small, width=160, height=128, tile_size=32, levels=1, seed=5)
    paths["tiny"] = small
    ds = _dataset(paths)
    assert ds._costs["s0"] / ds._costs["tiny"] == pytest.approx(CHUNK * CHUNK / (160 * 128))
    # Two patients of very different cost over two workers: each worker gets a band of both.
    for worker in range(2):
        reservoir = ds.make_reservoir(Topology(0, 1, worker, 2))
        assert sorted((c.patient.id, c.part) for c in reservoir.candidates) == [
            ("s0", (worker, 2)), ("tiny", (worker, 2))
        ]
    plain = _dataset(paths, sharding="count")
    owned = [plain.make_reservoir(Topology(0, 1, w, 2)).candidates for w in range(2)]
    assert sorted(len(c) for c in owned) == [1, 1]
