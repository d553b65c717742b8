"""Run under torchrun (2 processes, gloo, CPU): training streams and sliding windows across ranks.

Each rank streams one epoch of a BigSmallDataset and all windows of its share of a
SlidingWindowDataset through 2 DataLoader workers; rank 0 gathers everything and writes it as JSON.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch.distributed as dist
from torch.utils.data import DataLoader

import bigsmall_torch as bst


def main() -> None:
    folder, out = sys.argv[1], Path(sys.argv[2])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    slides = bst.Dataset.from_folder(folder, pattern="*.tiff")
    train = bst.BigSmallDataset(slides, bst.RandomRegionLoader(256), bst.RandomCropCollector(64),
                                buffer_size=2, smallchunks_per_bigchunk=8, samples_per_epoch=96, seed=1)
    train.set_epoch(0)
    batches = list(DataLoader(train, batch_size=8, num_workers=2))
    samples = [[p, int(x), int(y)] for b in batches for p, x, y in zip(b["patient_id"], b["x"], b["y"], strict=True)]
    windows_ds = bst.SlidingWindowDataset(slides, 256, stride=200, level=1, block_size=700, batch_size=16)
    windows = [[p, int(r), int(c)] for b in DataLoader(windows_ds, batch_size=None, num_workers=2)
               for p, r, c in zip(b["patient_id"], b["row"], b["col"], strict=True)]
    mine = {"rank": rank, "world": dist.get_world_size(), "len": len(train), "batches": len(batches),
            "samples": samples, "windows": windows, "windows_len": len(windows_ds),
            "total_windows": windows_ds.total_windows}
    gathered: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    if rank == 0:
        out.write_text(json.dumps(gathered))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
