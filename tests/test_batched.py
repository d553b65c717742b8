"""Batched mode: whole batches built in the worker, the same samples as per-sample mode."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset, default_collate

import bigsmall_torch as bst
from bigsmall_torch._engine import batch_ring as _batch_ring
from bigsmall_torch._engine.batch_ring import InlineDict
from bigsmall_torch._engine.batching import batched_quota, collate_samples
from bigsmall_torch.chunks import BigChunk, ChunkContext, SmallChunk


def make(folder: Path, **kwargs: Any) -> bst.BigSmallDataset:
    options: dict[str, Any] = dict(
        buffer_size=3, smallchunks_per_bigchunk=16, samples_per_epoch=256, seed=7
    )
    options.update(kwargs)
    collector = options.pop("collector", bst.RandomCropCollector(64))
    return bst.BigSmallDataset(
        bst.Dataset.from_folder(folder, pattern="*.tiff"),
        bst.RandomRegionLoader(512),
        collector,
        **options,
    )


def flatten(batches: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    return [
        (b["patient_id"][i], int(b["x"][i]), int(b["y"][i]), b["image"][i].numpy().tobytes())
        for b in batches
        for i in range(len(b["x"]))
    ]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_same_samples_as_per_sample_mode(slide_folder: Path, num_workers: int) -> None:
    per_sample = list(DataLoader(make(slide_folder), batch_size=32, num_workers=num_workers))
    batched = list(
        DataLoader(make(slide_folder, batch_size=32), batch_size=None, num_workers=num_workers)
    )
    assert len(batched) == len(per_sample) == 8
    assert flatten(batched) == flatten(per_sample)
    first = batched[0]
    assert first["image"].shape == (32, 3, 64, 64) and first["image"].dtype == torch.uint8
    assert first["x"].dtype == torch.int64 and first["mpp"].dtype == torch.float64
    assert isinstance(first["patient_id"], list) and len(set(first["patient_id"])) >= 2  # mixing


def test_exact_len_with_a_partial_last_batch(slide_folder: Path) -> None:
    ds = make(slide_folder, batch_size=64, samples_per_epoch=200)
    loader = DataLoader(ds, batch_size=None, num_workers=2)
    batches = list(loader)
    assert len(ds) == len(loader) == len(batches) == 4
    assert [len(b["x"]) for b in batches] == [64, 64, 64, 8]


def test_batched_quota_deals_whole_batches() -> None:
    for total, size, workers in [(200, 64, 2), (256, 32, 3), (10, 4, 4), (64, 64, 2), (1, 8, 3)]:
        quotas = [batched_quota(total, size, workers, w) for w in range(workers)]
        assert sum(quotas) == total
        assert sum(-(-q // size) for q in quotas) == -(-total // size)  # no extra partial batches


def stream(loader: DataLoader[Any]) -> list[tuple[Any, ...]]:
    """Every sample of every batch, read while the batch is alive (so its slot can be reused)."""
    return [sample for batch in loader for sample in flatten([batch])]


def test_worker_batches_reuse_their_shared_memory_slots(slide_folder: Path) -> None:
    ds = make(slide_folder, batch_size=8, samples_per_epoch=320)  # 40 batches
    loader = DataLoader(ds, batch_size=None, num_workers=2)
    addresses = []
    for batch in loader:
        addresses.append(batch["image"].data_ptr())
        del batch  # hands the slot back
    assert len(addresses) == 40
    # a few slots per worker (3-5), each mapped once, not 40 buffers
    assert len(set(addresses)) <= 2 * 8
    per_sample = DataLoader(make(slide_folder, samples_per_epoch=320), batch_size=8, num_workers=2)
    assert stream(loader) == flatten(list(per_sample))


def two_slots(worker_id: int) -> None:
    """``worker_init_fn``: two batch slots per worker. Set in the worker itself, so that it holds
    under every start method (a monkeypatch in the main process reaches forked workers only)."""
    _batch_ring.MAX_SLOTS = 2


def new_rings(before: set[str]) -> dict[str, _batch_ring._Mapped]:
    """The worker rings the main process mapped since ``_MAPPED`` had the tokens ``before``."""
    return {token: mapped for token, mapped in _batch_ring._MAPPED.items() if token not in before}


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_kept_batches_are_never_overwritten(slide_folder: Path, context: str) -> None:
    """A training loop that keeps its batches exhausts the slots; later batches get their own memory."""
    ds = make(slide_folder, batch_size=8, samples_per_epoch=160)
    loader = DataLoader(
        ds,
        batch_size=None,
        num_workers=2,
        worker_init_fn=two_slots,
        multiprocessing_context=context,
    )
    before, kept, rings = set(_batch_ring._MAPPED), [], {}
    for batch in loader:
        kept.append(batch)
        rings.update(new_rings(before))
    # The limit held in each worker: its ring has MAX_SLOTS = 2 flags and sent two slots, not 16.
    assert len(rings) == 2
    assert all(len(m.control) == 2 and set(m.slots) == {0, 1} for m in rings.values())
    assert len({b["image"].data_ptr() for b in kept}) == 20
    per_sample = DataLoader(make(slide_folder, samples_per_epoch=160), batch_size=8, num_workers=2)
    assert flatten(kept) == flatten(list(per_sample))


def without_use_count(worker_id: int) -> None:
    """``worker_init_fn``: the worker behaves as under a torch build without ``_storage_Use_Count``."""
    _batch_ring._use_count = None


def test_without_the_storage_use_count_slots_are_never_reused(
    slide_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without torch's use count the worker cannot prove a slot free (a transform may keep its
    input): every batch gets a one-off buffer, no slot is ever sent, and the batches are right."""
    monkeypatch.setattr(_batch_ring, "_use_count", None)
    options: dict[str, Any] = dict(batch_size=8, samples_per_epoch=160)
    plain = stream(DataLoader(make(slide_folder, **options), batch_size=None, num_workers=0))
    loader = DataLoader(
        make(slide_folder, **options),
        batch_size=None,
        num_workers=1,
        worker_init_fn=without_use_count,
    )
    before, got = set(_batch_ring._MAPPED), []
    for batch in loader:  # each batch dropped at once: a ring would reuse its slot
        got.extend(flatten([batch]))
        assert new_rings(before) == {}  # no slot reached the main process
    assert got == plain
    kept = list(loader)
    assert new_rings(before) == {} and len({b["image"].data_ptr() for b in kept}) == 20
    assert flatten(kept) == plain
    # A transform that keeps a view of its input: a reused slot would change what it kept.
    reference, transform = [], KeepsPrevious()
    for batch in DataLoader(make(slide_folder, **options), batch_size=None, num_workers=0):
        reference.extend(flatten([{**batch, "image": transform(batch["image"].clone())}]))
    ds = make(slide_folder, transform=KeepsPrevious(), **options)
    loader = DataLoader(ds, batch_size=None, num_workers=1, worker_init_fn=without_use_count)
    assert stream(loader) == reference


