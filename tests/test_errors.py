"""Bad input gets the package's errors at the earliest point, naming the argument and what is
allowed; two iterations of one dataset in one process do not disturb each other."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import bigsmall_torch as bst
from bigsmall_torch.chunks import BigChunk, ChunkContext, SmallChunk, SmallChunkCollector
from bigsmall_torch.errors import ConfigError, ExtractorError


def _dataset(folder: Path, n: int = 2) -> bst.Dataset:
    return (
        bst.Dataset.from_folder(folder, pattern="*.tiff").subset(range(n))
        if hasattr(bst.Dataset, "subset")
        else bst.Dataset("d", bst.Dataset.from_folder(folder, pattern="*.tiff").patients[:n])
    )


def test_empty_record_path_is_refused() -> None:
    with pytest.raises(ConfigError, match="Record: path must not be empty"):
        bst.Record("")


@pytest.mark.parametrize("root", [123, None, ""])
def test_from_folder_refuses_a_non_path(root: Any) -> None:
    with pytest.raises(ConfigError, match="from_folder: root must be a folder path"):
        bst.Dataset.from_folder(root)


def test_bigchunk_without_data_is_refused(slide_folder: Path) -> None:
    patient = bst.Patient("p", {"wsi": bst.Record(slide_folder / "x.tiff")})
    with pytest.raises(ExtractorError, match="BigChunk: data is None"):
        BigChunk(None, {}, patient)


class _Collector(SmallChunkCollector):
    """Crops 32x32 at the chunk's origin; ``make`` turns (pixels, info) into the SmallChunk args."""

    def __init__(self, mode: str) -> None:
        self.mode = mode

    @property
    def patch_size(self) -> tuple[int, int]:
        return (32, 32)

    def extract_smallchunk(
        self, call_count: int, bigchunk: BigChunk, ctx: ChunkContext
    ) -> SmallChunk:
        data: Any = bigchunk.data[:32, :32]
        info: dict[str, Any] = {"x": 0}
        if self.mode == "tensor":
            data = torch.from_numpy(np.ascontiguousarray(data)).permute(2, 0, 1)
        elif self.mode in ("image", "patient_id"):
            info[self.mode] = 1
        return SmallChunk(data, info, bigchunk.info, bigchunk.patient)


@pytest.mark.parametrize("batch_size", [None, 4])
@pytest.mark.parametrize(
    ("mode", "match"),
    [
        (
            "tensor",
            r"data must be a numpy array .* got Tensor \(a torch tensor: return tensor.numpy",
        ),
        ("image", r"info keys \['image'\] are reserved"),
        ("patient_id", r"info keys \['patient_id'\] are reserved"),
    ],
)
def test_collector_mistakes_are_named(
    slide_folder: Path, mode: str, match: str, batch_size: int | None
) -> None:
    dataset = bst.BigSmallDataset(
        bst.Dataset.from_folder(slide_folder, pattern="*.tiff"), bst.RandomRegionLoader(size=128),
        _Collector(mode), buffer_size=1, smallchunks_per_bigchunk=2, samples_per_epoch=8,
        batch_size=batch_size,
    )  # fmt: skip
    with pytest.raises(ExtractorError, match=match):
        next(iter(dataset))


def test_buffer_that_cannot_fit_in_memory_is_refused_at_construction(slide_folder: Path) -> None:
    with pytest.raises(
        ConfigError, match=r"buffer_size=1000000 .* need .* GiB, but this machine has"
    ):
        bst.BigSmallDataset(
            bst.Dataset.from_folder(slide_folder, pattern="*.tiff"), bst.RandomRegionLoader(size=2048),
            bst.RandomCropCollector(patch_size=224), buffer_size=10**6, smallchunks_per_bigchunk=8,
        )  # fmt: skip


