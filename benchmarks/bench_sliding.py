"""Sliding-window benchmark: :class:`~bigsmall_torch.SlidingWindowDataset` against per-window reads.

Every 224x224 window (stride 224, level 0, no tissue filter) of one synthetic 32768x32768 slide
(21,316 windows; ``--quick``: 8192x8192, 1,296 windows), read side by side in one run with the same
DataLoader settings (2 workers, batch 64, uint8 CHW batches):

* ``SlidingWindowDataset``: ``block_size=2048`` (each block read once with the tile fast path, the
  next block prefetched in the background), per-sample (``DataLoader(batch_size=64)``) and batched
  (``batch_size=64`` in the dataset, ``DataLoader(batch_size=None)``);
* ``naive read_region``: a map-style dataset over the same grid, in the same row-major order, one
  ``read_region`` per window, with openslide (its tile cache on, 32 MiB per slide by default) and
  with tiffslide.

Each row reads the whole grid from a cold iterator (fresh workers): windows/s is windows over the
wall time from ``iter()`` to the last batch. Every row is checked to yield every window exactly once.

    python -m benchmarks.bench_sliding            # whole 32768^2 slide
    python -m benchmarks.bench_sliding --quick    # 8192^2 slide
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

import bigsmall_torch as bst

try:
    from ._common import REPO_ROOT, make_parser, markdown_table, prepare_slides
    from .bench_core import DECODE_THREADS
except ImportError:  # run as a script: python benchmarks/bench_sliding.py
    from _common import REPO_ROOT, make_parser, markdown_table, prepare_slides
    from bench_core import DECODE_THREADS

__all__ = ["NaiveGridDataset", "main", "run"]

logger = logging.getLogger("bench_sliding")

PATCH = 224
BLOCK = 2048
SLIDING = "SlidingWindowDataset"


class NaiveGridDataset(Dataset):
    """Window ``index`` of a grid (row-major) read with one ``read_region`` call.

    ``backend`` is ``"openslide"`` or ``"tiffslide"``; the slide is opened lazily in each worker.
    """

    def __init__(
        self, path: Path, xs: Sequence[int], ys: Sequence[int], *, backend: str, patch: int = PATCH
    ) -> None:
        if backend not in ("openslide", "tiffslide"):
            raise ValueError(f"backend must be 'openslide' or 'tiffslide', got {backend!r}")
        self.path = str(path)
        self.xs = [int(x) for x in xs]
        self.ys = [int(y) for y in ys]
        self.backend = backend
        self.patch = patch
        self._slide: Any = None

    def __len__(self) -> int:
        return len(self.xs) * len(self.ys)

    def _open(self) -> Any:
        if self._slide is None:
            if self.backend == "openslide":
                import openslide

                self._slide = openslide.OpenSlide(self.path)
            else:
                import tiffslide

                self._slide = tiffslide.TiffSlide(self.path)
        return self._slide

    def __getitem__(self, index: int) -> dict[str, Any]:
        row, col = divmod(index, len(self.xs))
        x, y = self.xs[col], self.ys[row]
        size = (self.patch, self.patch)
        if self.backend == "openslide":
            array = np.asarray(self._open().read_region((x, y), 0, size))[:, :, :3]
        else:
            array = self._open().read_region((x, y), 0, size, as_array=True)[:, :, :3]
        image = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)
        return {"image": image, "row": row, "col": col}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_slide": None}  # handles never travel to another process


@dataclass
class Timing:
    windows: int
    seconds: float
    first_batch_s: float
    cpu_s: float | None


@dataclass
class Row:
    reader: str
    mode: str
    runs: list[Timing] = field(default_factory=list)

    @property
    def windows_per_s(self) -> float:
        return statistics.median(r.windows / r.seconds for r in self.runs)

    @property
    def first_batch_s(self) -> float:
        return statistics.median(r.first_batch_s for r in self.runs)

    @property
    def cpu_us_per_window(self) -> float | None:
        cpus = [1e6 * r.cpu_s / r.windows for r in self.runs if r.cpu_s is not None]
        return statistics.median(cpus) if cpus else None


def _cpu() -> float:
    """CPU seconds of this process and of its children that have ended (joined workers)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def read_all(loader: DataLoader, *, expected: int) -> Timing:
    """Read the whole grid once from a cold iterator; check every window comes exactly once."""
    cpu_start, start = _cpu(), time.perf_counter()
    iterator = iter(loader)
    seen: set[tuple[int, int]] = set()
    count, first = 0, None
    for batch in iterator:
        if first is None:
            first = time.perf_counter() - start
        image = batch["image"]
        if image.dtype != torch.uint8 or tuple(image.shape[1:]) != (3, PATCH, PATCH):
            raise RuntimeError(f"unexpected batch: {image.dtype} {tuple(image.shape)}")
        count += len(image)
        seen.update(zip(batch["row"].tolist(), batch["col"].tolist(), strict=True))
    seconds = time.perf_counter() - start
    del iterator  # already shut its workers down (joined: their CPU time is in os.times())
    cpu = _cpu() - cpu_start
    if count != expected or len(seen) != expected:
        raise RuntimeError(
            f"expected {expected} windows once each, got {count} ({len(seen)} distinct)"
        )
    return Timing(count, seconds, first or seconds, cpu)


