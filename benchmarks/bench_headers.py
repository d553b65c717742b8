"""Construction-time slide checks: how long a dataset of 2,000 slides takes to build.

``BigSmallDataset`` and ``SlidingWindowDataset`` open every slide's header at construction (so a bad
file follows ``on_error`` before any worker starts). This builds a ``BigSmallDataset`` over 2,000
patients whose records are distinct paths (symbolic links to a few synthetic slides, so each is
opened on its own) with the check threads of the package (8) and with one thread, side by side, and
prints seconds and slides per second. A broken file among them checks the skip path too.

    python -m benchmarks.bench_headers [--slides 2000]
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

try:
    from ._common import make_parser, markdown_table
except ImportError:  # run as a script
    from _common import make_parser, markdown_table

import bigsmall_torch as bst
from bigsmall_torch._engine import streaming
from bigsmall_torch.synthetic import synthesize_slides


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = make_parser(__file__, __doc__)
    parser.add_argument("--slides", type=int, default=2000, help="patients (distinct paths)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per row (the median counts)")
    args = parser.parse_args(argv)
    if args.slides < 2 or args.repeats < 1:
        parser.error("--slides must be >= 2 and --repeats >= 1")
    return args


def _build(folder: Path, n: int, sources: list[Path]) -> bst.Dataset:
    patients = []
    for i in range(n):
        link = folder / f"slide_{i:05d}.tiff"
        if not link.exists():
            link.symlink_to(sources[i % len(sources)])
        patients.append(bst.Patient(link.stem, {"wsi": bst.Record(link)}))
    broken = folder / "zz_broken.tiff"
    broken.write_bytes(b"not a slide")
    patients[-1] = bst.Patient("zz_broken", {"wsi": bst.Record(broken)})
    return bst.Dataset("headers", patients)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        sources = [i.path for i in synthesize_slides(folder / "src", n=4, width=4096, height=4096)]
        dataset = _build(folder, args.slides, sources)
        for threads in (streaming.CHECK_THREADS, 1):
            streaming.CHECK_THREADS = threads
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                ds = bst.BigSmallDataset(
                    dataset, bst.RandomRegionLoader(size=1024), bst.RandomCropCollector(224),
                    buffer_size=2, smallchunks_per_bigchunk=8, on_error="skip",
                )  # fmt: skip
                times.append(time.perf_counter() - start)
                assert list(ds.skipped) == ["zz_broken"], ds.skipped
            seconds = sorted(times)[len(times) // 2]
            rows.append(
                [str(threads), str(args.slides), f"{seconds:.2f}", f"{args.slides / seconds:,.0f}"]
            )
    print(markdown_table(["check threads", "slides", "seconds", "slides/s"], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