def test_memory_check_counts_the_workers(
    slide_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A configuration that fits one worker but not 64 is refused when the workers start."""
    import bigsmall_torch.dataset as module

    dataset = bst.BigSmallDataset(
        bst.Dataset.from_folder(slide_folder, pattern="*.tiff"), bst.RandomRegionLoader(size=512),
        bst.RandomCropCollector(patch_size=64), buffer_size=4, smallchunks_per_bigchunk=8, prefetch=2,
        samples_per_epoch=16,
    )  # fmt: skip
    per_worker = 7 * 512 * 512 * 3
    monkeypatch.setattr(module, "available_memory", lambda: per_worker * 10)
    dataset._check_memory(10)  # fits exactly
    with pytest.raises(ConfigError, match=r"x 11 worker\(s\)"):
        dataset._check_memory(11)


def test_two_iterations_in_one_process_do_not_close_slides_under_each_other(
    slide_folder: Path,
) -> None:
    dataset = bst.BigSmallDataset(
        bst.Dataset.from_folder(slide_folder, pattern="*.tiff"), bst.RandomRegionLoader(size=256),
        bst.RandomCropCollector(patch_size=64), buffer_size=2, smallchunks_per_bigchunk=4,
        samples_per_epoch=64, on_error="raise", seed=1,
    )  # fmt: skip
    first, second = iter(dataset), iter(dataset)
    a = [next(first) for _ in range(8)]
    b = [next(second) for _ in range(8)]
    assert len(a) == len(b) == 8
    for _ in first:  # the first ends and would close the shared slides...
        pass
    rest = list(second)  # ...but the second goes on reading them
    assert len(b) + len(rest) == 64
    assert dataset.last_stats.skipped == []


def test_errors_survive_pickling_and_torchs_one_argument_rebuild() -> None:
    import pickle

    from bigsmall_torch.errors import MissingWindowsError, SlideOpenError

    error = SlideOpenError("/data/a.svs", "not a slide", backends=["tiffslide", "openslide"])
    again = pickle.loads(pickle.dumps(error))
    assert (type(again), again.path, again.reason, again.backends) == (
        SlideOpenError, error.path, error.reason, error.backends,
    )  # fmt: skip
    rebuilt = SlideOpenError("Caught SlideOpenError in DataLoader worker process 0.\nOriginal ...")
    assert isinstance(rebuilt, bst.SlideError) and rebuilt.path is None and "worker" in str(rebuilt)
    missing = MissingWindowsError({"p": [(0, 1)]})
    twice = pickle.loads(pickle.dumps(pickle.loads(pickle.dumps(missing))))
    assert str(twice) == str(missing)
    from_message = MissingWindowsError("windows never received, per patient: 'p': 1")
    assert str(pickle.loads(pickle.dumps(from_message))) == str(from_message)


def test_slide_cache_closes_readers_only_when_its_last_user_leaves(slide_folder: Path) -> None:
    """The mechanism under the test above: a reader taken by one iteration stays open while
    another iteration of the same dataset still uses the cache."""
    cache = bst.SlideCache(4)
    path = sorted(slide_folder.glob("*.tiff"))[0]
    cache.acquire()
    cache.acquire()
    decoder = cache.get(path)._decoder(0)  # type: ignore[attr-defined]  # what a read in flight holds
    cache.release()  # the first iteration ends
    assert decoder.read(0, 0, 64, 64).shape == (64, 64, 3)  # the second still reads with it
    cache.release()  # the last one out closes
    assert len(cache) == 0
    with pytest.raises(bst.SlideReadError, match="closed"):
        decoder.read(0, 0, 64, 64)


@pytest.mark.parametrize(
    ("context", "damage"), [("fork", "delete"), ("spawn", "delete"), ("spawn", "zeroed")]
)
def test_worker_side_slide_errors_arrive_as_the_packages_types(
    slide_folder: Path, tmp_path: Path, context: str, damage: str
) -> None:
    """A slide that became unusable after construction raises in a DataLoader worker; the main
    process catches it as SlideOpenError / SlideReadError (torch rebuilds ``type(message)``),
    naming the file."""
    import shutil

    from torch.utils.data import DataLoader

    for path in sorted(slide_folder.glob("*.tiff"))[:2]:
        shutil.copy(path, tmp_path / path.name)
    victim = sorted(tmp_path.glob("*.tiff"))[1]
    ds = bst.BigSmallDataset(
        bst.Dataset.from_folder(tmp_path, pattern="*.tiff"), bst.RandomRegionLoader(256),
        bst.RandomCropCollector(64), buffer_size=1, smallchunks_per_bigchunk=2, prefetch=1,
        samples_per_epoch=64, sharding="count",
    )  # fmt: skip
    if damage == "delete":
        victim.unlink()
        expected: type[bst.SlideError] = bst.SlideOpenError
    else:  # the header opens, the tiles are zeros
        size = victim.stat().st_size
        with open(victim, "rb") as f:
            header = f.read(1 << 12)
        victim.write_bytes(header + bytes(size - len(header)))
        expected = bst.SlideReadError
    loader = DataLoader(ds, batch_size=8, num_workers=2, multiprocessing_context=context, timeout=120)
    with pytest.raises(bst.SlideError) as caught:
        for _ in loader:
            pass
    assert isinstance(caught.value, expected), type(caught.value)
    assert victim.name in str(caught.value)
    # The traceback (in the exception and in pytest's ExceptionInfo) holds this frame and the
    # loader's iterator in a cycle; without it the iterator's workers close now, not at a later gc
    # (which in torch can wait out a 5 s join per worker).
    caught.value.__traceback__ = None
    del caught
