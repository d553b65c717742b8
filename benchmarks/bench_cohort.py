"""Cohorts of unequal cost: a JPEG 2000 slide and a JPEG slide streamed by 2 DataLoader workers.

JPEG 2000 tiles decode several times slower than JPEG ones. Dealt one patient per worker
(``sharding="count"``), the JPEG 2000 worker sets the pace of the default in-order DataLoader and
the JPEG worker idles; ``in_order=False`` lets the fast worker run ahead, but then the patient mix
skews towards the fast slide. ``sharding="cost"`` (the default) sees the codecs at construction and
gives each worker a band of both slides: both workers finish together and each slide keeps half of
the samples all along. Rows side by side in one run: patches/s over a whole epoch (after the first
batch), the JPEG 2000 slide's share of the samples in the first half of the epoch's batches (over
the whole epoch every worker serves its exact quota, so it is 50% in every row), and each worker's
loading-thread busy fraction (``ds.epoch_report()``), medians of ``--repeats`` runs. Each worker
decodes with one thread (``decode_threads=1``), as on a machine with a core per worker.

    python -m benchmarks.bench_cohort [--samples 4096] [--repeats 3]
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Sequence
from pathlib import Path

from torch.utils.data import DataLoader

try:
    from ._common import REAL_SLIDE, REPO_ROOT, make_parser, markdown_table
except ImportError:  # run as a script
    from _common import REAL_SLIDE, REPO_ROOT, make_parser, markdown_table

import bigsmall_torch as bst
from bigsmall_torch.synthetic import write_synthetic_slide

SIZE, CHUNK, PATCH, BATCH = 4096, 2048, 224, 64
ROWS = (  # label, sharding, in_order
    ("one patient per worker (before)", "count", True),
    ("one patient per worker, in_order=False", "count", False),
    ("by cost (default)", "cost", True),
)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = make_parser(__file__, __doc__)
    parser.add_argument("--samples", type=int, default=4096, help="samples per epoch (both workers)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per row (the median counts)")
    parser.add_argument(
        "--cache", type=Path, default=REPO_ROOT / ".cache" / "bench-slides" / "cohort",
        help="where the two synthetic slides are kept between runs",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.samples < 2 * BATCH or args.samples % (2 * BATCH) or args.repeats < 1:
        parser.error(f"--samples must be a multiple of {2 * BATCH} and --repeats >= 1")
    return args


def _slides(cache: Path) -> dict[str, Path]:
    cache.mkdir(parents=True, exist_ok=True)
    texture = REAL_SLIDE if REAL_SLIDE.exists() else None
    paths = {}
    for codec in ("jpeg2000", "jpeg"):
        path = cache / f"{codec}.svs"
        if not path.exists():
            write_synthetic_slide(path, width=SIZE, height=SIZE, tile_size=256, compression=codec,
                                  tissue="full", texture_source=texture, seed=7)  # fmt: skip
        paths[codec] = path
    return paths


def _epoch(paths: dict[str, Path], samples: int, sharding: str, in_order: bool) -> tuple[float, float, list[float]]:
    """patches/s after the first batch, the JPEG 2000 slide's share, the workers' busy fractions."""
    patients = [bst.Patient(codec, {"wsi": bst.Record(path)}) for codec, path in paths.items()]
    ds = bst.BigSmallDataset(
        bst.Dataset("cohort", patients), bst.RandomRegionLoader(CHUNK), bst.RandomCropCollector(PATCH),
        buffer_size=2, smallchunks_per_bigchunk=64, prefetch=1, samples_per_epoch=samples,
        sharding=sharding, seed=0, decode_threads=1,
    )  # fmt: skip
    loader = DataLoader(ds, batch_size=BATCH, num_workers=2, in_order=in_order)
    iterator = iter(loader)
    ids = list(next(iterator)["patient_id"])
    start, patches = time.perf_counter(), 0
    for batch in iterator:
        patches += len(batch["image"])
        ids += batch["patient_id"]
    seconds = time.perf_counter() - start
    report = ds.epoch_report()
    if not report.complete or sum(report.samples.values()) != samples or len(ids) != samples:
        raise RuntimeError(f"incomplete epoch: {report.summary()}")
    first_half = ids[: samples // 2]
    share = first_half.count("jpeg2000") / len(first_half)
    return patches / seconds, share, [w.busy or 0.0 for w in report.workers]


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    paths = _slides(args.cache)
    results: dict[str, list[tuple[float, float, list[float]]]] = {label: [] for label, _, _ in ROWS}
    for _ in range(args.repeats):  # interleaved, so that drifts of a shared machine hit every row
        for label, sharding, in_order in ROWS:
            results[label].append(_epoch(paths, args.samples, sharding, in_order))
    base = None
    rows = []
    for label, _, _ in ROWS:
        runs = sorted(results[label], key=lambda r: r[0])
        rate, share, busy = runs[len(runs) // 2]
        base = base or rate
        rows.append([
            label, f"{rate:,.0f}", f"{rate / base:.2f}x", f"{share:.0%}",
            " / ".join(f"{b:.0%}" for b in busy),
        ])  # fmt: skip
    print(markdown_table(
        ["2 workers: JPEG 2000 + JPEG slide", "patches/s", "ratio", "JPEG 2000 share (1st half)",
         "loading threads busy (w0 / w1)"], rows,
    ))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
