"""BigSmallDataset end to end: pixels, DataLoader contract, sharding, reproducibility, bad input."""

from __future__ import annotations

import collections
import gc
import logging
import pickle
import shutil
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import bigsmall_torch as bst
from bigsmall_torch.chunks import BigChunk, ChunkContext, SmallChunk


class TaggingCollector(bst.RandomCropCollector):
    """Adds the big chunk's level-0 position to every sample (to group samples by chunk)."""

    def extract_smallchunk(
        self, call_count: int, bigchunk: BigChunk, ctx: ChunkContext
    ) -> SmallChunk | None:
        small = super().extract_smallchunk(call_count, bigchunk, ctx)
        if small is not None:
            small.info["chunk_x"] = bigchunk.info["x"]
            small.info["chunk_y"] = bigchunk.info["y"]
        return small


def make(folder: Path, **kwargs: Any) -> bst.BigSmallDataset:
    options: dict[str, Any] = dict(
        buffer_size=3, smallchunks_per_bigchunk=16, samples_per_epoch=192, seed=0
    )
    options.update(kwargs)
    loader = options.pop("loader", bst.RandomRegionLoader(size=512, level=options.pop("level", 0)))
    collector = options.pop("collector", TaggingCollector(patch_size=64))
    return bst.BigSmallDataset(
        bst.Dataset.from_folder(folder, pattern="*.tiff"), loader, collector, **options
    )


def stream(ds: bst.BigSmallDataset, **loader_kwargs: Any) -> list[tuple[Any, ...]]:
    """(patient, x, y, level) of every sample, in batch order."""
    out = []
    for batch in DataLoader(ds, batch_size=16, **loader_kwargs):
        for i in range(len(batch["x"])):
            out.append(
                (
                    batch["patient_id"][i],
                    int(batch["x"][i]),
                    int(batch["y"][i]),
                    int(batch["level"][i]),
                )
            )
    return out


@pytest.mark.parametrize("level", [0, 1], ids=["level0", "level1"])
def test_pixels_equal_reader_at_reported_coordinates(slide_folder: Path, level: int) -> None:
    ds = make(slide_folder, level=level, samples_per_epoch=40)
    readers: dict[str, bst.SlideReader] = {}
    for sample in ds:
        path = slide_folder / f"{sample['patient_id']}.tiff"
        reader = readers.setdefault(sample["patient_id"], bst.open_slide(path))
        assert sample["image"].shape == (3, 64, 64) and sample["image"].dtype == torch.uint8
        assert sample["level"] == level
        expected = reader.read(sample["x"], sample["y"], level, 64, 64)
        assert np.array_equal(sample["image"].permute(1, 2, 0).numpy(), expected)
    for reader in readers.values():
        reader.close()


def test_pixels_on_real_slide_match_openslide(cmu1: Path) -> None:
    import openslide

    ds = bst.BigSmallDataset(
        bst.Dataset("real", [bst.Patient("cmu1", {"wsi": bst.Record(cmu1)})]),
        bst.RandomRegionLoader(1024),
        bst.RandomCropCollector(224),
        buffer_size=2,
        smallchunks_per_bigchunk=8,
        samples_per_epoch=24,
        seed=5,
    )
    slide = openslide.OpenSlide(cmu1)
    for sample in ds:
        expected = np.asarray(
            slide.read_region((sample["x"], sample["y"]), 0, (224, 224)).convert("RGB")
        )
        assert np.array_equal(sample["image"].permute(1, 2, 0).numpy(), expected)
    slide.close()


@pytest.mark.parametrize("num_workers", [0, 2], ids=["workers0", "workers2"])
def test_exact_epoch_length_and_batches(slide_folder: Path, num_workers: int) -> None:
    ds = make(slide_folder, samples_per_epoch=192)
    loader = DataLoader(ds, batch_size=16, num_workers=num_workers)
    batches = list(loader)
    assert len(ds) == 192 and len(loader) == 12 == len(batches)
    assert all(b["image"].shape == (16, 3, 64, 64) for b in batches)
    assert set(batches[0]) == {
        "image",
        "patient_id",
        "x",
        "y",
        "level",
        "mpp",
        "chunk_x",
        "chunk_y",
    }


def test_workers_own_disjoint_patients(slide_folder: Path) -> None:
    ds = make(slide_folder, samples_per_epoch=256, buffer_size=2)
    patients_of_worker: dict[int, set[str]] = collections.defaultdict(set)
    # With an IterableDataset each batch comes from one worker, workers taking turns.
    for index, batch in enumerate(DataLoader(ds, batch_size=16, num_workers=2)):
        patients_of_worker[index % 2].update(batch["patient_id"])
    assert patients_of_worker[0] and patients_of_worker[1]
    assert not patients_of_worker[0] & patients_of_worker[1]
    assert len(patients_of_worker[0] | patients_of_worker[1]) == 4


