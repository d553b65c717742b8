"""Memory benchmark: does the RSS of a long run stay flat?

Streams at least 200,000 patches per mode (per-sample and batched) through one
``DataLoader(num_workers=2, persistent_workers=True)`` over several epochs (``set_epoch`` before each,
so the persistent workers start a fresh reservoir every epoch), and samples the resident set size of
every worker and of the main process (psutil) about every 10,000 patches. The settings are the ones
of ``bench_core`` (``RandomRegionLoader(2048)``, ``RandomCropCollector(224)``, ``buffer_size=4``,
batch 64) at 256 small chunks per big chunk, the setting that loads the most big chunks.

RSS is read after every batch; each point of the table is each process's peak over the window of
batches since the previous point (single readings swing by the few big chunks alive at the moment).
The growth is measured from the first point after the warm-up (``--warmup-patches``, default
20,000: the reservoirs are full and the allocator has its working set) to the end of the run, per
worker and in total; the verdict is "flat" when the growth is below 5% (``FLAT_THRESHOLD``).

    python -m benchmarks.bench_memory            # 4 epochs of 51,200 patches per mode, 32768^2 slides
    python -m benchmarks.bench_memory --quick    # 8192^2 slides, same patch counts
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from torch.utils.data import DataLoader

try:
    from ._common import REPO_ROOT, make_parser, markdown_table, prepare_slides
    from .bench_core import BUFFER_SIZE, DECODE_THREADS, make_bigsmall
except ImportError:  # run as a script: python benchmarks/bench_memory.py
    from _common import REPO_ROOT, make_parser, markdown_table, prepare_slides
    from bench_core import BUFFER_SIZE, DECODE_THREADS, make_bigsmall

__all__ = ["FLAT_THRESHOLD", "Point", "Trace", "main", "run_mode"]

logger = logging.getLogger("bench_memory")

FLAT_THRESHOLD = 0.05  # growth (relative) below which the RSS counts as flat
MIB = 1 << 20


@dataclass
class Point:
    """The resident set sizes (MiB) of one window of batches: each process's peak over the window."""

    patches: int
    epoch: int
    seconds: float
    workers_mib: list[float]
    main_mib: float

    @property
    def total_mib(self) -> float:
        return self.main_mib + sum(self.workers_mib)


@dataclass
class Trace:
    """The RSS samples of one mode."""

    mode: str
    patches: int = 0
    seconds: float = 0.0
    worker_pids: list[int] = field(default_factory=list)
    points: list[Point] = field(default_factory=list)


class _Sampler:
    """RSS of a set of processes read after every batch; a point keeps each process's largest value
    over its window (the number of big chunks alive swings by a few between two batches, so single
    readings are noisy; the peak per window is stable and shows a leak as a rising trend)."""

    def __init__(self, pids: Sequence[int]) -> None:
        import psutil

        self.processes = [psutil.Process(pid) for pid in pids]
        self.peaks = [0.0] * len(pids)

    def read(self) -> None:
        for i, process in enumerate(self.processes):
            self.peaks[i] = max(self.peaks[i], process.memory_info().rss / MIB)

    def take(self) -> list[float]:
        """The peaks since the last take (one per process), and a fresh window."""
        peaks, self.peaks = self.peaks, [0.0] * len(self.peaks)
        return peaks


def run_mode(paths: Sequence[Path], *, batched: bool, args: argparse.Namespace) -> Trace:
    """Stream ``args.epochs`` epochs through persistent workers; a point every ``args.every``
    patches and one at the end."""
    dataset = make_bigsmall(
        paths,
        smallchunks=args.smallchunks,
        samples=args.patches_per_epoch,
        batch_size=args.batch_size if batched else None,
        decode_threads=args.decode_threads,
        seed=args.seed,
    )
    loader = DataLoader(
        dataset,
        batch_size=None if batched else args.batch_size,
        num_workers=args.workers,
        persistent_workers=True,
    )
    trace = Trace("batched" if batched else "per-sample")
    sampler: _Sampler | None = None
    next_point = args.every
    start = time.perf_counter()

    def point(epoch: int) -> None:
        assert sampler is not None
        *workers, main = sampler.take()
        trace.points.append(Point(trace.patches, epoch, time.perf_counter() - start, workers, main))
        logger.info(
            "%s: %d patches (epoch %d), RSS total %.0f MiB",
            *(trace.mode, trace.patches, epoch, trace.points[-1].total_mib),
        )

    for epoch in range(args.epochs):
        dataset.set_epoch(epoch)
        iterator = iter(loader)
        if sampler is None:
            trace.worker_pids = [w.pid for w in getattr(iterator, "_workers", [])]
            sampler = _Sampler([*trace.worker_pids, os.getpid()])
        for batch in iterator:
            trace.patches += len(batch["image"])
            sampler.read()
            if trace.patches >= next_point:
                point(epoch)
                next_point += args.every
    trace.seconds = time.perf_counter() - start
    if sampler is not None and trace.points[-1].patches != trace.patches:
        point(args.epochs - 1)
    del iterator, loader  # ends the persistent workers
    return trace


