"""BigSmallDataModule with a real Trainer on the CPU: epochs reach the workers, evaluation is fixed,
and two DDP ranks get disjoint streams of equal length."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch

import bigsmall_torch as bst
from bigsmall_torch.lightning import BigSmallDataModule
from conftest import run_process_group

SCRIPTS = Path(__file__).parent / "scripts"


class TinyModel(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, stride=4), torch.nn.AdaptiveAvgPool2d(1),
                                       torch.nn.Flatten(), torch.nn.Linear(4, 2))
        self.seen: dict[int, list[tuple[str, int]]] = {}
        self.val_seen: list[list[tuple[str, int]]] = []

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        self.seen.setdefault(self.current_epoch, []).extend(zip(batch["patient_id"], batch["x"].tolist(), strict=True))
        logits = self.net(batch["image"].float() / 255)
        return torch.nn.functional.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long))

    def on_validation_epoch_start(self) -> None:
        self.val_seen.append([])

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.val_seen[-1].extend(zip(batch["patient_id"], batch["x"].tolist(), strict=True))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def make(folder: Path, **kwargs: Any) -> bst.BigSmallDataset:
    options: dict[str, Any] = {"buffer_size": 2, "smallchunks_per_bigchunk": 8, "samples_per_epoch": 128, **kwargs}
    return bst.BigSmallDataset(bst.Dataset.from_folder(folder, pattern="*.tiff"), bst.RandomRegionLoader(256),
                               bst.RandomCropCollector(64), **options)


def test_trainer_sees_epochs_and_fixed_validation(slide_folder: Path) -> None:
    train = make(slide_folder, seed=3)
    module = BigSmallDataModule(train, val=make(slide_folder, seed=9, samples_per_epoch=32),
                                batch_size=16, num_workers=2)
    model = TinyModel()
    trainer = pl.Trainer(max_epochs=2, limit_train_batches=3, accelerator="cpu", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0)
    trainer.fit(model, module)
    assert sorted(model.seen) == [0, 1] and all(len(v) == 3 * 16 for v in model.seen.values())
    assert model.seen[0] != model.seen[1] and train.epoch == 1
    fresh = make(slide_folder, seed=3)
    fresh.set_epoch(1)
    batches = iter(torch.utils.data.DataLoader(fresh, batch_size=16, num_workers=2))
    expected = [(p, int(x)) for _ in range(3) for b in [next(batches)] for p, x in zip(b["patient_id"], b["x"], strict=True)]
    assert model.seen[1] == expected  # the workers streamed epoch 1, exactly
    assert len(model.val_seen) == 2 and model.val_seen[0] == model.val_seen[1]  # fixed validation set


def test_predict_from_sliding_windows(slide_folder: Path) -> None:
    windows = bst.SlidingWindowDataset(bst.Dataset.from_folder(slide_folder, pattern="synthetic_00[01].tiff"),
                                       256, level=2, batch_size=8)
    module = BigSmallDataModule(predict=windows, num_workers=2)

    class Predictor(TinyModel):
        def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[tuple[str, int, int]]:
            return list(zip(batch["patient_id"], batch["row"].tolist(), batch["col"].tolist(), strict=True))

    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    out = [w for batch in trainer.predict(Predictor(), module) for w in batch]
    assert len(out) == len(set(out)) == windows.total_windows


def test_bad_arguments(slide_folder: Path) -> None:
    with pytest.raises(bst.ConfigError, match="train needs samples_per_epoch"):
        BigSmallDataModule(make(slide_folder, samples_per_epoch=None))
    with pytest.raises(bst.ConfigError, match="predict must be a SlidingWindowDataset"):
        BigSmallDataModule(predict=make(slide_folder))
    with pytest.raises(bst.ConfigError, match="no val dataset was given"):
        BigSmallDataModule(make(slide_folder)).val_dataloader()


def test_ddp_two_ranks_get_disjoint_streams_of_equal_length(slide_folder: Path, tmp_path: Path) -> None:
    code, stderr = run_process_group([sys.executable, str(SCRIPTS / "lightning_ddp.py"), str(slide_folder), str(tmp_path)])
    assert code == 0, stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["batches"] == ranks[1]["batches"] == 2 * 8  # 2 epochs x 64 samples / 8, on each rank
    for epoch in ("0", "1"):
        a, b = ({tuple(s) for s in r["samples"][epoch]} for r in ranks)
        assert a and b and not a & b
        assert {s[0] for s in a}.isdisjoint({s[0] for s in b})  # patients belong to one rank