def test_chunk_retires_after_smallchunks_per_bigchunk(slide_folder: Path) -> None:
    # Unaligned placement, so that two chunks of one patient never share an origin.
    loader = bst.RandomRegionLoader(512, tile_aligned=False)
    ds = make(slide_folder, smallchunks_per_bigchunk=5, samples_per_epoch=200, loader=loader)
    per_chunk = collections.Counter((s["patient_id"], s["chunk_x"], s["chunk_y"]) for s in ds)
    assert max(per_chunk.values()) <= 5
    assert sum(per_chunk.values()) == 200 and len(per_chunk) >= 40


def test_chunks_of_different_patients_mix_from_first_batch(slide_folder: Path) -> None:
    ds = make(slide_folder, buffer_size=4, smallchunks_per_bigchunk=64)
    first = next(iter(DataLoader(ds, batch_size=16)))
    assert len(set(first["patient_id"])) >= 3


def test_equal_seeds_equal_streams_and_epochs_differ(slide_folder: Path) -> None:
    a = stream(make(slide_folder, seed=1), num_workers=2)
    b = stream(make(slide_folder, seed=1), num_workers=2)
    c = stream(make(slide_folder, seed=2), num_workers=2)
    assert a == b and a != c
    ds = make(slide_folder, seed=1)
    ds.set_epoch(1)
    assert ds.epoch == 1 and stream(ds, num_workers=2) != a


def test_set_epoch_reaches_persistent_workers(slide_folder: Path) -> None:
    ds = make(slide_folder, seed=4)
    loader = DataLoader(ds, batch_size=16, num_workers=2, persistent_workers=True)
    epochs = []
    for epoch in range(2):
        ds.set_epoch(epoch)
        epochs.append(
            [(p, int(x)) for b in loader for p, x in zip(b["patient_id"], b["x"], strict=True)]
        )
    fresh = make(slide_folder, seed=4)
    fresh.set_epoch(1)
    expected = [(p, x) for p, x, _, _ in stream(fresh, num_workers=2)]
    assert epochs[0] != epochs[1] and epochs[1] == expected


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_fork_and_spawn_give_the_same_stream(slide_folder: Path, context: str) -> None:
    reference = stream(make(slide_folder, seed=3), num_workers=2, multiprocessing_context="fork")
    assert (
        stream(make(slide_folder, seed=3), num_workers=2, multiprocessing_context=context)
        == reference
    )


def test_pickles_without_open_handles(slide_folder: Path) -> None:
    ds = make(slide_folder)
    next(iter(ds))  # opens slides in this process
    clone = pickle.loads(pickle.dumps(ds))
    assert len(clone.slides) == 0
    assert stream(clone) == stream(make(slide_folder))


def test_transform_runs_in_worker(slide_folder: Path) -> None:
    ds = make(slide_folder, transform=torch.nn.Identity().__class__())
    ds.transform = _ToFloat()
    batch = next(iter(DataLoader(ds, batch_size=8, num_workers=2)))
    assert batch["image"].dtype == torch.float32 and float(batch["image"].max()) <= 1.0


class _ToFloat:
    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return image.float() / 255


def test_fewer_patients_than_workers_uses_disjoint_bands(
    tmp_path: Path, slide_folder: Path
) -> None:
    shutil.copy(slide_folder / "synthetic_000.tiff", tmp_path / "only.tiff")
    ds = make(tmp_path, samples_per_epoch=128, buffer_size=2)
    xs: dict[int, list[int]] = collections.defaultdict(list)
    for index, batch in enumerate(DataLoader(ds, batch_size=16, num_workers=2)):
        xs[index % 2].extend(int(x) for x in batch["x"])
    assert len(xs[0]) == len(xs[1]) == 64  # both workers busy
    # The 3072-wide slide is cut into two 1536-wide bands, one per worker.
    bands = sorted([(min(v), max(v)) for v in xs.values()])
    assert bands[0][1] + 64 <= 1536 <= bands[1][0]


def test_world_size_injected_gives_disjoint_equal_shares(slide_folder: Path) -> None:
    streams = [
        stream(make(slide_folder, rank=r, world_size=2, samples_per_epoch=128), num_workers=2)
        for r in (0, 1)
    ]
    assert len(streams[0]) == len(streams[1]) == 64
    patients = [{s[0] for s in st} for st in streams]
    assert not patients[0] & patients[1]


def test_endless_without_samples_per_epoch(slide_folder: Path) -> None:
    ds = make(slide_folder, samples_per_epoch=None)
    with pytest.raises(TypeError, match="endless"):
        len(ds)
    it = iter(ds)
    assert sum(1 for _ in zip(range(500), it, strict=False)) == 500
    it.close()