def growth(trace: Trace, warmup: int, every: int) -> tuple[Point, Point]:
    """The first point after ``warmup`` patches (its window starts at or after them), and the
    last point."""
    after = [p for p in trace.points if p.patches - every >= warmup]
    return (after[0] if after else trace.points[0]), trace.points[-1]


def _pct(before: float, after: float) -> str:
    return f"{after - before:+,.1f} MiB ({(after - before) / before:+.1%})"


def report(traces: Sequence[Trace], args: argparse.Namespace, load: float) -> str:
    lines = []
    for trace in traces:
        n = len(trace.worker_pids)
        headers = [
            "patches",
            "epoch",
            "time (s)",
            *[f"worker {i} peak RSS (MiB)" for i in range(n)],
            "main peak RSS (MiB)",
            "total (MiB)",
        ]
        body = [
            [
                f"{p.patches:,}",
                str(p.epoch),
                f"{p.seconds:.0f}",
                *[f"{m:,.0f}" for m in p.workers_mib],
                f"{p.main_mib:,.0f}",
                f"{p.total_mib:,.0f}",
            ]
            for p in trace.points
        ]
        lines += [
            f"### {trace.mode}: {trace.patches:,} patches in {trace.seconds:.0f} s "
            f"({trace.patches / trace.seconds:,.0f} patches/s), {args.epochs} epochs",
            "",
            markdown_table(headers, body),
            "",
        ]
    headers = ["mode", "process", "after warm-up (MiB)", "end (MiB)", "growth", "verdict"]
    body = []
    for trace in traces:
        first, last = growth(trace, args.warmup_patches, args.every)
        names = [f"worker {i}" for i in range(len(trace.worker_pids))] + ["main", "total"]
        befores = [*first.workers_mib, first.main_mib, first.total_mib]
        afters = [*last.workers_mib, last.main_mib, last.total_mib]
        for name, before, after in zip(names, befores, afters, strict=True):
            flat = (after - before) / before < FLAT_THRESHOLD
            body.append(
                [
                    trace.mode,
                    name,
                    f"{before:,.0f} (at {first.patches:,})",
                    f"{after:,.0f} (at {last.patches:,})",
                    _pct(before, after),
                    "flat" if flat else "GROWS",
                ]
            )
    lines += [
        f"### Growth from the first point after {args.warmup_patches:,} patches to the end "
        f"(flat: growth < {FLAT_THRESHOLD:.0%})",
        "",
        markdown_table(headers, body),
        "",
        f"Settings: {args.slides} slides of {args.size}x{args.size}, {args.workers} persistent "
        f"workers, batch {args.batch_size}, buffer_size={BUFFER_SIZE}, "
        f"smallchunks_per_bigchunk={args.smallchunks}, decode_threads={args.decode_threads}, "
        f"{args.patches_per_epoch:,} patches per epoch. Each point is each process's peak RSS over "
        f"the {args.every:,} patches before it (read after every batch); RSS counts the "
        f"shared-memory batch pages a process has touched. Load average before the runs: {load:.1f} on {os.cpu_count()} CPUs.",
    ]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = make_parser(__file__, __doc__)
    parser.add_argument("--quick", action="store_true", help="8192x8192 slides (2 of them)")
    parser.add_argument(
        "--patches", type=int, default=204_800, help="patches per mode (>= 200,000)"
    )
    parser.add_argument("--epochs", type=int, default=4, help="epochs the patches are spread over")
    parser.add_argument("--every", type=int, default=10_000, help="patches between RSS samples")
    parser.add_argument(
        "--warmup-patches",
        type=int,
        default=20_000,
        help="growth is measured from the first sample point at or after this many patches",
    )
    parser.add_argument("--smallchunks", type=int, default=256, help="smallchunks_per_bigchunk")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--decode-threads", type=int, default=DECODE_THREADS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--modes",
        nargs="+",
        choices=["per-sample", "batched"],
        default=["per-sample", "batched"],
        help="which modes to run (default both)",
    )
    parser.add_argument("--slides-dir", type=Path, default=REPO_ROOT / ".cache" / "bench-slides")
    parser.add_argument("--json", type=Path, help="also write the traces as JSON to this path")
    args = parser.parse_args(argv)
    args.size, args.slides = (8192, 2) if args.quick else (32768, 4)
    for name in ("patches", "epochs", "every", "smallchunks", "workers", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.workers < 1:
        parser.error("--workers must be >= 1 (the point is the workers' RSS)")
    # Whole batches on every worker each epoch.
    unit = args.batch_size * args.workers
    args.patches_per_epoch = -(-args.patches // (args.epochs * unit)) * unit
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    load = os.getloadavg()[0]
    paths = prepare_slides(args.slides_dir, n=args.slides, size=args.size, seed=args.seed)
    traces = [run_mode(paths, batched=mode == "batched", args=args) for mode in args.modes]
    print(report(traces, args, load))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "traces": [asdict(t) for t in traces],
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
