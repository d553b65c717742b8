"""Batched mode: whole batches assembled inside the worker.

Crops are written straight into one batch tensor, of the crops' own dtype, that in a DataLoader
worker is a reusable shared-memory slot (:mod:`~bigsmall_torch._engine.batch_ring`), so handing it to the
main process copies nothing; metadata becomes small tensors. Used with
``DataLoader(dataset, batch_size=None)``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch.utils.data import default_collate

from ..chunks import SmallChunk, image_array
from ..errors import ExtractorError
from .batch_ring import RingBatch, _Lease, acquire_images
from .sharding import split_evenly

__all__ = ["BatchBuilder", "batch_count", "batched_quota"]


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


class BatchBuilder:
    """Collects up to ``batch_size`` small chunks into one batch dict.

    The batch's images keep the dtype of the first small chunk's data; a later small chunk of another
    dtype is refused (:class:`~bigsmall_torch.ExtractorError`), never cast.
    """

    def __init__(self, batch_size: int) -> None:
        self.batch_size = batch_size
        self._images: torch.Tensor | None = None
        self._lease: _Lease | None = None
        self._array: np.ndarray | None = None
        self._meta: list[dict[str, Any]] = []
        # Array-valued info (a tensor per sample, e.g. "mask"): written into the batch's slot
        # beside the images instead of being collated (which would allocate shared memory per batch).
        self._planes: dict[str, torch.Tensor] = {}
        self._plane_arrays: dict[str, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self._meta)

    def add(self, small: SmallChunk) -> None:
        data = image_array(small)
        chw = data.transpose(2, 0, 1) if data.ndim == 3 else data[None]
        if self._array is None:
            planes = {
                key: ((self.batch_size, *value.shape), value.dtype)
                for key, value in small.info.items()
                if _plane(value)
            }
            self._images, self._planes, self._lease = acquire_images(
                (self.batch_size, *chw.shape), _torch_dtype(chw.dtype), planes
            )
            self._array = self._images.numpy()
            self._plane_arrays = {key: plane.numpy() for key, plane in self._planes.items()}
        elif chw.shape != self._array.shape[1:]:
            raise ExtractorError(
                f"batched mode needs equal patch shapes: got {chw.shape} after {self._array.shape[1:]} "
                "(CHW); use per-sample mode for patches of varying size"
            )
        elif chw.dtype != self._array.dtype:
            raise ExtractorError(
                f"batched mode needs one dtype per batch: got a patch of dtype {chw.dtype} after "
                f"{self._array.dtype}; have the collector return one dtype, or use per-sample mode"
            )
        i = len(self._meta)
        self._array[i] = chw
        meta: dict[str, Any] = {"patient_id": small.patient.id}
        if small.patient.label is not None:
            meta["label"] = small.patient.label
        for key, value in small.info.items():
            plane = self._plane_arrays.get(key)
            if plane is None:
                meta[key] = value
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
        self._meta.append(meta)

    def build(self) -> dict[str, Any]:
        """The batch (``image`` [n, C, H, W] of the patches' dtype, the array-valued info as
        ``[n, ...]`` tensors, plus collated metadata); resets the builder."""
        assert self._images is not None, "build() on an empty BatchBuilder"
        n = len(self._meta)
        full = n == self.batch_size
        images = self._images if full else self._images[:n]
        batch: dict[str, Any] = {"image": images}
        for key in self._meta[0]:
            batch[key] = default_collate([m[key] for m in self._meta])
        planes = {key: plane if full else plane[:n] for key, plane in self._planes.items()}
        batch.update(planes)
        if torch.utils.data.get_worker_info() is not None:  # to be pickled to the main process
            if self._lease is not None:
                self._lease.tensor = images
                self._lease.planes = {
                    key: (offset, planes[key]) for key, (offset, _) in self._lease.planes.items()
                }
            batch = RingBatch(batch, self._lease)
        self._planes, self._plane_arrays = {}, {}
        self._images, self._lease, self._array, self._meta = None, None, None, []
        return batch