def run(args: argparse.Namespace) -> tuple[list[Row], int]:
    """Every row, ``args.repeats`` times interleaved (the naive rows ``args.naive_repeats`` times)."""
    path = prepare_slides(args.slides_dir, n=1, size=args.size, seed=args.seed)[0]
    patients = bst.Dataset("sliding", [bst.Patient(path.stem, {"wsi": bst.Record(path)})])
    configs: list[tuple[Row, Dataset[Any], bool, int]] = []
    for batched in (False, True):
        dataset = bst.SlidingWindowDataset(
            patients,
            patch_size=PATCH,
            stride=PATCH,
            level=0,
            block_size=BLOCK,
            batch_size=args.batch_size if batched else None,
            decode_threads=args.decode_threads,
        )
        mode = "batched" if batched else "per-sample"
        configs.append((Row(SLIDING, mode), dataset, batched, args.repeats))
    grid = dataset.grid(path.stem)
    total = dataset.total_windows
    for backend in ("openslide", "tiffslide"):
        naive = NaiveGridDataset(path, grid.xs, grid.ys, backend=backend)
        if len(naive) != total:
            raise RuntimeError(f"grid mismatch: {len(naive)} windows vs {total}")
        row = Row(f"naive read_region ({backend})", "per-sample")
        configs.append((row, naive, False, args.naive_repeats))
    for round_ in range(max(args.repeats, args.naive_repeats)):
        for row, dataset, batched, repeats in configs:
            if round_ >= repeats:
                continue
            loader = DataLoader(
                dataset, batch_size=None if batched else args.batch_size, num_workers=args.workers
            )
            timing = read_all(loader, expected=total)
            row.runs.append(timing)
            logger.info(
                "round %d, %s %s: %.0f windows/s, first batch %.2f s",
                *(round_ + 1, row.reader, row.mode, timing.windows / timing.seconds),
                timing.first_batch_s,
            )
    return [row for row, *_ in configs], total


def report(rows: Sequence[Row], total: int, args: argparse.Namespace, load: float) -> str:
    reference = {r.reader: r for r in rows}
    openslide = reference["naive read_region (openslide)"]
    tiffslide = reference["naive read_region (tiffslide)"]
    headers = [
        "reader",
        "mode",
        "windows/s",
        "x naive openslide",
        "x naive tiffslide",
        "first batch (s)",
        "CPU us/window",
        "runs",
    ]
    body = [
        [
            r.reader,
            r.mode,
            f"{r.windows_per_s:,.0f}",
            f"{r.windows_per_s / openslide.windows_per_s:.1f}",
            f"{r.windows_per_s / tiffslide.windows_per_s:.1f}",
            f"{r.first_batch_s:.2f}",
            "n/a" if r.cpu_us_per_window is None else f"{r.cpu_us_per_window:,.0f}",
            str(len(r.runs)),
        ]
        for r in rows
    ]
    return "\n".join(
        [
            markdown_table(headers, body),
            "",
            f"Every {PATCH}x{PATCH} window (stride {PATCH}, level 0) of one {args.size}x{args.size} "
            f"slide: {total:,} windows, each checked to come exactly once; {args.workers} workers, "
            f"batch {args.batch_size}, block_size={BLOCK}, decode_threads={args.decode_threads}. "
            "Windows/s over the whole pass from a cold iterator (median of the runs); CPU us/window: "
            "main process and workers over the whole pass, start-up included. Load average before the runs: "
            f"{load:.1f} on {os.cpu_count()} CPUs.",
        ]
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = make_parser(__file__, __doc__)
    parser.add_argument("--quick", action="store_true", help="an 8192x8192 slide")
    parser.add_argument("--size", type=int, help="slide side (default 32768; --quick 8192)")
    parser.add_argument(
        "--repeats", type=int, default=3, help="runs of the SlidingWindowDataset rows"
    )
    parser.add_argument("--naive-repeats", type=int, default=1, help="runs of the naive rows")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--decode-threads", type=int, default=DECODE_THREADS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--slides-dir", type=Path, default=REPO_ROOT / ".cache" / "bench-slides")
    parser.add_argument("--json", type=Path, help="also write the results as JSON to this path")
    args = parser.parse_args(argv)
    if args.size is None:
        args.size = 8192 if args.quick else 32768
    for name in ("repeats", "naive_repeats", "batch_size", "decode_threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    load = os.getloadavg()[0]
    rows, total = run(args)
    print(report(rows, total, args, load))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "load_average_before": load,
            "total_windows": total,
            "rows": [asdict(r) | {"windows_per_s": r.windows_per_s} for r in rows],
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