def _loader_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "bigsmall-loader" and t.is_alive()]


def test_closing_the_iterator_stops_the_thread_and_closes_slides(slide_folder: Path) -> None:
    gc.collect()
    before = set(_loader_threads())
    ds = make(slide_folder, samples_per_epoch=None)
    it = iter(ds)
    next(it)
    assert len(set(_loader_threads()) - before) == 1 and len(ds.slides) > 0
    it.close()
    assert set(_loader_threads()) <= before and len(ds.slides) == 0


def test_an_abandoned_iterator_stops_its_thread_when_collected(slide_folder: Path) -> None:
    gc.collect()
    before = set(_loader_threads())
    it = iter(make(slide_folder, samples_per_epoch=None))
    next(it)
    assert len(set(_loader_threads()) - before) == 1
    del it
    gc.collect()
    assert set(_loader_threads()) <= before


# --- bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"buffer_size": 0}, "buffer_size must be an int >= 1, got 0"),
        ({"smallchunks_per_bigchunk": -1}, "smallchunks_per_bigchunk must be an int >= 1"),
        ({"samples_per_epoch": 0}, "samples_per_epoch must be an int >= 1"),
        ({"seed": -1}, "seed must be an int >= 0"),
        ({"on_error": "ignore"}, "on_error must be one of 'raise', 'skip'"),
        ({"backend": "pillow"}, "backend must be one of"),
        ({"samples_per_epoch": 99, "world_size": 2, "rank": 0}, "divisible by the world size 2"),
        ({"rank": 2, "world_size": 2}, "rank must be in"),
        (
            {"collector": bst.RandomCropCollector(1024)},
            "patch size 1024x1024 is larger than the loader's",
        ),
    ],
)
def test_bad_arguments_fail_at_construction(
    slide_folder: Path, kwargs: dict[str, Any], match: str
) -> None:
    with pytest.raises(bst.ConfigError, match=match):
        make(slide_folder, **kwargs)


@pytest.mark.parametrize("size", [0, -5, (10, 0), "big", 2.5])
def test_bad_sizes(size: Any) -> None:
    with pytest.raises(bst.ConfigError, match="size"):
        bst.RandomRegionLoader(size)
    with pytest.raises(bst.ConfigError, match="size"):
        bst.RandomCropCollector(size)


def test_resolution_errors_name_the_slide(slide_folder: Path) -> None:
    with pytest.raises(bst.ConfigError, match="only one of level=, mpp= or magnification="):
        bst.RandomRegionLoader(512, level=1, mpp=0.5)
    with pytest.raises(
        bst.SlideError, match=r"synthetic_000\.tiff: level 9 does not exist \(levels 0\.\.2\)"
    ):
        make(slide_folder, loader=bst.RandomRegionLoader(512, level=9))
    with pytest.raises(
        bst.SlideError, match=r"mpp=0\.1 is finer than the slide's finest level \(0\.5 mpp"
    ):
        make(slide_folder, loader=bst.RandomRegionLoader(512, mpp=0.1))


def test_not_a_slide_fails_at_construction_naming_the_file(
    tmp_path: Path, slide_folder: Path
) -> None:
    shutil.copy(slide_folder / "synthetic_000.tiff", tmp_path / "good.tiff")
    (tmp_path / "bad.tiff").write_bytes(b"this is not a tiff at all" * 10)
    with pytest.raises(
        bst.SlideOpenError, match=r"bad\.tiff.*backends tried: tiffslide, openslide"
    ):
        make(tmp_path)


def test_abstract_methods_are_enforced() -> None:
    class NoLoad(bst.BigChunkLoader):
        pass

    class NoCollect(bst.SmallChunkCollector):
        pass

    with pytest.raises(TypeError, match="abstract"):
        NoLoad()  # type: ignore[abstract]
    with pytest.raises(TypeError, match="abstract"):
        NoCollect()  # type: ignore[abstract]


class WrongTypeLoader(bst.BigChunkLoader):
    def extract_bigchunk(self, patient: bst.Patient, ctx: ChunkContext) -> Any:
        return np.zeros((8, 8, 3), np.uint8)


class NothingLoader(bst.BigChunkLoader):
    def extract_bigchunk(self, patient: bst.Patient, ctx: ChunkContext) -> None:
        return None


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_returning_wrong_type_raises(slide_folder: Path, num_workers: int) -> None:
    ds = make(slide_folder, loader=WrongTypeLoader())
    with pytest.raises(bst.ExtractorError, match="must return a BigChunk or None, got ndarray"):
        list(DataLoader(ds, batch_size=4, num_workers=num_workers))


def test_loader_giving_nothing_raises_instead_of_hanging(slide_folder: Path) -> None:
    with pytest.raises(bst.StreamError, match="returned no big chunk"):
        list(make(slide_folder, loader=NothingLoader()))


