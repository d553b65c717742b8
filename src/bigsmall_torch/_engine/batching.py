"""Batches assembled inside the worker, in its reusable shared-memory slots.

Batched mode: crops are written straight into one batch tensor, of the crops' own dtype, that in a
DataLoader worker is a reusable shared-memory slot (:mod:`~bigsmall_torch._engine.batch_ring`), so
handing it to the main process copies nothing; metadata becomes small tensors. Used with
``DataLoader(dataset, batch_size=None)``.

Per-sample mode: the DataLoader's own ``default_collate`` batches the samples. Torch stacks each
tensor of a batch into a fresh shared-memory segment in the worker, whose pages cost more than the
copy itself (about 130 us per 224 x 224 RGB image and 45 us per mask on the 2-core VM of the
benchmarks, against 15 and 5 us into reused memory). :func:`collate_samples` is registered in
torch's ``default_collate_fn_map`` (the extension point ``default_collate`` documents) for the
package's sample dicts only: it returns the batch ``default_collate`` would, with the images and the
other per-sample arrays stacked into one of the worker's slots.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import default_collate, get_worker_info
from torch.utils.data._utils.collate import collate, default_collate_fn_map

from ..chunks import SmallChunk, WindowRun, image_array
from ..errors import ExtractorError
from ..io._tiles import TiledRegion
from .batch_ring import InlineDict, RingBatch, _Lease, acquire_images
from .sharding import split_evenly

__all__ = ["BatchBuilder", "batch_count", "batched_quota", "collate_samples"]


def batch_count(total: int, batch_size: int) -> int:
    """Batches of an epoch of ``total`` samples (the last one may be partial)."""
    return math.ceil(total / batch_size)


def batched_quota(total: int, batch_size: int, num_workers: int, worker: int) -> int:
    """Samples worker ``worker`` yields when ``total`` samples are dealt to workers in whole batches.

    The ``ceil(total / batch_size)`` batches are split as evenly as possible over the workers; the one
    partial batch (if any) belongs to the worker whose batch the DataLoader returns last (it takes
    workers' batches in turn), so every worker's other batches are full.
    """
    batches = batch_count(total, batch_size)
    mine = split_evenly(batches, num_workers, worker)
    samples = mine * batch_size
    if total % batch_size and worker == (batches - 1) % num_workers:
        samples -= batch_size - total % batch_size
    return samples


def _torch_dtype(dtype: np.dtype[Any]) -> torch.dtype:
    """The torch dtype of a patch's numpy ``dtype``, or :class:`ExtractorError` when torch has none."""
    try:
        return torch.from_numpy(np.empty(0, dtype=dtype)).dtype
    except (TypeError, ValueError) as exc:  # no such torch dtype, or a non-native byte order
        raise ExtractorError(
            f"batched mode cannot hold patches of dtype {dtype}: {exc}; have the collector return "
            "a dtype torch supports, in native byte order"
        ) from exc


def _plane(value: Any) -> bool:
    """Whether a sample's info value travels in the batch's slot: a CPU tensor of at least one
    dimension that numpy can hold (no bfloat16, no autograd); anything else is collated."""
    if not isinstance(value, torch.Tensor) or value.ndim < 1 or value.device.type != "cpu":
        return False
    if value.requires_grad:
        return False
    try:
        value[:0].numpy()
    except (TypeError, RuntimeError):
        return False
    return True


def _missing(key: str) -> str:
    if key == "label":
        return (
            "batched mode needs 'label' in every sample of a batch or in none: a batch mixes "
            "patients with and without a label; give every patient a label (or None to all)"
        )
    return f"batched mode needs {key!r} in every sample of a batch"


class BatchBuilder:
    """Collects up to ``batch_size`` small chunks into one batch dict.

    The batch's images keep the dtype of the first small chunk's data; a later small chunk of another
    dtype is refused (:class:`~bigsmall_torch.ExtractorError`), never cast. ``channels_last``: the
    ``[n, C, H, W]`` images are stored ``n, H, W, C`` (torch's ``channels_last`` memory format), so
    HWC patches are copied as they are instead of transposed.
    """

    def __init__(self, batch_size: int, *, channels_last: bool = False) -> None:
        self.batch_size = batch_size
        self.channels_last = channels_last
        self._images: torch.Tensor | None = None
        self._lease: _Lease | None = None
        self._array: np.ndarray | None = None
        self._count = 0
        # The metadata as columns (key -> one value per sample so far), collated by build().
        self._columns: dict[str, list[Any]] = {}
        # Array-valued info (a tensor per sample, e.g. "mask"): written into the batch's slot
        # beside the images instead of being collated (which would allocate shared memory per batch).
        self._planes: dict[str, torch.Tensor] = {}
        self._plane_arrays: dict[str, np.ndarray] = {}

    def __len__(self) -> int:
        return self._count

    def _stored(self, data: np.ndarray) -> np.ndarray:
        """A patch as the slot stores it (CHW, or HWC when channels-last)."""
        if self.channels_last:
            return data if data.ndim == 3 else data[..., None]
        return data.transpose(2, 0, 1) if data.ndim == 3 else data[None]

    def _check(self, small: SmallChunk) -> np.ndarray:
        """The first sample sizes the batch's slot; later ones must agree with it."""
        patch = self._stored(image_array(small))
        if self._array is None:
            planes = {
                key: ((self.batch_size, *value.shape), value.dtype)
                for key, value in small.info.items()
                if _plane(value)
            }
            stored, self._planes, self._lease = acquire_images(
                (self.batch_size, *patch.shape), _torch_dtype(patch.dtype), planes
            )
            self._array = stored.numpy()
            self._images = stored.permute(0, 3, 1, 2) if self.channels_last else stored
            if self._lease is not None:
                self._lease.tensor = self._images
            self._plane_arrays = {key: plane.numpy() for key, plane in self._planes.items()}
        elif patch.shape != self._array.shape[1:]:
            raise ExtractorError(
                f"batched mode needs equal patch shapes: got {patch.shape} after {self._array.shape[1:]} "
                f"({'HWC' if self.channels_last else 'CHW'}); use per-sample mode for patches of varying size"
            )
        elif patch.dtype != self._array.dtype:
            raise ExtractorError(
                f"batched mode needs one dtype per batch: got a patch of dtype {patch.dtype} after "
                f"{self._array.dtype}; have the collector return one dtype, or use per-sample mode"
            )
        return patch

    def _column(self, key: str) -> list[Any]:
        column = self._columns.get(key)
        if column is None:
            if self._count:  # absent from the samples before
                raise ExtractorError(_missing(key))
            column = self._columns[key] = []
        return column

    def add(self, small: SmallChunk) -> None:
        patch = self._check(small)
        assert self._array is not None
        i = self._count
        self._array[i] = patch
        self._column("patient_id").append(small.patient.id)
        if small.patient.label is not None and "label" not in small.info:  # info's own wins
            self._column("label").append(small.patient.label)
        for key, value in small.info.items():
            plane = self._plane_arrays.get(key)
            if plane is None:
                self._column(key).append(value)
            elif not isinstance(value, torch.Tensor) or tuple(value.shape) != plane.shape[1:] or (
                value.dtype != self._planes[key].dtype
            ):
                raise ExtractorError(
                    f"batched mode needs {key!r} of one shape and dtype per batch: got "
                    f"{getattr(value, 'dtype', type(value).__name__)} {tuple(getattr(value, 'shape', ()))} "
                    f"after {self._planes[key].dtype} {plane.shape[1:]}"
                )
            else:
                plane[i] = value.numpy()
        missing = self._planes.keys() - small.info.keys()
        if missing:
            raise ExtractorError(f"batched mode needs {sorted(missing)} in every sample of a batch")
        self._count += 1

    def add_run(self, run: WindowRun, lo: int, hi: int) -> None:
        """Samples ``lo..hi`` of ``run``: the same batch as ``add(run.small(k))`` for each, without
        a :class:`SmallChunk` per sample."""
        self._check(run.small(lo, pixels=False))  # sizes the slot; the pixels are copied below
        assert self._array is not None and run.data.ndim == 3
        if set(self._planes) != ({"mask"} if run.labels is not None else set()):
            raise ExtractorError(f"batched mode needs {sorted(self._planes)} in every sample of a batch")
        i0, (width, height) = self._count, run.size
        out, places = self._array, list(zip(run.tops[lo:hi].tolist(), run.lefts[lo:hi].tolist(), strict=True))
        if isinstance(run.data, TiledRegion):  # each window straight from the tiles it touches
            for i, (top, left) in enumerate(places, start=i0):
                run.data.copy_to(out[i] if self.channels_last else out[i].transpose(1, 2, 0), top, left)
        else:
            source = run.data if self.channels_last else run.data.transpose(2, 0, 1)
            for i, (top, left) in enumerate(places, start=i0):
                if self.channels_last:
                    out[i] = source[top : top + height, left : left + width]
                else:
                    out[i] = source[:, top : top + height, left : left + width]
        n = hi - lo
        self._column("patient_id").extend([run.patient.id] * n)
        if run.patient.label is not None and "label" not in run.info:
            self._column("label").extend([run.patient.label] * n)
        for key in run.info:
            self._column(key).extend(run.column(key, lo, hi))
        if "mask" in self._plane_arrays:  # the run's labels, cut as small() cuts them
            assert run.labels is not None
            plane = self._plane_arrays["mask"]
            for i, (top, left) in enumerate(places, start=i0):
                plane[i] = run.labels[top : top + height, left : left + width]
        self._count += n

    def build(self) -> dict[str, Any]:
        """The batch (``image`` [n, C, H, W] of the patches' dtype, the array-valued info as
        ``[n, ...]`` tensors, plus collated metadata); resets the builder."""
        assert self._images is not None, "build() on an empty BatchBuilder"
        n = self._count
        full = n == self.batch_size
        images = self._images if full else self._images[:n]
        batch: dict[str, Any] = {"image": images}
        for key, column in self._columns.items():
            if len(column) != n:
                raise ExtractorError(_missing(key))
            batch[key] = default_collate(column)
        planes = {key: plane if full else plane[:n] for key, plane in self._planes.items()}
        batch.update(planes)
        if torch.utils.data.get_worker_info() is not None:  # to be pickled to the main process
            if self._lease is not None:
                self._lease.tensor = images
                self._lease.planes = {
                    key: (offset, planes[key]) for key, (offset, _) in self._lease.planes.items()
                }
            batch = RingBatch(batch, self._lease)
        self._planes, self._plane_arrays, self._columns, self._count = {}, {}, {}, 0
        self._images, self._lease, self._array = None, None, None
        return batch


def _stackable(batch: Sequence[Mapping[str, Any]], key: str) -> bool:
    """Whether every sample's ``key`` is a tensor the slot can hold, of one shape and dtype."""
    first = batch[0][key]
    if not _plane(first):
        return False
    shape, dtype = first.shape, first.dtype
    for sample in batch[1:]:
        value = sample.get(key)
        if not (
            isinstance(value, torch.Tensor)
            and value.shape == shape
            and value.dtype == dtype
            and value.device.type == "cpu"
            and value.layout == torch.strided
            and not value.requires_grad
        ):
            return False
    return True


def collate_samples(
    batch: Sequence[Mapping[str, Any]],
    *,
    collate_fn_map: dict[type | tuple[type, ...], Callable[..., Any]] | None = None,
) -> dict[str, Any]:
    """``default_collate`` of a list of the package's sample dicts: the same batch (keys in the first
    sample's order, every value collated as ``default_collate`` does), whose ``image`` and other
    per-sample tensors of one shape and dtype (``"mask"``...) are, in a DataLoader worker, stacked
    into one of the worker's reusable shared-memory slots instead of a fresh segment per tensor.

    Anything else (not in a worker, an ``image`` that is not such a tensor, samples that disagree)
    is collated exactly as ``default_collate`` collates a mapping, errors included.
    """
    if collate_fn_map is None:
        collate_fn_map = default_collate_fn_map
    elem = batch[0]
    keys = [key for key in elem if _stackable(batch, key)] if get_worker_info() is not None else []
    if "image" not in keys:
        clone = copy.copy(elem)
        clone.update({key: collate([d[key] for d in batch], collate_fn_map=collate_fn_map) for key in elem})  # type: ignore[attr-defined]
        return clone  # type: ignore[return-value]
    n, image = len(batch), elem["image"]
    planes = {key: ((n, *elem[key].shape), elem[key].dtype) for key in keys if key != "image"}
    images, stacked, lease = acquire_images((n, *image.shape), image.dtype, planes)
    try:
        torch.stack([d["image"] for d in batch], 0, out=images)
        for key, out in stacked.items():
            torch.stack([d[key] for d in batch], 0, out=out)
        items = {
            key: images if key == "image" else stacked[key] if key in stacked
            else collate([d[key] for d in batch], collate_fn_map=collate_fn_map)
            for key in elem
        }  # fmt: skip
    except BaseException:
        if lease is not None:  # the batch never left: the slot is free again
            lease.tensor, lease.planes = None, {}
            lease.give_back()
        raise
    return RingBatch(items, lease)


default_collate_fn_map[InlineDict] = collate_samples
