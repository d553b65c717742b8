"""Two CPU ranks under Lightning's DDP (gloo); each writes what it trained on to <out>/rank<r>.json."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

import bigsmall_torch as bst
from bigsmall_torch.lightning import BigSmallDataModule


class Recorder(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(3, 1)
        self.samples: dict[int, list[Any]] = {}
        self.batches = 0

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        self.batches += 1
        self.samples.setdefault(self.current_epoch, []).extend(
            [p, int(x), int(y)] for p, x, y in zip(batch["patient_id"], batch["x"], batch["y"], strict=True)
        )
        return self.layer(batch["image"].float().mean(dim=(2, 3))).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


class Module(BigSmallDataModule):
    """Builds the dataset in setup(), after the process group exists (so ranks are read from it)."""

    def __init__(self, folder: str) -> None:
        super().__init__(batch_size=8, num_workers=2)
        self.folder = folder

    def setup(self, stage: str) -> None:
        self.train = bst.BigSmallDataset(
            bst.Dataset.from_folder(self.folder, pattern="*.tiff"), bst.RandomRegionLoader(256),
            bst.RandomCropCollector(64), buffer_size=2, smallchunks_per_bigchunk=8, samples_per_epoch=128,
        )


def main() -> None:
    folder, out = sys.argv[1], Path(sys.argv[2])
    model = Recorder()
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", devices=2, strategy="ddp", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, Module(folder))
    (out / f"rank{trainer.global_rank}.json").write_text(
        json.dumps({"batches": model.batches, "samples": model.samples})
    )


if __name__ == "__main__":
    main()
