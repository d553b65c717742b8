"""Schedulers (visit statistics), messages and weights from the training loop, per-patient state."""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from torch.utils.data import DataLoader

import bigsmall_torch as bst
from bigsmall_torch.chunks import BigChunk, ChunkContext, SmallChunk


class RecordingLoader(bst.RandomRegionLoader):
    """Records the patient of every big chunk it loads (num_workers=0: same process)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.log: list[Any] = []

    def extract_bigchunk(self, patient: bst.Patient, ctx: ChunkContext) -> BigChunk | None:
        self.log.append(patient.id)
        return super().extract_bigchunk(patient, ctx)


def patients(slide_folder: Path, labels: list[Any]) -> bst.Dataset:
    files = sorted(slide_folder.glob("*.tiff"))
    return bst.Dataset("d", [
        bst.Patient(f"p{i}", {"wsi": bst.Record(files[i % len(files)])}, label=label)
        for i, label in enumerate(labels)
    ])


def run(dataset: bst.Dataset, samples: int, **kwargs: Any) -> RecordingLoader:
    loader = RecordingLoader(128)
    ds = bst.BigSmallDataset(dataset, loader, bst.RandomCropCollector(32), smallchunks_per_bigchunk=2,
                             samples_per_epoch=samples, **{"buffer_size": 2, **kwargs})
    assert len(list(ds)) == samples
    return loader


def test_least_visited_visits_everyone_early_and_evenly(slide_folder: Path) -> None:
    log = run(patients(slide_folder, [None] * 6), 120).log
    assert set(log[:6]) == {f"p{i}" for i in range(6)}  # every patient in the first round
    for end in range(6, len(log) + 1, 6):
        counts = collections.Counter(log[:end])
        assert max(counts.values()) - min(counts.values()) == 0  # whole rounds stay even


def test_label_balanced_keeps_resident_labels_balanced(slide_folder: Path) -> None:
    dataset = patients(slide_folder, ["a"] * 6 + ["b"] * 2)
    log = run(dataset, 200, buffer_size=4, scheduler=bst.LabelBalancedScheduler()).log
    label = {p.id: p.label for p in dataset}
    labels = [label[p] for p in log]
    for end in range(1, len(labels) + 1):  # labels take turns: counts never differ by more than 1
        assert abs(labels[:end].count("a") - labels[:end].count("b")) <= 1
    windows = [labels[i : i + 4].count("b") / 4 for i in range(len(labels) - 3)]
    assert np.mean(windows) == pytest.approx(0.5, abs=0.02)  # the last 4 loaded: balanced on average
    assert set(log) == {p.id for p in dataset}  # every patient of each label visited
    plain = [label[p] for p in run(dataset, 200, buffer_size=4).log]
    assert plain.count("a") > 2 * plain.count("b")  # without it, labels follow patient counts


def test_label_balanced_needs_labels(slide_folder: Path) -> None:
    with pytest.raises(bst.ConfigError, match="LabelBalancedScheduler needs a label on every patient"):
        run(patients(slide_folder, ["a", None]), 8, scheduler=bst.LabelBalancedScheduler())


def test_weighted_scheduler_follows_weights(slide_folder: Path) -> None:
    log = run(patients(slide_folder, [None] * 4), 800, scheduler=bst.WeightedScheduler({"p0": 6.0, "p3": 0})).log
    counts = collections.Counter(log)
    assert counts["p3"] == 0
    assert counts["p0"] / len(log) == pytest.approx(6 / 8, abs=0.07)


class OnlyFirst(bst.Scheduler):
    def schedule(self, candidates, rng):  # type: ignore[no-untyped-def]
        return min(candidates, key=lambda c: c.patient.id)


def test_custom_scheduler_subclass(slide_folder: Path) -> None:
    assert set(run(patients(slide_folder, [None] * 3), 40, scheduler=OnlyFirst()).log) == {"p0"}


def test_bad_scheduler_arguments(slide_folder: Path) -> None:
    with pytest.raises(bst.ConfigError, match=r"scheduler must be a bigsmall_torch\.Scheduler"):
        run(patients(slide_folder, [None]), 8, scheduler="least-visited")
    with pytest.raises(bst.ConfigError, match=r"weight of .p0. must be a number >= 0"):
        bst.WeightedScheduler({"p0": -1})


# --- messages and weights from the training loop -------------------------------------------------


class MessageCollector(bst.RandomCropCollector):
    """Puts the last message about the patient (an int, -1 for none) and a per-patient call count
    kept in ctx.state into every sample."""

    def extract_smallchunk(self, call_count: int, bigchunk: BigChunk, ctx: ChunkContext) -> SmallChunk | None:
        small = super().extract_smallchunk(call_count, bigchunk, ctx)
        if small is not None:
            small.info["msg"] = -1 if ctx.message is None else int(ctx.message)
            ctx.state["calls"] = ctx.state.get("calls", 0) + 1
            small.info["calls"] = ctx.state["calls"]
        return small


def message_dataset(slide_folder: Path, **kwargs: Any) -> bst.BigSmallDataset:
    return bst.BigSmallDataset(
        bst.Dataset.from_folder(slide_folder, pattern="*.tiff"), bst.RandomRegionLoader(256),
        MessageCollector(32), buffer_size=2, smallchunks_per_bigchunk=4, **kwargs,
    )


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_messages_and_weights_reach_running_persistent_workers(slide_folder: Path, context: str) -> None:
    ds = message_dataset(slide_folder)
    loader = DataLoader(ds, batch_size=8, num_workers=2, persistent_workers=True, multiprocessing_context=context)
    it = iter(loader)
    first = [next(it) for _ in range(4)]
    assert all(int(m) == -1 for b in first for m in b["msg"])
    ids = [p.id for p in ds.dataset]
    ds.send_messages({pid: 7 for pid in ids})
    ds.set_weights({pid: (1.0 if pid == ids[0] else 0.0) for pid in ids})
    later = [next(it) for _ in range(40)]
    assert all(int(m) == 7 for b in later[-10:] for m in b["msg"])  # seen at the next call
    # The worker owning ids[0] now loads only it; the other worker, all of whose patients weigh 0,
    # ignores the weights (it can neither stop mid-epoch nor wait).
    worker_of_id0 = next(i for i, b in enumerate(later) if ids[0] in b["patient_id"]) % 2
    tail = [b for i, b in enumerate(later) if i >= 30 and i % 2 == worker_of_id0]
    assert {pid for b in tail for pid in b["patient_id"]} == {ids[0]}
    del it, loader


def test_unknown_patients_and_bad_weights_are_refused(slide_folder: Path) -> None:
    ds = message_dataset(slide_folder)
    with pytest.raises(bst.ConfigError, match=r"send_messages: unknown patient ids \['nobody'\]"):
        ds.send_message("nobody", 1)
    with pytest.raises(bst.ConfigError, match="weight of 'synthetic_000' must be a number >= 0"):
        ds.set_weights({"synthetic_000": -2})


def test_per_patient_state_survives_chunk_retirement(slide_folder: Path) -> None:
    ds = message_dataset(slide_folder, samples_per_epoch=200)
    calls: dict[str, list[int]] = collections.defaultdict(list)
    for s in ds:
        calls[s["patient_id"]].append(s["calls"])
    for seq in calls.values():
        assert seq == list(range(1, len(seq) + 1))  # counts go on across many big chunks
    assert max(len(seq) for seq in calls.values()) > 3 * 4  # more samples than one chunk gives
