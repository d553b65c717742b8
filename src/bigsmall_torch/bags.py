"""Feature bags for multiple-instance learning: the files :func:`~bigsmall_torch.extract_features`
wrote, one item per slide, as a plain map-style dataset."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset as TorchDataset

from .data import Dataset
from .errors import ConfigError, DatasetError
from .features import _h5py, feature_path, is_complete

__all__ = ["FeatureBagDataset", "read_bag"]


def read_bag(path: str | os.PathLike[str]) -> dict[str, Any]:
    """``features`` (``[N, D]`` as stored), ``coords`` (``[N, 2]`` level-0 x, y) and the file's
    attributes of one bag, as numpy arrays and plain values."""
    with _h5py().File(path, "r") as f:
        return {
            "features": f["features"][()],
            "coords": f["coords"][()],
            "attrs": {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in f.attrs.items()},
        }


class FeatureBagDataset(TorchDataset[dict[str, Any]]):
    """One item per slide: ``features`` (float32 ``[N, D]``), ``coords`` (int64 ``[N, 2]``), the
    patient's ``label`` and ``patient_id``.

    Args:
        out_dir: where :func:`~bigsmall_torch.extract_features` wrote the bags.
        dataset: the patients (their order is the items' order; labels come from them).
        max_instances: draw at most this many instances of each bag, without replacement, anew
            each epoch (:meth:`set_epoch`) from ``seed``; None: every instance, in file order.
        seed: of the subsampling.
        missing: ``"raise"`` (default): a patient without a finished bag is a
            :class:`~bigsmall_torch.DatasetError` at construction naming them; ``"skip"``: left out
            (listed in :attr:`missing`).

    Bags differ in size, so use ``DataLoader(ds, batch_size=1)`` (or ``max_instances`` with bags at
    least that large) as CLAM- and TRIDENT-style MIL code does.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike[str],
        dataset: Dataset,
        *,
        max_instances: int | None = None,
        seed: int = 0,
        missing: str = "raise",
    ) -> None:
        if not isinstance(dataset, Dataset):
            raise ConfigError(f"FeatureBagDataset: dataset must be a bigsmall_torch.Dataset, got {dataset!r}")
        if max_instances is not None and (isinstance(max_instances, bool) or not isinstance(max_instances, int) or max_instances < 1):
            raise ConfigError(f"FeatureBagDataset: max_instances must be None or an int >= 1, got {max_instances!r}")
        if missing not in ("raise", "skip"):
            raise ConfigError(f"FeatureBagDataset: missing must be 'raise' or 'skip', got {missing!r}")
        self.out_dir = Path(out_dir)
        self.max_instances, self.seed, self.epoch = max_instances, int(seed), 0
        found = [(p, feature_path(self.out_dir, p.id)) for p in dataset.patients]
        self.missing = [p.id for p, path in found if not is_complete(path)]
        if self.missing and missing == "raise":
            raise DatasetError(
                f"FeatureBagDataset: {len(self.missing)} of {len(found)} patients have no finished bag "
                f"in {self.out_dir} ({', '.join(map(repr, self.missing[:5]))}{', ...' if len(self.missing) > 5 else ''}); "
                "run extract_features, or pass missing='skip'"
            )
        absent = set(self.missing)
        self.items = [(p, path) for p, path in found if p.id not in absent]

    def set_epoch(self, epoch: int) -> None:
        """Draw other instances in epoch ``epoch`` (with ``max_instances``)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        patient, path = self.items[index]
        with _h5py().File(path, "r") as f:
            n = f["features"].shape[0]
            if self.max_instances is not None and n > self.max_instances:
                rng = np.random.default_rng(np.random.SeedSequence([self.seed, self.epoch, index]))
                rows = np.sort(rng.choice(n, self.max_instances, replace=False))
                features, coords = f["features"][rows], f["coords"][rows]
            else:
                features, coords = f["features"][()], f["coords"][()]
        item: dict[str, Any] = {
            "features": torch.from_numpy(np.asarray(features, dtype=np.float32)),
            "coords": torch.from_numpy(np.asarray(coords, dtype=np.int64)),
            "patient_id": patient.id,
        }
        if patient.label is not None:
            item["label"] = patient.label
        return item

    def __repr__(self) -> str:
        return f"FeatureBagDataset({str(self.out_dir)!r}, bags={len(self)}, max_instances={self.max_instances})"