def test_without_the_storage_use_count_the_ring_is_not_used(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(_batch_ring, "_use_count", None)
    monkeypatch.setattr(_batch_ring, "_told_no_use_count", False)
    monkeypatch.setattr(_batch_ring, "_RING", None)
    monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: object())  # as in a worker
    with caplog.at_level(logging.INFO, logger=_batch_ring.__name__):
        acquired = [_batch_ring.acquire_images((4, 3, 8, 8)) for _ in range(3)]
    assert [lease for _, _, lease in acquired] == [None, None, None] and _batch_ring._RING is None
    assert all(images.is_shared() and images.shape == (4, 3, 8, 8) for images, _, _ in acquired)
    assert len({images.data_ptr() for images, _, _ in acquired}) == 3
    assert [r.levelno for r in caplog.records] == [logging.INFO]  # said once
    assert "_storage_Use_Count" in caplog.records[0].getMessage()
    assert not _batch_ring._only_ring_holds(torch.UntypedStorage(8))  # never "free" on a guess


class OnlyInWorkers:
    """Wraps a transform so that it fails when called outside a DataLoader worker process."""

    def __init__(self, transform: Any) -> None:
        self.transform, self.main_pid = transform, os.getpid()

    def __call__(self, images: torch.Tensor) -> Any:
        if torch.utils.data.get_worker_info() is None or os.getpid() == self.main_pid:
            raise RuntimeError("the batch transform ran outside a DataLoader worker")
        return self.transform(images)


@pytest.mark.parametrize("kind", ["new tensor", "in place", "view"])
def test_transforms_in_workers_with_slots(slide_folder: Path, kind: str) -> None:
    transforms = {
        "new tensor": lambda images: images.flip(-1),
        "in place": lambda images: images.sub_(1),
        "view": lambda images: images[:, :, 8:-8, 8:-8],
    }
    plain = list(
        DataLoader(
            make(slide_folder, batch_size=8, samples_per_epoch=128), batch_size=None, num_workers=2
        )
    )
    expected = flatten([{**b, "image": transforms[kind](b["image"].clone())} for b in plain])
    ds = make(
        slide_folder, batch_size=8, samples_per_epoch=128, transform=OnlyInWorkers(transforms[kind])
    )
    loader = DataLoader(ds, batch_size=None, num_workers=2)
    assert stream(loader) == expected and len(expected) == 128
    assert stream(loader) == expected  # again, through slots released in the first epoch


class StampsItsProcess:
    """A batch transform whose output says where it ran."""

    def __call__(self, images: torch.Tensor) -> dict[str, Any]:
        info = torch.utils.data.get_worker_info()
        return {
            "pixels": images.flip(-1),
            "pid": os.getpid(),
            "worker": None if info is None else info.id,
        }


