"""Extract features slowly in a child process, so that a test can kill it mid-slide.

``python features_child.py SLIDES OUT``: a per-channel-means model that sleeps 0.2 s per batch.
"""

from __future__ import annotations

import sys
import time

import torch

import bigsmall_torch as bst


class SlowMeans(torch.nn.Module):
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        time.sleep(0.2)
        return images.float().mean((2, 3))


if __name__ == "__main__":
    slides = bst.Dataset.from_folder(sys.argv[1], pattern="*.tiff")
    bst.extract_features(slides, SlowMeans(), sys.argv[2], patch_size=128, level=0, tissue_only=False,
                         num_workers=0, batch_size=8, dtype="float32", progress=False)