def test_collector_never_fitting_raises_instead_of_hanging(slide_folder: Path) -> None:
    class Tiny(bst.RandomRegionLoader):
        @property
        def chunk_size(self) -> None:  # hide the size so construction cannot tell
            return None

    with pytest.raises(bst.StreamError, match="gave no small chunk"):
        list(make(slide_folder, loader=Tiny(32)))


def _with_broken(tmp_path: Path, slide_folder: Path, broken_svs: Path) -> Path:
    for name in ["synthetic_000.tiff", "synthetic_001.tiff"]:
        shutil.copy(slide_folder / name, tmp_path / name)
    shutil.copy(broken_svs, tmp_path / "zz_broken.tiff")
    return tmp_path


def test_on_error_raise_names_the_slide(
    tmp_path: Path, slide_folder: Path, broken_svs: Path
) -> None:
    folder = _with_broken(tmp_path, slide_folder, broken_svs)
    ds = make(folder, validate=False)
    with pytest.raises(bst.SlideOpenError, match=r"zz_broken\.tiff"):
        list(DataLoader(ds, batch_size=16, num_workers=0))


def test_on_error_skip_counts_logs_and_keeps_epoch_length(
    tmp_path: Path, slide_folder: Path, broken_svs: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = _with_broken(tmp_path, slide_folder, broken_svs)
    ds = make(folder, validate=False, on_error="skip", samples_per_epoch=96)
    with caplog.at_level(logging.WARNING, logger="bigsmall_torch"):
        samples = list(ds)
    assert len(samples) == 96
    assert {s["patient_id"] for s in samples} == {"synthetic_000", "synthetic_001"}
    skipped = [r for r in caplog.records if "skipping patient 'zz_broken'" in r.getMessage()]
    assert len(skipped) == 1 and "zz_broken.tiff" in skipped[0].getMessage()
    assert "1 slide(s) skipped" in skipped[0].getMessage()


def _open_slide_fds(folder: Path) -> list[str]:
    fds = []
    for fd in Path("/proc/self/fd").iterdir():
        try:
            target = str(fd.readlink())
        except OSError:
            continue
        if target.startswith(str(folder)):
            fds.append(target)
    return fds


def test_no_file_handles_left_after_an_epoch(slide_folder: Path) -> None:
    gc.collect()  # earlier tests abandon iterators mid-epoch; their threads end when collected
    threads, fds = set(_loader_threads()), collections.Counter(_open_slide_fds(slide_folder))
    ds = make(slide_folder)
    it = iter(ds)
    next(it)
    assert collections.Counter(_open_slide_fds(slide_folder)) - fds  # this epoch opened slides...
    assert len(list(it)) == 191
    assert (
        collections.Counter(_open_slide_fds(slide_folder)) - fds == collections.Counter()
    )  # ...and closed them
    assert set(_loader_threads()) <= threads


def test_deleting_a_loader_mid_epoch_ends_its_workers(slide_folder: Path) -> None:
    it = iter(DataLoader(make(slide_folder, samples_per_epoch=None), batch_size=8, num_workers=2))
    next(it)
    workers = list(it._workers)  # type: ignore[attr-defined]
    assert all(w.is_alive() for w in workers)
    del it
    for w in workers:
        w.join(timeout=30)
    assert not any(w.is_alive() for w in workers)


def test_interpreter_exits_after_breaking_out_of_an_endless_stream(slide_folder: Path) -> None:
    import subprocess
    import sys

    script = (
        "import bigsmall_torch as bst\n"
        "from torch.utils.data import DataLoader\n"
        f"ds = bst.BigSmallDataset(bst.Dataset.from_folder({str(slide_folder)!r}, pattern='*.tiff'),"
        " bst.RandomRegionLoader(512), bst.RandomCropCollector(64), buffer_size=2,"
        " smallchunks_per_bigchunk=4)\n"
        "for nw in (0, 2):\n"
        "    for i, batch in enumerate(DataLoader(ds, batch_size=8, num_workers=nw)):\n"
        "        if i == 3: break\n"
        "print('done')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "done"


def test_stats_break_the_time_down(slide_folder: Path) -> None:
    ds = make(slide_folder, samples_per_epoch=64)
    for _ in DataLoader(ds, batch_size=16):
        pass
    stats = ds.last_stats
    assert stats.samples == 64 and stats.chunks_loaded >= 64 // 16
    parts = stats.breakdown()
    assert set(parts) >= {
        "load (loading thread)",
        "wait for a big chunk",
        "crop (collector)",
        "collate + IPC + caller",
    }
    assert (
        all(v >= 0 for v in parts.values())
        and parts["load (loading thread)"] > 0
        and parts["crop (collector)"] > 0
    )
