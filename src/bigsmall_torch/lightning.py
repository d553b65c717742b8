"""PyTorch Lightning: ``BigSmallDataModule`` (the ``[lightning]`` extra).

The training stream comes from a :class:`~bigsmall_torch.BigSmallDataset` whose epoch follows the
trainer's (``set_epoch`` is called on every new epoch, reaching persistent workers); validation and
test come from fixed, reproducible datasets (a ``BigSmallDataset`` that is never advanced to another
epoch, or a :class:`~bigsmall_torch.SlidingWindowDataset`); prediction from a ``SlidingWindowDataset``.
Sharding over ranks and workers is the datasets' own: a ``DistributedSampler`` is never used (Lightning
does not inject one into iterable datasets), and every rank gets the same number of batches.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch.utils.data import DataLoader, IterableDataset

from .dataset import BigSmallDataset
from .errors import ConfigError, MissingDependencyError
from .inference.sliding import SlidingWindowDataset

try:
    import lightning.pytorch as pl
except ImportError as exc:  # pragma: no cover - exercised by the import test
    raise MissingDependencyError(
        "bigsmall_torch.lightning needs Lightning: pip install 'bigsmall-torch[lightning]'"
    ) from exc

__all__ = ["BigSmallDataModule", "EpochDataLoader"]

_Eval = BigSmallDataset | SlidingWindowDataset


class EpochDataLoader(DataLoader[Any]):
    """A DataLoader that calls ``dataset.set_epoch(epoch())`` each time an epoch starts."""

    def __init__(self, dataset: BigSmallDataset, *, epoch: Callable[[], int], **kwargs: Any) -> None:
        super().__init__(dataset, **kwargs)
        self._epoch_of = epoch

    def __iter__(self) -> Any:
        dataset = self.dataset
        assert isinstance(dataset, BigSmallDataset)
        dataset.set_epoch(self._epoch_of())
        return super().__iter__()


class BigSmallDataModule(pl.LightningDataModule):
    """Lightning data module over bigsmall_torch datasets.

    Args:
        train: the training stream (its ``samples_per_epoch`` sets the epoch length).
        val, test: fixed evaluation sets: a ``BigSmallDataset`` (never advanced: the same samples at
            every validation) or a ``SlidingWindowDataset``.
        predict: a ``SlidingWindowDataset`` for ``trainer.predict``.
        batch_size: samples per batch (ignored for datasets in batched mode, which batch themselves).
        num_workers, pin_memory, persistent_workers: DataLoader settings shared by all loaders
            (``persistent_workers`` defaults to ``num_workers > 0``).
        loader_kwargs: more DataLoader keyword arguments.
    """

    def __init__(
        self,
        train: BigSmallDataset | None = None,
        *,
        val: _Eval | None = None,
        test: _Eval | None = None,
        predict: SlidingWindowDataset | None = None,
        batch_size: int = 64,
        num_workers: int = 2,
        pin_memory: bool = False,
        persistent_workers: bool | None = None,
        **loader_kwargs: Any,
    ) -> None:
        super().__init__()
        for name, value, allowed in (
            ("train", train, (BigSmallDataset,)),
            ("val", val, (BigSmallDataset, SlidingWindowDataset)),
            ("test", test, (BigSmallDataset, SlidingWindowDataset)),
            ("predict", predict, (SlidingWindowDataset,)),
        ):
            if value is not None and not isinstance(value, allowed):
                names = " or ".join(t.__name__ for t in allowed)
                raise ConfigError(f"BigSmallDataModule: {name} must be a {names}, got {type(value).__name__}")
        if train is not None and train.samples_per_epoch is None:
            raise ConfigError(
                "BigSmallDataModule: train needs samples_per_epoch (an endless stream has no epochs)"
            )
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"BigSmallDataModule: batch_size must be an int >= 1, got {batch_size!r}")
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ConfigError(f"BigSmallDataModule: num_workers must be an int >= 0, got {num_workers!r}")
        self.train, self.val, self.test, self.predict = train, val, test, predict
        self.batch_size = batch_size
        self.loader_kwargs = {
            "num_workers": num_workers,
            "pin_memory": pin_memory,
            "persistent_workers": num_workers > 0 if persistent_workers is None else persistent_workers,
            **loader_kwargs,
        }

    def _kwargs(self, dataset: IterableDataset[Any]) -> dict[str, Any]:
        batched = getattr(dataset, "batch_size", None) is not None
        kwargs = dict(self.loader_kwargs)
        if kwargs["num_workers"] == 0:
            kwargs["persistent_workers"] = False
        return {"batch_size": None if batched else self.batch_size, **kwargs}

    def _epoch(self) -> int:
        trainer = getattr(self, "trainer", None)
        return int(trainer.current_epoch) if trainer is not None else 0

    def _need(self, dataset: Any, name: str) -> Any:
        if dataset is None:
            raise ConfigError(f"BigSmallDataModule: no {name} dataset was given")
        return dataset

    def train_dataloader(self) -> EpochDataLoader:
        train = self._need(self.train, "train")
        return EpochDataLoader(train, epoch=self._epoch, **self._kwargs(train))

    def val_dataloader(self) -> DataLoader[Any]:
        val = self._need(self.val, "val")
        return DataLoader(val, **self._kwargs(val))

    def test_dataloader(self) -> DataLoader[Any]:
        test = self._need(self.test, "test")
        return DataLoader(test, **self._kwargs(test))

    def predict_dataloader(self) -> DataLoader[Any]:
        predict = self._need(self.predict, "predict")
        return DataLoader(predict, **self._kwargs(predict))
