"""Resume a StatefulDataLoader from a saved state in a fresh process (used by tests/test_resume.py).

``python resume_child.py KIND FOLDER NUM_WORKERS STATE OUT``: builds the dataset ``KIND`` (see
:func:`build`) over the slides of ``FOLDER``, loads the pickled loader state ``STATE`` into a new
``StatefulDataLoader`` and writes the rest of the stream (:func:`records`) to ``OUT`` as JSON.
"""

from __future__ import annotations

import json
import pickle
import sys
from pathlib import Path
from typing import Any

from torchdata.stateful_dataloader import StatefulDataLoader

import bigsmall_torch as bst

BATCH = 8  # samples per DataLoader batch (per-sample mode) or per dataset batch (batched mode)


def build(kind: str, folder: str | Path) -> bst.BigSmallDataset | bst.SlidingWindowDataset:
    """The dataset of a test case: ``bigsmall``, ``bigsmall-batched`` or ``sliding``."""
    slides = bst.Dataset.from_folder(folder, pattern="*.tiff")
    if kind == "sliding":
        return bst.SlidingWindowDataset(slides, 128, stride=160, level=2, block_size=400)
    return bst.BigSmallDataset(
        slides, bst.RandomRegionLoader(256), bst.RandomCropCollector(32),
        buffer_size=3, smallchunks_per_bigchunk=6, samples_per_epoch=160, seed=7, prefetch=2,
        batch_size=BATCH if kind == "bigsmall-batched" else None,
    )  # fmt: skip


def make_loader(kind: str, dataset: Any, num_workers: int) -> StatefulDataLoader:
    batch_size = None if kind == "bigsmall-batched" else BATCH
    return StatefulDataLoader(dataset, batch_size=batch_size, num_workers=num_workers)


def records(batch: dict[str, Any]) -> list[list[Any]]:
    """``[patient, x, y, pixel sum]`` of every sample of a batch."""
    images = batch["image"]
    return [
        [str(p), int(x), int(y), int(images[i].sum())]
        for i, (p, x, y) in enumerate(zip(batch["patient_id"], batch["x"], batch["y"], strict=True))
    ]


def main() -> None:
    kind, folder, num_workers, state_path, out = sys.argv[1:6]
    loader = make_loader(kind, build(kind, folder), int(num_workers))
    loader.load_state_dict(pickle.loads(Path(state_path).read_bytes()))
    stream = [r for batch in loader for r in records(batch)]
    Path(out).write_text(json.dumps(stream))


if __name__ == "__main__":
    main()