@pytest.mark.parametrize("num_workers", [0, 2])
def test_the_batch_transform_runs_in_the_worker_process(
    slide_folder: Path, num_workers: int
) -> None:
    options: dict[str, Any] = dict(batch_size=8, samples_per_epoch=64)
    plain = list(
        DataLoader(make(slide_folder, **options), batch_size=None, num_workers=num_workers)
    )
    ds = make(slide_folder, transform=StampsItsProcess(), **options)
    stamped = list(DataLoader(ds, batch_size=None, num_workers=num_workers))
    pids = {b["image"]["pid"] for b in stamped}
    workers = {b["image"]["worker"] for b in stamped}
    if num_workers:
        assert os.getpid() not in pids and len(pids) == 2 and workers == {0, 1}
    else:
        assert pids == {os.getpid()} and workers == {None}
    assert len(stamped) == len(plain) == 8
    for got, want in zip(stamped, plain, strict=True):
        assert torch.equal(got["image"]["pixels"], want["image"].flip(-1))


def test_metadata_keeps_its_dtypes_through_workers(slide_folder: Path) -> None:
    ds = make(slide_folder, batch_size=8, samples_per_epoch=32)
    local = next(iter(ds))
    remote = next(iter(DataLoader(ds, batch_size=None, num_workers=1)))
    assert type(remote) is dict and list(remote) == list(local)
    for key, value in local.items():
        if isinstance(value, torch.Tensor):
            assert remote[key].dtype == value.dtype and torch.equal(remote[key], value), key
            assert key == "image" or not remote[key].is_shared(), key  # small tensors came inline
        else:
            assert remote[key] == value, key


def test_rings_of_finished_workers_are_unmapped(slide_folder: Path) -> None:
    loader = DataLoader(
        make(slide_folder, batch_size=8, samples_per_epoch=64), batch_size=None, num_workers=2
    )
    for _ in range(3):
        stream(loader)
    assert len(_batch_ring._MAPPED) <= 2  # this epoch's workers only


def test_transform_gets_the_whole_batch(slide_folder: Path) -> None:
    seen: list[tuple[int, ...]] = []

    def to_float(images: torch.Tensor) -> torch.Tensor:
        seen.append(tuple(images.shape))
        return images.float() / 255

    batch = next(iter(make(slide_folder, batch_size=16, transform=to_float)))
    assert seen == [(16, 3, 64, 64)] and batch["image"].dtype == torch.float32


class RaggedCollector(bst.RandomCropCollector):
    def extract_smallchunk(
        self, call_count: int, bigchunk: BigChunk, ctx: ChunkContext
    ) -> SmallChunk | None:
        small = super().extract_smallchunk(call_count, bigchunk, ctx)
        if small is not None and call_count % 2:
            small.data = small.data[:32]
        return small


def test_unequal_patch_shapes_are_refused(slide_folder: Path) -> None:
    with pytest.raises(bst.ExtractorError, match="batched mode needs equal patch shapes"):
        list(make(slide_folder, batch_size=16, collector=RaggedCollector(64)))


def test_bad_batch_size(slide_folder: Path) -> None:
    with pytest.raises(bst.ConfigError, match="batch_size must be an int >= 1, got 0"):
        make(slide_folder, batch_size=0)


def test_pixels_of_batched_mode_match_the_reader(slide_folder: Path) -> None:
    readers: dict[str, bst.SlideReader] = {}
    for batch in make(slide_folder, batch_size=16, samples_per_epoch=32):
        for i, pid in enumerate(batch["patient_id"]):
            reader = readers.setdefault(pid, bst.open_slide(slide_folder / f"{pid}.tiff"))
            expected = reader.read(int(batch["x"][i]), int(batch["y"][i]), 0, 64, 64)
            assert np.array_equal(batch["image"][i].permute(1, 2, 0).numpy(), expected)


def test_gpu_style_augmentation_on_a_uint8_batch(slide_folder: Path) -> None:
    """The fast pattern: uint8 batches leave the workers; conversion, normalisation and augmentation
    run on the whole batch on the device (here the CPU stands in for the GPU)."""
    from torchvision.transforms import v2

    augment = v2.Compose(
        [
            v2.RandomHorizontalFlip(p=1.0),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25]),
        ]
    )
    batch = next(
        iter(DataLoader(make(slide_folder, batch_size=16), batch_size=None, num_workers=2))
    )
    images = batch["image"]
    assert images.dtype == torch.uint8
    out = augment(images)
    assert out.shape == images.shape and out.dtype == torch.float32
    expected = (images.flip(-1).float() / 255 - 0.5) / 0.25
    assert torch.allclose(out, expected, atol=1e-5)


