"""Slides read from S3 against the same slides read from local disk, per-sample and batched.

Two synthetic 8192x8192 slides (256 px JPEG tiles, texture from the real slide when present,
cached under ``.cache/bench-slides``) are uploaded to moto's S3 server on localhost (server mode,
its own process, as in the tests). Every row uses the same seed and DataLoader settings (batch 64,
2 workers, ``RandomRegionLoader(2048)``, ``RandomCropCollector(224)``, ``buffer_size=4``, 256 small
chunks per big chunk, no disk cache):

* ``local``: the files on disk;
* ``HTTP``: ``http://127.0.0.1:<port>/<name>.tiff`` from the tests' Range-honouring file server
  (its own process; it seeks and sends just the range asked for, as web servers and object stores
  do);
* ``S3``: ``s3://bench/<name>.tiff`` from moto's S3 server (authentication on, SigV4-signed
  requests through s3fs), run by :mod:`benchmarks._moto_ranged` so that a ranged GET reads only its
  range, as object stores do: moto as it is reads the whole object for every ranged GET (40 MB per
  request for these slides), so its rows would measure moto more than the client
  (``--moto-as-is`` runs it unchanged);
  the workers fetch tile byte ranges with obstore (``RemoteOptions(s3_reads="auto")``, the default),
  headers and sizes with s3fs;
* ``... + 20 ms``: the same objects through a small HTTP proxy (its own process) that holds every
  request 20 ms before forwarding it, as a store in another building would.

each per-sample and batched. The rows run interleaved, ``--repeats`` rounds (the order reversed
every other round), each from a cold iterator (fresh workers); the table shows medians and the
share of the local row of the same mode. "GETs per big chunk" is what the proxy forwarded while
a ``+ 20 ms`` row was timed, divided by the big chunks that row's patches came from (patches
/ 256; chunks prefetched but not used make it a little high). moto and the proxy are Python servers
on the same 2 cores: they take CPU the local row does not need, so the remote rows are pessimistic.
Target: with 20 ms latency, at least 60% of local throughput. Two
side lines, measured in this process, help read the rows: the wall and CPU time of reading one big
chunk locally, from the HTTP server and from moto.

    python -m benchmarks.bench_remote            # full run (6-8 minutes on 2 cores)
    python -m benchmarks.bench_remote --quick    # smoke run (about a minute)
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader

import bigsmall_torch as bst

try:
    from ._common import (
        REPO_ROOT,
        LoaderTiming,
        add_scaled_options,
        add_stream_options,
        cpu_seconds,
        make_parser,
        markdown_table,
        prepare_slides,
        resolve_stream_options,
        time_loader,
        write_json,
    )
    from .bench_core import BUFFER_SIZE, CHUNK, DECODE_THREADS, PATCH
except ImportError:  # run as a script: python benchmarks/bench_remote.py
    from _common import (
        REPO_ROOT,
        LoaderTiming,
        add_scaled_options,
        add_stream_options,
        cpu_seconds,
        make_parser,
        markdown_table,
        prepare_slides,
        resolve_stream_options,
        time_loader,
        write_json,
    )
    from bench_core import BUFFER_SIZE, CHUNK, DECODE_THREADS, PATCH

sys.path.insert(0, str(REPO_ROOT / "tests"))  # the tests' real servers: moto and the proxy
import _servers

__all__ = ["main", "run"]

logger = logging.getLogger("bench_remote")

SMALLCHUNKS = 256
LATENCY_S = 0.020
TARGET_OF_LOCAL = 0.60  # S3 with 20 ms latency >= 60% of local
MODES = ("per-sample", "batched")
SOURCES = ("local", "HTTP", "HTTP + 20 ms", "S3", "S3 + 20 ms")
SLOW = ("HTTP + 20 ms", "S3 + 20 ms")
BUCKET = "bench"


@dataclass
class Row:
    mode: str
    source: str
    runs: list[LoaderTiming]
    gets_per_chunk: list[float]
    server_cpu_us: list[float] = field(default_factory=list)  # per patch, the servers' processes

    @property
    def server_us_per_patch(self) -> float | None:
        return statistics.median(self.server_cpu_us) if self.server_cpu_us else None

    @property
    def patches_per_s(self) -> float:
        return statistics.median(t.patches_per_s for t in self.runs)

    @property
    def cpu_us_per_patch(self) -> float | None:
        values = [t.cpu_us_per_patch for t in self.runs if t.cpu_us_per_patch is not None]
        return statistics.median(values) if values else None


def make_dataset(
    records: Sequence[Any], *, batch_size: int | None, samples: int, decode_threads: int, seed: int,
    remote: bst.RemoteOptions | None,
) -> bst.BigSmallDataset:  # fmt: skip
    patients = [bst.Patient(f"slide{i}", {"wsi": bst.Record(r)}) for i, r in enumerate(records)]
    return bst.BigSmallDataset(
        bst.Dataset("bench-remote", patients, remote=remote),
        bst.RandomRegionLoader(CHUNK),
        bst.RandomCropCollector(PATCH),
        buffer_size=BUFFER_SIZE,
        smallchunks_per_bigchunk=SMALLCHUNKS,
        samples_per_epoch=samples,
        seed=seed,
        batch_size=batch_size,
        decode_threads=decode_threads,
        prefetch=4,  # the same in every row (the remote default)
    )


def run(args: argparse.Namespace, slides: Sequence[Path]) -> list[Row]:
    """Every configuration ``args.repeats`` times, interleaved, each from a cold iterator."""
    samples = 2 * (1 + args.warmup + args.batches) * args.batch_size  # no worker ends while timed
    module = "moto.server" if args.moto_as_is else "benchmarks._moto_ranged"
    with _servers.moto_server(module, cwd=REPO_ROOT) as moto:
        client = moto.client()
        client.create_bucket(Bucket=BUCKET)
        for slide in slides:
            client.upload_file(str(slide), BUCKET, slide.name)
        logger.info("uploaded %d slides to moto at %s", len(slides), moto.endpoint)
        web = _servers.range_server(slides[0].parent)
        proxies = {"S3 + 20 ms": _servers.proxy(moto.endpoint), "HTTP + 20 ms": _servers.proxy(web.url)}
        servers = [moto.process.pid, web.process.pid, *(proxy.process.pid for proxy in proxies.values())]
        try:
            for proxy in proxies.values():
                proxy.faults.latency_s = LATENCY_S
            s3_urls = [f"s3://{BUCKET}/{slide.name}" for slide in slides]
            sources: dict[str, tuple[Sequence[Any], bst.RemoteOptions | None]] = {
                "local": (slides, None),
                "HTTP": ([f"{web.url}/{slide.name}" for slide in slides], None),
                "HTTP + 20 ms": ([f"{proxies['HTTP + 20 ms'].url}/{slide.name}" for slide in slides], None),
                "S3": (s3_urls, bst.RemoteOptions(storage_options=moto.storage_options())),
                "S3 + 20 ms": (
                    s3_urls, bst.RemoteOptions(storage_options=moto.storage_options(proxies["S3 + 20 ms"].url))
                ),
            }
            configs = []
            for mode in MODES:
                for source, (records, remote) in sources.items():
                    batched = mode == "batched"
                    dataset = make_dataset(
                        records, batch_size=args.batch_size if batched else None, samples=samples,
                        decode_threads=args.decode_threads, seed=args.seed, remote=remote,
                    )  # fmt: skip
                    configs.append((Row(mode, source, [], []), dataset, batched))
            for round_ in range(args.repeats):
                order = configs if round_ % 2 == 0 else configs[::-1]
                for row, dataset, batched in order:
                    args.loads.append(os.getloadavg()[0])
                    loader = DataLoader(
                        dataset, batch_size=None if batched else args.batch_size, num_workers=args.workers
                    )
                    proxy = proxies.get(row.source)
                    if proxy is not None:
                        proxy.faults.reset()
                    before = cpu_seconds(servers)
                    timing = time_loader(
                        loader, warmup=args.warmup, batches=args.batches, patch=PATCH,
                        batch_size=args.batch_size,
                    )  # fmt: skip
                    after = cpu_seconds(servers)
                    if before is not None and after is not None:  # over every batch, warm-up included
                        patches = (1 + args.warmup + args.batches) * args.batch_size
                        row.server_cpu_us.append((after - before) / patches * 1e6)
                    if proxy is not None:
                        gets = proxy.faults.count("GET")
                        patches = (1 + args.warmup + args.batches) * args.batch_size
                        row.gets_per_chunk.append(gets / max(1.0, patches / SMALLCHUNKS))
                    logger.info(
                        "round %d/%d, %s %s: %.0f patches/s", round_ + 1, args.repeats, row.mode,
                        row.source, timing.patches_per_s,
                    )  # fmt: skip
                    row.runs.append(timing)
            # Last: obstore's runtime does not survive fork, so DataLoader workers forked after this
            # process had read with it would fall back to s3fs.
            in_main = {
                "S3 (s3fs)": bst.RemoteOptions(storage_options=moto.storage_options(), s3_reads="fsspec"),
                "S3 (obstore)": bst.RemoteOptions(storage_options=moto.storage_options(), s3_reads="obstore"),
            }
            args.read_ms = read_times(
                {"local": (slides[0], None), "HTTP": (sources["HTTP"][0][0], None),
                 **{name: (s3_urls[0], remote) for name, remote in in_main.items()}},
                reads=args.reads, seed=args.seed, decode_threads=args.decode_threads,
            )  # fmt: skip
        finally:
            for proxy in proxies.values():
                proxy.close()
            web.close()
    return [row for row, _, _ in configs]


def read_times(
    sources: dict[str, tuple[Any, bst.RemoteOptions | None]], *, reads: int, seed: int, decode_threads: int
) -> dict[str, tuple[float, float, float]]:
    """Per source: mean wall ms and CPU ms (this process, its threads included) to read a
    ``CHUNK x CHUNK`` level-0 region at tile-aligned places, and requests per read."""
    import numpy as np

    out = {}
    for name, (path, remote) in sources.items():
        reader = bst.open_slide(path, remote=remote, decode_threads=decode_threads)
        width, height = reader.info.dimensions
        rng = np.random.default_rng([seed, 7])
        places = [
            (int(rng.integers((width - CHUNK) // 256 + 1)) * 256, int(rng.integers((height - CHUNK) // 256 + 1)) * 256)
            for _ in range(reads)
        ]
        requests = bst.remote_stats()["requests"]
        wall, cpu = time.perf_counter(), time.process_time()
        for x, y in places:
            reader.read(x, y, 0, CHUNK, CHUNK, planar=True)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        out[name] = (wall / reads * 1e3, cpu / reads * 1e3, (bst.remote_stats()["requests"] - requests) / reads)
        reader.close()
    return out


def report(rows: Sequence[Row], args: argparse.Namespace) -> str:
    local = {r.mode: r for r in rows if r.source == "local"}
    table = []
    for row in rows:
        share = "-" if row.source == "local" else f"{row.patches_per_s / local[row.mode].patches_per_s:.0%}"
        cpu = row.cpu_us_per_patch
        gets = f"{statistics.median(row.gets_per_chunk):.1f}" if row.gets_per_chunk else "-"
        server = row.server_us_per_patch
        table.append([
            row.mode, row.source, f"{row.patches_per_s:,.0f}", share, "-" if cpu is None else f"{cpu:,.0f}",
            "-" if server is None or row.source == "local" else f"{server:,.0f}", gets,
        ])  # fmt: skip
    headers = [
        "mode", "slides", "patches/s", "of local", "CPU us/patch (client)", "CPU us/patch (servers)",
        "GETs per big chunk",
    ]  # fmt: skip
    lines = [
        markdown_table(headers, table),
        "",
    ]
    for mode in MODES:
        for source in SLOW:
            slow = next(r for r in rows if r.mode == mode and r.source == source)
            share = slow.patches_per_s / local[mode].patches_per_s
            verdict = "PASS" if share >= TARGET_OF_LOCAL else "MISS"
            lines.append(
                f"- {mode}, {source}: at least {TARGET_OF_LOCAL:.0%} of local: {share:.0%} -> {verdict}"
            )
    lines.append("")
    lines.append(
        f"Reading one {CHUNK}x{CHUNK} chunk in this process (mean of {args.reads}): "
        + "; ".join(
            f"{name} {wall:.0f} ms wall, {cpu:.0f} ms CPU, {requests:.1f} requests"
            for name, (wall, cpu, requests) in args.read_ms.items()
        )
        + "."
    )
    lines.append("")
    lines.append(
        f"Medians of {args.repeats} run(s) per row ({args.batches} timed batches of {args.batch_size} after "
        f"{args.warmup} warm-up batches, {args.workers} workers, buffer_size={BUFFER_SIZE}, prefetch=4, "
        f"{SMALLCHUNKS} small chunks per big chunk of {CHUNK}x{CHUNK}, decode_threads={args.decode_threads}, "
        f"{args.slides} slides of {args.size}x{args.size}); 1-minute load average before the runs "
        f"{args.loads[0]:.1f}, before each run {min(args.loads[1:] or [0]):.1f}-{max(args.loads[1:] or [0]):.1f} "
        f"on {os.cpu_count()} CPUs. CPU (client): the main process and the DataLoader workers over the "
        "timed batches; CPU (servers): moto, the HTTP server and the proxies together, over the whole run "
        "(they share these cores with the client). "
        + ("moto as it is (each ranged GET reads the whole object)." if args.moto_as_is
           else "moto with ranged GETs reading only the range (benchmarks/_moto_ranged.py).")
    )
    return "\n".join(lines)


_SCALED = {
    "batches": (200, 30, "timed batches per run"),
    "warmup": (10, 3, "warm-up batches per run"),
    "repeats": (3, 1, "rounds; the table shows medians"),
    "reads": (8, 3, "chunk reads timed per source for the side line"),
}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = make_parser(__file__, __doc__)
    add_scaled_options(parser, _SCALED, "smoke run: fewer batches, one round (about a minute)")
    add_stream_options(parser, decode_threads=DECODE_THREADS, slides_dir=REPO_ROOT / ".cache" / "bench-slides")
    parser.add_argument(
        "--moto-as-is", action="store_true",
        help="run moto's S3 server unchanged (its ranged GETs read the whole object)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    resolve_stream_options(parser, args, _SCALED, CHUNK)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args.loads = [os.getloadavg()[0]]
    if args.loads[0] > 0.5 * (os.cpu_count() or 1):
        logger.warning("the machine is busy (load average %.1f): timings will be noisy", args.loads[0])
    slides = prepare_slides(args.slides_dir, n=args.slides, size=args.size, seed=args.seed)
    rows = run(args, slides)
    print(report(rows, args))
    if args.json is not None:
        payload = {
            "rows": [
                {"mode": r.mode, "source": r.source, "patches_per_s": r.patches_per_s,
                 "cpu_us_per_patch": r.cpu_us_per_patch, "gets_per_chunk": r.gets_per_chunk,
                 "runs": [vars(t) for t in r.runs]}
                for r in rows
            ],
        }  # fmt: skip
        write_json(args.json, args, payload)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
