"""Run under torchrun (2 processes, gloo, CPU): feature extraction over a folder of slides.

``torchrun ... torchrun_features.py SLIDES OUT``: every rank calls ``extract_features`` with a
per-channel-means model; rank 0 then also writes ``OUT/ranks.json``: each rank's own rows.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import bigsmall_torch as bst


class Means(torch.nn.Module):
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.float().mean((2, 3))


def main() -> None:
    folder, out = sys.argv[1], Path(sys.argv[2])
    dist.init_process_group("gloo")
    slides = bst.Dataset.from_folder(folder, pattern="*.tiff")
    summary = bst.extract_features(slides, Means(), out, patch_size=128, level=1, tissue_only=False,
                                   num_workers=1, batch_size=16, dtype="float32", progress=False)
    mine = [[str(r.patient_id), r.rank, r.status, r.windows] for r in summary.slides
            if r.rank == dist.get_rank()]
    gathered: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    if dist.get_rank() == 0:
        (out / "ranks.json").write_text(json.dumps(gathered))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
