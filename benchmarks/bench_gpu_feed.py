"""GPU feed benchmark: uint8 batches to the GPU and augmentation there, ``pin_memory`` off and on.

The training side of the loader (needs a CUDA device): each batch of 64 uint8 CHW 224x224 patches
from :class:`~bigsmall_torch.BigSmallDataset` (``RandomRegionLoader(2048)``,
``RandomCropCollector(224)``, ``buffer_size=4``, 1024 small chunks per big chunk) goes
``.to("cuda", non_blocking=True)``, becomes float in [0, 1] there, and gets a
``torchvision.transforms.v2`` augmentation and normalisation on the GPU batch
(:class:`GpuAugment`). Rows:

* per-sample and batched mode, ``pin_memory`` False and True, at each ``--workers`` count;
* the same augmentation done in the workers instead (``transform=`` of the dataset, on uint8
  tensors, per sample or per batch), then only the normalisation on the GPU;
* ``GPU only``: the GPU step alone on a batch already on the GPU (what the GPU side costs).

Patches/s over the timed batches, the GPU synchronised at the end. The slides are synthetic
(procedural texture unless ``../shared/slides`` is present), 8192x8192 by default so that they are
written in seconds on a fresh machine.

    python -m benchmarks.bench_gpu_feed                   # 2 and 8 workers
    python -m benchmarks.bench_gpu_feed --workers 2 4 8
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

try:
    from ._common import REPO_ROOT, make_parser, markdown_table, prepare_slides
    from .bench_core import DECODE_THREADS, make_bigsmall
except ImportError:  # run as a script: python benchmarks/bench_gpu_feed.py
    from _common import REPO_ROOT, make_parser, markdown_table, prepare_slides
    from bench_core import DECODE_THREADS, make_bigsmall

__all__ = ["GpuAugment", "WorkerAugment", "main", "run"]

logger = logging.getLogger("bench_gpu_feed")

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def _augmentations() -> Any:
    from torchvision.transforms import v2

    return v2.Compose(
        [
            v2.RandomHorizontalFlip(),
            v2.RandomVerticalFlip(),
            v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.02),
        ]
    )


class GpuAugment:
    """The GPU step: uint8 batch -> device -> float [0, 1] -> v2 augmentation -> normalisation.

    ``augment=False`` keeps only the conversion and the normalisation (augmented in the workers).
    v2 transforms draw one set of random parameters per call, so the whole batch shares it; see
    docs/tuning.md for per-sample draws on the GPU.
    """

    def __init__(self, device: torch.device, *, augment: bool = True) -> None:
        from torchvision.transforms import v2

        self.device = device
        self.augment = _augmentations() if augment else None
        self.normalize = v2.Normalize(MEAN, STD)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.device, non_blocking=True).float().div_(255)
        if self.augment is not None:
            x = self.augment(x)
        return self.normalize(x)


class WorkerAugment:
    """The same v2 augmentation applied in the DataLoader workers, on uint8 CHW tensors (a sample,
    or a batch in batched mode); picklable."""

    def __init__(self) -> None:
        self.augment = _augmentations()

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return self.augment(image)


@dataclass
class Row:
    name: str
    workers: int
    pin_memory: bool
    rates: list[float] = field(default_factory=list)

    @property
    def patches_per_s(self) -> float:
        return statistics.median(self.rates)


def _time(
    loader: DataLoader, step: Callable[[torch.Tensor], torch.Tensor], *, warmup: int, batches: int
) -> float:
    iterator = iter(loader)
    sink = None
    for _ in range(warmup):
        sink = step(next(iterator)["image"]).mean()
    torch.cuda.synchronize()
    start, patches = time.perf_counter(), 0
    for _ in range(batches):
        image = next(iterator)["image"]
        patches += len(image)
        sink = step(image).mean()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    del iterator, sink
    return patches / seconds


def run(args: argparse.Namespace) -> list[Row]:
    device = torch.device("cuda")
    paths = prepare_slides(args.slides_dir, n=args.slides, size=args.size, seed=args.seed)
    samples = 4 * (args.warmup + args.batches) * args.batch_size
    full, normalize_only = GpuAugment(device), GpuAugment(device, augment=False)
    configs: list[tuple[Row, Any, bool, Callable[[torch.Tensor], torch.Tensor]]] = []
    for workers in args.workers:
        for batched in (False, True):
            for pin in (False, True):
                dataset = make_bigsmall(
                    paths,
                    smallchunks=1024,
                    samples=samples,
                    batch_size=args.batch_size if batched else None,
                    decode_threads=args.decode_threads,
                    seed=args.seed,
                )
                name = f"{'batched' if batched else 'per-sample'}, augment on GPU"
                configs.append((Row(name, workers, pin), dataset, batched, full))
        for batched in (False, True):
            dataset = make_bigsmall(
                paths,
                smallchunks=1024,
                samples=samples,
                batch_size=args.batch_size if batched else None,
                decode_threads=args.decode_threads,
                seed=args.seed,
            )
            dataset.transform = WorkerAugment()
            name = f"{'batched' if batched else 'per-sample'}, augment in workers"
            configs.append((Row(name, workers, True), dataset, batched, normalize_only))
    rows = [c[0] for c in configs]
    for round_ in range(args.repeats):
        for row, dataset, batched, step in configs:
            loader = DataLoader(
                dataset,
                batch_size=None if batched else args.batch_size,
                num_workers=row.workers,
                pin_memory=row.pin_memory,
            )
            rate = _time(loader, step, warmup=args.warmup, batches=args.batches)
            row.rates.append(rate)
            logger.info(
                "round %d: %s, %d workers, pin_memory=%s: %.0f patches/s",
                *(round_ + 1, row.name, row.workers, row.pin_memory, rate),
            )
    resident = torch.randint(0, 256, (args.batch_size, 3, 224, 224), dtype=torch.uint8)
    resident = resident.to(device)
    gpu_only = Row("GPU only (batch already on the GPU)", 0, False)
    for _ in range(args.repeats):
        for _ in range(10):
            full(resident)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(args.batches):
            full(resident).mean()
        torch.cuda.synchronize()
        gpu_only.rates.append(args.batches * args.batch_size / (time.perf_counter() - start))
    return [*rows, gpu_only]


def report(rows: Sequence[Row], args: argparse.Namespace) -> str:
    headers = ["pipeline", "workers", "pin_memory", "patches/s"]
    body = [
        [r.name, str(r.workers) if r.workers else "-", str(r.pin_memory), f"{r.patches_per_s:,.0f}"]
        for r in rows
    ]
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return "\n".join(
        [
            markdown_table(headers, body),
            "",
            f"{name}, {os.cpu_count()} CPUs; {args.slides} slides of {args.size}x{args.size}, batch "
            f"{args.batch_size}, 1024 small chunks per big chunk, decode_threads="
            f"{args.decode_threads}; medians of {args.repeats} runs of {args.batches} batches.",
        ]
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = make_parser(__file__, __doc__)
    parser.add_argument("--workers", type=int, nargs="+", default=[2, 8])
    parser.add_argument("--size", type=int, default=8192)
    parser.add_argument("--slides", type=int, default=2)
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--decode-threads", type=int, default=DECODE_THREADS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--slides-dir", type=Path, default=REPO_ROOT / ".cache" / "bench-slides")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if not torch.cuda.is_available():
        raise SystemExit("bench_gpu_feed needs a CUDA device")
    print(report(run(args), args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