def test_slots_under_the_file_system_sharing_strategy(slide_folder: Path) -> None:
    import torch.multiprocessing as mp

    before = mp.get_sharing_strategy()
    mp.set_sharing_strategy("file_system")
    try:
        loader = DataLoader(
            make(slide_folder, batch_size=8, samples_per_epoch=96), batch_size=None, num_workers=2
        )
        got = stream(loader)
    finally:
        mp.set_sharing_strategy(before)
    per_sample = DataLoader(make(slide_folder, samples_per_epoch=96), batch_size=8, num_workers=2)
    assert got == flatten(list(per_sample)) and len(got) == 96


def test_transform_returning_views_of_the_slot_in_a_container(slide_folder: Path) -> None:
    """Views of the batch tensor inside a tuple are copied out before the slot is reused."""

    def split(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return images[:, :1], images[:, 1:, 8:-8]

    options: dict[str, Any] = dict(batch_size=8, samples_per_epoch=160)
    plain = list(DataLoader(make(slide_folder, **options), batch_size=None, num_workers=2))
    kept = list(
        DataLoader(
            make(slide_folder, transform=split, **options),
            batch_size=None,
            num_workers=2,
            worker_init_fn=two_slots,
        )
    )
    assert len(kept) == len(plain) == 20
    for got, want in zip(kept, plain, strict=True):
        first, rest = split(want["image"])
        assert torch.equal(got["image"][0], first) and torch.equal(got["image"][1], rest)


class KeepsPrevious:
    """A transform with memory: each batch is averaged with the previous input (kept, not copied)."""

    def __init__(self) -> None:
        self.previous: torch.Tensor | None = None

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        out = images if self.previous is None else (images // 2 + self.previous // 2)
        self.previous = images
        return out.clone()


def test_a_transform_may_keep_its_input(slide_folder: Path) -> None:
    options: dict[str, Any] = dict(batch_size=8, samples_per_epoch=160)
    plain = stream(DataLoader(make(slide_folder, **options), batch_size=None, num_workers=1))
    reference, transform = [], KeepsPrevious()
    for batch in DataLoader(make(slide_folder, **options), batch_size=None, num_workers=1):
        reference.extend(flatten([{**batch, "image": transform(batch["image"].clone())}]))
    assert plain != reference  # the transform changes something
    ds = make(slide_folder, transform=KeepsPrevious(), **options)
    assert stream(DataLoader(ds, batch_size=None, num_workers=1)) == reference


def test_only_the_receiving_process_releases_a_slot() -> None:
    control = np.ones(4, dtype=np.int32)
    _batch_ring._release(control, 2, receiver=os.getpid() + 1)  # e.g. a forked child's finalizer
    assert control.tolist() == [1, 1, 1, 1]
    _batch_ring._release(control, 2, receiver=os.getpid())
    assert control.tolist() == [1, 1, 0, 1]


def test_garbage_collected_in_a_forked_worker_does_not_free_a_live_slot(slide_folder: Path) -> None:
    import gc

    gc.disable()  # only to place the collection deterministically
    try:
        held = DataLoader(
            make(slide_folder, batch_size=8, samples_per_epoch=400),
            batch_size=None,
            num_workers=1,
            persistent_workers=True,
        )
        batches = iter(held)
        cycle: list[Any] = [next(batches)]
        cycle.append(cycle)  # a batch that is cyclic garbage, not collected yet
        del cycle
        # the forked child collects its copy
        other = DataLoader(
            make(slide_folder, batch_size=8, samples_per_epoch=16),
            batch_size=None,
            num_workers=1,
            worker_init_fn=lambda _: gc.collect(),
        )
        next(iter(other))
        kept = []
        for _ in range(3):
            batch = next(batches)
            kept.append((batch["image"].clone(), batch["image"]))
        gc.collect()  # the main process frees the cyclic batch for real
        for _ in range(10):
            batch = next(batches)
            kept.append((batch["image"].clone(), batch["image"]))
        assert all(torch.equal(copy, live) for copy, live in kept)
    finally:
        gc.enable()


def test_slots_of_finished_workers_are_unmapped_when_the_last_batch_goes(
    slide_folder: Path,
) -> None:
    import gc

    stream(
        DataLoader(
            make(slide_folder, batch_size=8, samples_per_epoch=64), batch_size=None, num_workers=2
        )
    )
    gc.collect()
    assert _batch_ring._MAPPED == {}


def test_deepcopy_and_pickling_inside_a_worker(slide_folder: Path) -> None:
    """User code in the worker may copy or pickle a batch; what reaches the main process is intact."""
    import copy
    import pickle

    class Wrapped(torch.utils.data.IterableDataset):  # type: ignore[type-arg]
        def __init__(self, inner: bst.BigSmallDataset, how: str) -> None:
            self.inner, self.how = inner, how

        def __iter__(self) -> Any:
            for batch in self.inner:
                yield (
                    copy.deepcopy(batch)
                    if self.how == "deepcopy"
                    else pickle.loads(pickle.dumps(batch))
                )

    options: dict[str, Any] = dict(batch_size=8, samples_per_epoch=96)
    reference = stream(DataLoader(make(slide_folder, **options), batch_size=None, num_workers=1))
    for how in ("deepcopy", "pickle"):
        loader = DataLoader(
            Wrapped(make(slide_folder, **options), how), batch_size=None, num_workers=1
        )
        assert stream(loader) == reference, how


def test_per_sample_batches_carry_their_metadata_inline(slide_folder: Path) -> None:
    """Per-sample mode: the collated batch keeps the sample's dict type, so its small tensors are
    pickled by value; the main process gets a plain dict equal to the one built without workers."""
    ds = make(slide_folder, samples_per_epoch=32)
    local = next(iter(DataLoader(ds, batch_size=16, num_workers=0)))
    remote = next(iter(DataLoader(ds, batch_size=16, num_workers=1)))
    assert isinstance(local, _batch_ring.InlineDict) and type(remote) is dict
    assert list(remote) == list(local)
    for key, value in local.items():
        if isinstance(value, torch.Tensor):
            assert remote[key].dtype == value.dtype and torch.equal(remote[key], value), key
            if key != "image":
                assert not remote[key].is_shared(), key  # came inline, not through shared memory
        else:
            assert remote[key] == value, key


@pytest.mark.parametrize("size", [64, 192])  # 12 KiB: sent inline; 110 KiB: copied out of the chunk
def test_single_samples_from_workers_carry_only_their_own_pixels(
    slide_folder: Path, size: int
) -> None:
    """A sample's image views its big chunk; sent alone it is copied, not the chunk rows it spans."""
    import pickle

    ds = make(slide_folder, samples_per_epoch=8, collector=bst.RandomCropCollector(size))
    sample = next(iter(ds))
    storage_bytes = sample["image"].untyped_storage().nbytes()
    assert storage_bytes > 2 * size * size * 3  # spans rows of the chunk
    remote = next(iter(DataLoader(ds, batch_size=None, num_workers=1)))
    assert remote["image"].untyped_storage().nbytes() == size * size * 3
    assert torch.equal(remote["image"], sample["image"]) and remote["x"] == sample["x"]
    again = pickle.loads(pickle.dumps(sample))
    assert (
        type(again) is dict
        and torch.equal(again["image"], sample["image"])
        and again["mpp"] == sample["mpp"]
    )


def pretend_an_accelerator(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the DataLoader believe an accelerator is present, so that it starts its pinning thread.

    The DataLoader asks ``torch.cuda`` up to torch 2.6 and ``torch.accelerator`` from 2.7 on (2.6
    has ``torch.accelerator`` but does not use it there), so both are faked, each function where this
    torch has it: the test runs the same path on every torch the package supports (>= 2.2)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: None)
    accelerator = getattr(torch, "accelerator", None)
    fakes: dict[str, Any] = {
        "is_available": lambda: True,
        "current_accelerator": lambda: None,  # "cpu-like": no device-specific pinning set-up
        "current_device_index": lambda: 0,
        "current_device_idx": lambda: 0,  # the torch 2.6 names
        "set_device_index": lambda index: None,
        "set_device_idx": lambda index: None,
    }
    for name, fake in fakes.items():
        if hasattr(accelerator, name):
            monkeypatch.setattr(accelerator, name, fake)


def test_the_pin_memory_thread_path(slide_folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With ``pin_memory=True`` the DataLoader unpickles batches in its pinning thread, copies them
    and drops the originals; slots then return to the workers even though every copy is kept. No
    accelerator here: the accelerator checks are faked and "pinning" is a plain copy (``copied``
    proves the pinning thread ran, on whichever torch API the DataLoader consulted)."""
    import torch.utils.data._utils.pin_memory as pinning

    pretend_an_accelerator(monkeypatch)
    copied: list[bool] = []

    def fake_pin(data: Any, device: Any = None) -> Any:
        if not isinstance(data, dict):  # the workers' end-of-stream markers
            return data
        copied.append(True)
        return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in data.items()}

    monkeypatch.setattr(pinning, "pin_memory", fake_pin)
    options: dict[str, Any] = dict(batch_size=8, samples_per_epoch=320)
    loader = DataLoader(
        make(slide_folder, **options), batch_size=None, num_workers=2, pin_memory=True
    )
    kept = list(loader)  # every (copied) batch is kept
    assert len(kept) == len(copied) == 40
    per_sample = DataLoader(make(slide_folder, samples_per_epoch=320), batch_size=8, num_workers=2)
    assert flatten(kept) == flatten(list(per_sample))
    # slots came back, not 16 + one-offs
    assert all(len(m.slots) <= 8 for m in _batch_ring._MAPPED.values())


class TypedCropCollector(bst.RandomCropCollector):
    """Random crops converted to ``dtype``, with values a uint8 slot would mangle."""

    def __init__(self, size: int, dtype: str) -> None:
        super().__init__(size)
        self.dtype = dtype

    def extract_smallchunk(
        self, call_count: int, bigchunk: BigChunk, ctx: ChunkContext
    ) -> SmallChunk | None:
        small = super().extract_smallchunk(call_count, bigchunk, ctx)
        if small is not None:
            small.data = convert(small.data, self.dtype)
        return small


def convert(data: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "float32":
        return data.astype(np.float32) / np.float32(255)  # in [0, 1]
    if dtype == "int32":
        return data.astype(np.int32) * 8_000_000 - 1_000_000_000  # wraps in uint8, negatives too
    return data.astype(np.uint16) * np.uint16(257)  # 0..65535, low byte == high byte


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("dtype", ["float32", "int32", "uint16"])
def test_batched_mode_keeps_the_patch_dtype(
    slide_folder: Path, dtype: str, num_workers: int
) -> None:
    """Batches hold the collector's dtype, exactly as per-sample mode does (no cast to uint8)."""
    collector = TypedCropCollector(64, dtype)
    options: dict[str, Any] = dict(samples_per_epoch=64, collector=collector)
    per_sample = list(
        DataLoader(make(slide_folder, **options), batch_size=16, num_workers=num_workers)
    )
    loader = DataLoader(
        make(slide_folder, batch_size=16, **options), batch_size=None, num_workers=num_workers
    )
    batched = list(loader)
    expected = getattr(torch, dtype)
    assert [b["image"].dtype for b in batched] == [expected] * 4
    assert per_sample[0]["image"].dtype == expected
    assert flatten(batched) == flatten(per_sample)
    images = torch.cat([b["image"] for b in batched])
    if dtype == "float32":
        assert images.min() >= 0 and images.max() <= 1 and ((images > 0) & (images < 1)).any()
    else:
        assert images.double().abs().max() > 255  # values that a uint8 batch could not hold
    assert stream(loader) == flatten(per_sample)  # again, each batch dropped: slots reused


class MixedDtypeCollector(bst.RandomCropCollector):
    def extract_smallchunk(
        self, call_count: int, bigchunk: BigChunk, ctx: ChunkContext
    ) -> SmallChunk | None:
        small = super().extract_smallchunk(call_count, bigchunk, ctx)
        if small is not None and call_count % 2:
            small.data = small.data.astype(np.uint16)
        return small


def test_mixed_dtypes_in_a_batch_are_refused(slide_folder: Path) -> None:
    with pytest.raises(bst.ExtractorError, match="dtype uint16 after uint8"):
        list(make(slide_folder, batch_size=16, collector=MixedDtypeCollector(64)))


def test_slots_hold_any_dtype_that_fits(monkeypatch: pytest.MonkeyPatch) -> None:
    """A slot is bytes: reused by a batch of the same size in bytes or of fewer bytes, resized when
    every free slot is too small."""
    monkeypatch.setattr(_batch_ring, "MAX_SLOTS", 2)
    ring = _batch_ring._Ring()

    def take(nbytes: int) -> tuple[int, int]:
        lease = ring.acquire(nbytes)
        assert lease is not None
        lease.give_back()
        return lease.slot, ring.storages[lease.slot].nbytes()

    assert take(4000) == (0, 4000)  # e.g. 1000 float32
    assert take(1000) == (0, 4000)  # 1000 uint8 fit in it
    assert take(8000) == (1, 8000)  # too big for slot 0: a new slot while there is room
    assert take(2000) == (0, 4000)  # the smallest slot that fits
    assert take(8000) == (1, 8000)  # the same size
    assert take(16000) == (0, 16000)  # no room left and none fits: a free one is resized


class PatchLabelCollector(bst.RandomCropCollector):
    """Crops whose info carries their own ``label`` (the x coordinate's parity)."""

    def extract_smallchunk(
        self, call_count: int, bigchunk: BigChunk, ctx: ChunkContext
    ) -> SmallChunk | None:
        small = super().extract_smallchunk(call_count, bigchunk, ctx)
        if small is not None:
            small.info["label"] = int(small.info["x"]) % 2
        return small


def test_a_label_in_info_wins_over_the_patients_and_mixed_labels_are_refused(slide_folder: Path) -> None:
    patients = [bst.Patient(p.id, p.records, label=9) for p in bst.Dataset.from_folder(slide_folder, pattern="*.tiff")]
    labelled = bst.Dataset("labelled", patients)
    options: dict[str, Any] = dict(buffer_size=3, smallchunks_per_bigchunk=16, samples_per_epoch=64, seed=7)

    def build(dataset: bst.Dataset, collector: Any, **extra: Any) -> bst.BigSmallDataset:
        return bst.BigSmallDataset(dataset, bst.RandomRegionLoader(512), collector, **options, **extra)

    per_sample = list(DataLoader(build(labelled, PatchLabelCollector(64)), batch_size=16))
    batched = list(DataLoader(build(labelled, PatchLabelCollector(64), batch_size=16), batch_size=None))
    for a, b in zip(per_sample, batched, strict=True):  # as a sample dict: info's label replaces the patient's
        assert torch.equal(a["label"], b["label"]) and torch.equal(b["label"], b["x"] % 2)
    # Some patients labelled, some not, in one batch: a clear error, not a batch without labels.
    mixed = bst.Dataset("mixed", [bst.Patient(p.id, p.records, label=i % 2 or None) for i, p in enumerate(patients)])
    with pytest.raises(bst.ExtractorError, match="mixes patients with and without a label"):
        list(DataLoader(build(mixed, bst.RandomCropCollector(64), batch_size=16), batch_size=None))


# -- per-sample mode: the DataLoader's default_collate into the worker's slots ------------------


def torch_collate(batch: list[dict[str, Any]]) -> Any:
    """torch's own ``default_collate`` (fresh shared memory per tensor), on plain dicts so that the
    package's ``collate_samples`` is not used."""
    return default_collate([dict(sample) for sample in batch])


def assert_same_batch(ours: dict[str, Any], theirs: dict[str, Any]) -> None:
    assert isinstance(ours, dict) and list(ours) == list(theirs)
    for key, value in theirs.items():
        if isinstance(value, torch.Tensor):
            got = ours[key]
            assert isinstance(got, torch.Tensor), key
            assert (got.dtype, got.shape) == (value.dtype, value.shape), key
            assert got.is_contiguous() and torch.equal(got, value), key
        else:
            assert ours[key] == value, key


@pytest.mark.parametrize("num_workers", [0, 2])
def test_per_sample_batches_are_torch_default_collate(slide_folder: Path, num_workers: int) -> None:
    ours = list(DataLoader(make(slide_folder), batch_size=32, num_workers=num_workers))
    loader = DataLoader(make(slide_folder), batch_size=32, num_workers=num_workers, collate_fn=torch_collate)
    theirs = list(loader)
    assert len(ours) == len(theirs) == 8
    for a, b in zip(ours, theirs, strict=True):
        assert_same_batch(a, b)
    assert theirs[0]["image"].is_shared() == (num_workers > 0)  # torch's path: a segment per batch


def test_per_sample_batches_reuse_the_workers_slots(slide_folder: Path) -> None:
    loader = DataLoader(make(slide_folder, samples_per_epoch=320), batch_size=8, num_workers=2)
    before, addresses, got, rings = set(_batch_ring._MAPPED), [], [], {}
    for batch in loader:
        addresses.append(batch["image"].data_ptr())
        got.extend(flatten([batch]))
        rings.update(new_rings(before))  # while the workers run (their rings are unmapped after)
        del batch  # hands the slot back
    assert len(addresses) == 40 and len(set(addresses)) <= 2 * 8  # a few slots, not 40 segments
    assert len(rings) == 2  # both workers' rings reached the main process
    reference = DataLoader(make(slide_folder, samples_per_epoch=320), batch_size=8, num_workers=2,
                           collate_fn=torch_collate)  # fmt: skip
    assert got == flatten(list(reference))


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_kept_per_sample_batches_are_never_overwritten(slide_folder: Path, context: str) -> None:
    """The collate is registered in spawned workers too, and keeping every batch (more than the
    slots) gives later batches memory of their own."""
    loader = DataLoader(make(slide_folder, samples_per_epoch=160), batch_size=8, num_workers=2,
                        worker_init_fn=two_slots, multiprocessing_context=context)  # fmt: skip
    before, kept, rings = set(_batch_ring._MAPPED), [], {}
    for batch in loader:
        kept.append(batch)
        rings.update(new_rings(before))
    assert len(rings) == 2 and all(set(m.slots) == {0, 1} for m in rings.values())
    assert len({b["image"].data_ptr() for b in kept}) == 20
    reference = DataLoader(make(slide_folder, samples_per_epoch=160), batch_size=8, num_workers=2,
                           collate_fn=torch_collate)  # fmt: skip
    assert flatten(kept) == flatten(list(reference))


class Samples(IterableDataset[Any]):
    """Yields the given samples as the package's sample dicts (``InlineDict``)."""

    def __init__(self, samples: list[dict[str, Any]]) -> None:
        self.samples = samples

    def __iter__(self) -> Any:
        return (InlineDict(sample) for sample in self.samples)


def _image(value: int, size: int = 8) -> torch.Tensor:
    return torch.full((3, size, size), value, dtype=torch.uint8)


def _both(samples: list[dict[str, Any]]) -> tuple[Any, Any]:
    """One batch of ``samples`` collated in a worker by the package and by torch: each the batch,
    or the exception raised."""
    results = []
    for collate_fn in (None, torch_collate):
        loader = DataLoader(Samples(samples), batch_size=len(samples), num_workers=1,
                            **({} if collate_fn is None else {"collate_fn": collate_fn}))  # fmt: skip
        try:
            results.append(next(iter(loader)))
        except Exception as exc:  # compared below
            results.append(exc)
    return results[0], results[1]


@pytest.mark.parametrize(
    "case",
    ["mixed sizes", "numpy images", "mixed mask dtypes", "a sample without mask", "masks and extras",
     "a tensor with grad"],
)
def test_collate_samples_is_default_collate_for_any_samples(case: str) -> None:
    mask = torch.ones(8, 8, dtype=torch.uint8)
    samples = {
        "mixed sizes": [{"image": _image(1)}, {"image": _image(2, size=9)}],
        "numpy images": [{"image": _image(i).numpy(), "x": i} for i in range(3)],
        "mixed mask dtypes": [{"image": _image(i), "mask": mask.to(dtype)} for i, dtype in
                              enumerate([torch.uint8, torch.int64])],
        "a sample without mask": [{"image": _image(1), "mask": mask}, {"image": _image(2)}],
        "masks and extras": [
            {"image": _image(i), "mask": mask * i, "x": i, "name": f"s{i}", "mpp": 0.5,
             "scores": torch.arange(4.0) + i}
            for i in range(4)
        ],
        "a tensor with grad": [{"image": _image(i), "w": torch.zeros(2, requires_grad=True)} for i in range(2)],
    }[case]  # fmt: skip
    ours, theirs = _both(samples)
    if isinstance(theirs, Exception):
        assert type(ours) is type(theirs) and str(theirs).splitlines()[-1] in str(ours)
    else:
        assert not isinstance(ours, Exception), ours
        assert list(ours) == list(theirs)
        for key, value in theirs.items():
            if isinstance(value, torch.Tensor):
                assert ours[key].dtype == value.dtype and torch.equal(ours[key].detach(), value.detach())
            else:
                assert ours[key] == value


def test_collate_samples_outside_a_worker_is_default_collate() -> None:
    samples = [InlineDict(image=_image(i), mask=torch.full((8, 8), i, dtype=torch.uint8), x=i) for i in range(3)]
    batch = default_collate(samples)  # registered: torch's default_collate calls collate_samples
    assert type(batch) is InlineDict and not batch["image"].is_shared()
    assert_same_batch(dict(batch), torch_collate(samples))
    assert_same_batch(dict(collate_samples(samples)), torch_collate(samples))


def repackaged(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """A user collate wrapping ``default_collate``: the slot's image leaves as a plain tensor, and
    the batch that held its slot is dropped in the worker."""
    images = default_collate(batch)["image"]
    ring = _batch_ring._RING
    return {"image": images, "held": int((ring.flags != 0).sum()) if ring is not None else -1}


def test_a_repackaged_batch_lets_its_slot_go_and_is_never_overwritten(slide_folder: Path) -> None:
    kept = list(DataLoader(make(slide_folder, samples_per_epoch=8 * 40), batch_size=8, num_workers=2,
                           collate_fn=repackaged))  # fmt: skip
    reference = DataLoader(make(slide_folder, samples_per_epoch=8 * 40), batch_size=8, num_workers=2,
                           collate_fn=torch_collate)  # fmt: skip
    assert len(kept) == 40
    for ours, theirs in zip(kept, reference, strict=True):
        assert torch.equal(ours["image"], theirs["image"])  # kept batches were never written over
    # Each dropped batch's slot is let go (given a new buffer), not held for good: the ring never
    # has more than the batch being built and the one before it taken.
    assert 1 <= max(b["held"] for b in kept) <= 2


def with_a_crop(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """A user collate adding a view of the slot's images to the batch."""
    collated = default_collate(batch)
    collated["crop"] = collated["image"][..., 8:-8, 8:-8]
    return collated


def test_other_views_of_the_slot_leave_it_with_their_batch(slide_folder: Path) -> None:
    """Keeping only an entry that viewed the slot in the worker (the batch, and with it the slot,
    is dropped at once) must keep its values: it travels as a copy of its own."""
    crops = [b["crop"] for b in DataLoader(make(slide_folder, samples_per_epoch=16 * 40), batch_size=16,
                                            num_workers=2, collate_fn=with_a_crop)]  # fmt: skip
    reference = DataLoader(make(slide_folder, samples_per_epoch=16 * 40), batch_size=16, num_workers=2,
                           collate_fn=torch_collate)  # fmt: skip
    assert len(crops) == 40
    for crop, theirs in zip(crops, reference, strict=True):
        assert torch.equal(crop, theirs["image"][..., 8:-8, 8:-8])
