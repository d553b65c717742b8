"""Annotated sampling with masks against plain sampling, per-sample and batched, side by side.

Two synthetic 8192x8192 slides (256 px JPEG tiles, texture from the real slide
``../shared/slides/cmu-1-small-region.svs`` when present), each painted with a few tumour and stroma
polygons (a tumour one with a hole, a stroma one overlapping it) and with the matching QuPath GeoJSON
(a FeatureCollection, each Feature classified by ``properties.classification.name``) beside it,
cached under ``.cache/bench-slides/annotations``. Every row uses the same seed and DataLoader
settings (batch 64, 2 workers, 224x224 crops, ``buffer_size=4``, 256 small chunks per big chunk):

* ``plain``: ``RandomRegionLoader(2048)`` and ``RandomCropCollector(224)``;
* ``annotated``: ``RandomRegionLoader(2048, annotations="annotations", classes=["Tumor", "Stroma"])``
  and ``RandomCropCollector(224, masks=True)``: big chunks centred on annotated points, each with
  its 2048x2048 label raster, every sample with a ``"target"`` and a ``[224, 224]`` uint8 ``"mask"``;

each per-sample (``BigSmallDataset(batch_size=None)``, ``DataLoader(batch_size=64)``) and batched
(``BigSmallDataset(batch_size=64)``, ``DataLoader(batch_size=None)``). The rows run interleaved,
``--repeats`` rounds (the order reversed every other round), each from a cold iterator (fresh
workers); the table shows medians. Target: annotated sampling keeps at least 85% of the plain
throughput of the same mode (costs at most 15%).

Two lines measured in the same run, in this process, help read the difference: the mean time to
rasterise one 2048x2048 label raster (``ClassRegions.rasterize`` at windows placed as the loader
places annotated chunks), and the mean time to read a 2048x2048 chunk at uniform and at annotated
placements (the painted regions are flat colour, whose tiles decode differently from texture: the
annotated rows read other pixels than the plain ones).

    python -m benchmarks.bench_annotations            # full run (2-3 minutes on 2 cores)
    python -m benchmarks.bench_annotations --quick    # smoke run (about 20 s)
    python -m benchmarks.bench_annotations --profile  # where the time goes (num_workers=0)

``--profile`` does not time the DataLoader rows: it runs plain sampling, annotated sampling without
masks (``RandomCropCollector(224)``: the loader's placement and rasterising alone) and annotated
sampling with masks, per-sample and batched, with ``num_workers=0`` and one torch thread (as in a
DataLoader worker), and prints the CPU time per patch of this process (its loading thread included),
the per-stage breakdown (:meth:`~bigsmall_torch.ReservoirStats.breakdown`) and the functions that
took most time in the consuming thread (cProfile; the loading thread's reading and rasterising show
in the ``load`` stage, not there).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import logging
import os
import pstats
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

import bigsmall_torch as bst
from bigsmall_torch.annotations import ClassRegions, patient_regions
from bigsmall_torch.synthetic import write_synthetic_slide

try:
    from ._common import (
        REAL_SLIDE,
        REPO_ROOT,
        LoaderTiming,
        add_scaled_options,
        add_stream_options,
        make_parser,
        markdown_table,
        resolve_stream_options,
        time_loader,
        write_json,
    )
    from .bench_core import BUFFER_SIZE, CHUNK, DECODE_THREADS, PATCH
except ImportError:  # run as a script: python benchmarks/bench_annotations.py
    from _common import (
        REAL_SLIDE,
        REPO_ROOT,
        LoaderTiming,
        add_scaled_options,
        add_stream_options,
        make_parser,
        markdown_table,
        resolve_stream_options,
        time_loader,
        write_json,
    )
    from bench_core import BUFFER_SIZE, CHUNK, DECODE_THREADS, PATCH

__all__ = [
    "annotated_slides",
    "main",
    "make_dataset",
    "profile",
    "rasterize_times",
    "read_times",
    "run",
]

logger = logging.getLogger("bench_annotations")

SMALLCHUNKS = 256
CLASSES = ("Tumor", "Stroma")
COLOURS = {"Tumor": (110, 40, 150), "Stroma": (230, 140, 180)}
TARGET_OF_PLAIN = 0.85  # annotated patches/s >= 85% of plain (costs at most 15%)
MODES = ("per-sample", "batched")
SAMPLINGS = ("plain", "annotated")
# (class, centre x, centre y, radius, hole radius) as fractions of the slide side; painted and
# written in this order, so the later stroma covers the tumour where they overlap (as the later
# class in CLASSES wins in the label rasters).
SHAPES = (
    ("Tumor", 0.35, 0.40, 0.20, 0.06),
    ("Tumor", 0.72, 0.20, 0.10, 0.0),
    ("Stroma", 0.62, 0.55, 0.17, 0.0),
    ("Stroma", 0.30, 0.78, 0.12, 0.0),
)
VERTICES, HOLE_VERTICES = 256, 64  # per outline, about what QuPath exports for hand-drawn regions


# -- slides and annotations -----------------------------------------------------------------------


def _ring(
    rng: np.random.Generator, cx: float, cy: float, radius: float, n: int
) -> list[list[float]]:
    """A closed, smooth, star-shaped (so simple) ring of ``n`` vertices around ``(cx, cy)``."""
    theta = np.linspace(0, 2 * np.pi, n, endpoint=False)
    wobble = sum(
        rng.uniform(0.02, 0.08) * np.sin(k * theta + rng.uniform(0, 2 * np.pi))
        for k in (2, 3, 5, 9)
    )
    r = radius * (1 + wobble)
    xs, ys = cx + r * np.cos(theta), cy + r * np.sin(theta)
    ring = [[round(float(x), 1), round(float(y), 1)] for x, y in zip(xs, ys, strict=True)]
    return [*ring, ring[0]]


def annotation_features(size: int, seed: int) -> list[dict[str, Any]]:
    """The QuPath GeoJSON Features of one ``size x size`` slide (level-0 pixels)."""
    rng = np.random.default_rng([seed, 1])
    features = []
    for name, fx, fy, fr, fh in SHAPES:
        cx, cy = (fx + rng.uniform(-0.03, 0.03)) * size, (fy + rng.uniform(-0.03, 0.03)) * size
        rings = [_ring(rng, cx, cy, fr * size, VERTICES)]
        if fh:
            rings.append(_ring(rng, cx, cy, fh * size, HOLE_VERTICES)[::-1])  # holes run clockwise
        features.append({
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": rings},
            "properties": {
                "objectType": "annotation",
                "classification": {"name": name, "color": list(COLOURS[name])},
            },
        })  # fmt: skip
    return features


def annotated_slides(folder: Path, *, n: int, size: int, seed: int) -> list[tuple[Path, Path]]:
    """``n`` painted ``size x size`` slides with their GeoJSON, in ``folder/size-<size>``: written on
    first use, re-used while the parameters stored beside them (``*.params.json``) match."""
    target = folder / f"size-{size}"
    target.mkdir(parents=True, exist_ok=True)
    texture = REAL_SLIDE if REAL_SLIDE.exists() else None
    pairs = []
    for i in range(n):
        slide, geojson = target / f"annotated_{i:03d}.tiff", target / f"annotated_{i:03d}.geojson"
        sidecar = target / f"annotated_{i:03d}.params.json"
        features = annotation_features(size, seed + i)
        params = {
            "size": size, "tile_size": 256, "tissue": "full", "seed": seed + i,
            "texture_source": None if texture is None else str(texture), "features": features,
        }  # fmt: skip
        try:
            stored = json.loads(sidecar.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            stored = None
        if stored == params and slide.exists() and geojson.exists():
            logger.info("re-using %s and %s", slide, geojson.name)
        else:
            logger.info("writing %s (%dx%d) and %s", slide, size, size, geojson.name)
            paint = [
                (f["geometry"], COLOURS[f["properties"]["classification"]["name"]])
                for f in features
            ]
            write_synthetic_slide(
                slide, width=size, height=size, tile_size=256, tissue="full",
                texture_source=texture, seed=seed + i, paint=paint, overwrite=True,
            )  # fmt: skip
            document = {"type": "FeatureCollection", "features": features}
            geojson.write_text(json.dumps(document) + "\n", encoding="utf-8")
            sidecar.write_text(json.dumps(params) + "\n", encoding="utf-8")  # last: marks complete
        pairs.append((slide, geojson))
    return pairs


# -- the datasets -----------------------------------------------------------------------------------


def make_dataset(
    pairs: Sequence[tuple[Path, Path]],
    *,
    annotated: bool,
    batch_size: int | None,
    samples: int,
    decode_threads: int,
    seed: int,
    masks: bool = True,
) -> bst.BigSmallDataset:
    """The benchmark's dataset: plain or annotated (with masks unless ``masks=False``), per-sample
    when ``batch_size`` is None, else batched."""
    patients = [
        bst.Patient(slide.stem, {"wsi": bst.Record(slide), "annotations": bst.Record(geojson)})
        for slide, geojson in pairs
    ]
    if annotated:
        loader = bst.RandomRegionLoader(CHUNK, annotations="annotations", classes=list(CLASSES))
        collector = bst.RandomCropCollector(PATCH, masks=masks)
    else:
        loader = bst.RandomRegionLoader(CHUNK)
        collector = bst.RandomCropCollector(PATCH)
    return bst.BigSmallDataset(
        bst.Dataset("bench-annotations", patients),
        loader,
        collector,
        buffer_size=BUFFER_SIZE,
        smallchunks_per_bigchunk=SMALLCHUNKS,
        samples_per_epoch=samples,
        seed=seed,
        batch_size=batch_size,
        decode_threads=decode_threads,
    )


def _check_annotated(dataset: bst.BigSmallDataset, batch_size: int, batched: bool) -> None:
    """One batch read in this process (``num_workers=0``) carries targets and uint8 masks."""
    loader = DataLoader(dataset, batch_size=None if batched else batch_size, num_workers=0)
    batch = next(iter(loader))
    mask, target = batch.get("mask"), batch.get("target")
    shape = (batch_size, PATCH, PATCH)
    if mask is None or tuple(mask.shape) != shape or str(mask.dtype) != "torch.uint8":
        got = None if mask is None else f"{mask.dtype} {tuple(mask.shape)}"
        raise RuntimeError(f"expected uint8 masks of shape {shape} in annotated batches, got {got}")
    if target is None or len(target) != batch_size:
        raise RuntimeError("annotated batches carry no 'target' of one class index per sample")
    del loader  # ends the stream (and its loading thread)


@dataclass
class Row:
    """Medians over the rounds of one configuration."""

    mode: str
    sampling: str
    runs: list[LoaderTiming]

    @property
    def patches_per_s(self) -> float:
        return statistics.median(r.patches_per_s for r in self.runs)

    @property
    def first_batch_s(self) -> float:
        return statistics.median(r.first_batch_s for r in self.runs)

    @property
    def cpu_us_per_patch(self) -> float | None:
        cpus = [r.cpu_us_per_patch for r in self.runs if r.cpu_us_per_patch is not None]
        return statistics.median(cpus) if cpus else None


def run(args: argparse.Namespace, pairs: Sequence[tuple[Path, Path]]) -> list[Row]:
    """Every configuration ``args.repeats`` times, interleaved, each from a cold iterator."""
    samples = 2 * (1 + args.warmup + args.batches) * args.batch_size  # no worker ends while timed
    configs = []
    for mode in MODES:
        for sampling in SAMPLINGS:
            batched, annotated = mode == "batched", sampling == "annotated"
            dataset = make_dataset(
                pairs, annotated=annotated, batch_size=args.batch_size if batched else None,
                samples=samples, decode_threads=args.decode_threads, seed=args.seed,
            )  # fmt: skip
            if annotated:
                _check_annotated(dataset, args.batch_size, batched)
            configs.append((Row(mode, sampling, []), dataset, batched))
    for round_ in range(args.repeats):
        order = configs if round_ % 2 == 0 else configs[::-1]
        for row, dataset, batched in order:
            args.loads.append(os.getloadavg()[0])
            loader = DataLoader(
                dataset, batch_size=None if batched else args.batch_size, num_workers=args.workers
            )
            timing = time_loader(
                loader, warmup=args.warmup, batches=args.batches, patch=PATCH,
                batch_size=args.batch_size,
            )  # fmt: skip
            logger.info(
                "round %d/%d, %s %s: %.0f patches/s, first batch %.2f s",
                round_ + 1, args.repeats, row.mode, row.sampling, timing.patches_per_s,
                timing.first_batch_s,
            )  # fmt: skip
            row.runs.append(timing)
    return [row for row, _, _ in configs]


# -- the side measurements: rasterising and reading -------------------------------------------------


def _annotated_origin(
    regions: ClassRegions, rng: np.random.Generator, width: int, height: int
) -> tuple[int, int]:
    """Top-left of a ``CHUNK`` window centred on a point drawn uniformly from the annotated area
    (a class in proportion to its area), clipped to the slide: where the loader puts its chunks."""
    areas = np.array([regions.area(k) for k in range(len(regions.classes))])
    k = int(np.searchsorted(np.cumsum(areas), rng.random() * areas.sum(), side="right"))
    point = regions.sample(min(k, len(areas) - 1), rng)
    assert point is not None  # every class has area on these slides
    x = int(np.clip(round(point[0] - CHUNK / 2), 0, width - CHUNK))
    y = int(np.clip(round(point[1] - CHUNK / 2), 0, height - CHUNK))
    return x, y


def rasterize_times(pairs: Sequence[tuple[Path, Path]], *, windows: int, seed: int) -> list[float]:
    """Seconds to rasterise a ``CHUNK x CHUNK`` label raster, ``windows`` per slide at annotated
    placements (the regions are built, and cached, before timing starts)."""
    times = []
    for i, (slide, geojson) in enumerate(pairs):
        reader = bst.open_slide(slide)
        try:
            regions = patient_regions(bst.Record(geojson), CLASSES, reader)
            width, height = reader.info.dimensions
        finally:
            reader.close()
        rng = np.random.default_rng([seed, 2, i])
        regions.rasterize(0, 0, CHUNK, CHUNK)  # first call: nothing lazy left in the timings
        for _ in range(windows):
            x, y = _annotated_origin(regions, rng, width, height)
            start = time.perf_counter()
            regions.rasterize(x, y, CHUNK, CHUNK)
            times.append(time.perf_counter() - start)
    return times


def read_times(
    pairs: Sequence[tuple[Path, Path]], *, reads: int, decode_threads: int, seed: int
) -> dict[str, list[float]]:
    """Seconds to read a ``CHUNK x CHUNK`` level-0 region, ``reads`` per slide at uniform
    tile-aligned placements and as many at annotated ones, alternating."""
    times: dict[str, list[float]] = {"uniform": [], "annotated": []}
    for i, (slide, geojson) in enumerate(pairs):
        reader = bst.open_slide(slide, decode_threads=decode_threads)
        try:
            regions = patient_regions(bst.Record(geojson), CLASSES, reader)
            width, height = reader.info.dimensions
            tile = (reader.info.tile_size or (256, 256))[0]
            rng = np.random.default_rng([seed, 3, i])
            reader.read(0, 0, 0, CHUNK, CHUNK, planar=True)  # warm the handle
            for _ in range(reads):
                x = int(rng.integers((width - CHUNK) // tile + 1)) * tile
                y = int(rng.integers((height - CHUNK) // tile + 1)) * tile
                for kind, (ox, oy) in (
                    ("uniform", (x, y)),
                    ("annotated", _annotated_origin(regions, rng, width, height)),
                ):
                    start = time.perf_counter()
                    reader.read(ox, oy, 0, CHUNK, CHUNK, planar=True)
                    times[kind].append(time.perf_counter() - start)
        finally:
            reader.close()
    return times


# -- --profile: where the time goes ----------------------------------------------------------------

PROFILED = (  # label, annotated, masks
    ("plain", False, False),
    ("annotated, no masks", True, False),
    ("annotated", True, True),
)


@dataclass
class ProfileRow:
    """One configuration run with ``num_workers=0`` under cProfile."""

    mode: str
    sampling: str
    patches: int
    wall_s: float
    cpu_s: float  # this process, its loading thread included
    stages: dict[str, float]
    top: list[tuple[str, int, float, float]]  # function, calls, own s, cumulative s


def _function(key: tuple[str, int, str]) -> str:
    file, line, name = key
    return name if file == "~" else f"{Path(file).name}:{line}({name})"


def profile(args: argparse.Namespace, pairs: Sequence[tuple[Path, Path]]) -> list[ProfileRow]:
    """Each :data:`PROFILED` configuration, per-sample and batched, for ``args.profile_batches``
    timed batches (after ``args.warmup``) with ``num_workers=0`` and one torch thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what a DataLoader worker runs with
    rows = []
    try:
        for mode in MODES:
            batched = mode == "batched"
            for label, annotated, masks in PROFILED:
                samples = 2 * (1 + args.warmup + args.profile_batches) * args.batch_size
                dataset = make_dataset(
                    pairs, annotated=annotated, masks=masks, samples=samples, seed=args.seed,
                    batch_size=args.batch_size if batched else None,
                    decode_threads=args.decode_threads,
                )  # fmt: skip
                loader = DataLoader(
                    dataset, batch_size=None if batched else args.batch_size, num_workers=0
                )
                iterator = iter(loader)
                for _ in range(1 + args.warmup):
                    next(iterator)
                before = dataset.last_stats.breakdown()  # the timed batches only count
                profiler, patches = cProfile.Profile(), 0
                cpu, start = time.process_time(), time.perf_counter()
                profiler.enable()
                for _ in range(args.profile_batches):
                    patches += len(next(iterator)["image"])
                profiler.disable()
                wall, cpu = time.perf_counter() - start, time.process_time() - cpu
                del iterator, loader  # ends the stream (and its loading thread)
                stats = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
                ranked = sorted(stats.items(), key=lambda kv: kv[1][2], reverse=True)
                top = [(_function(k), v[1], v[2], v[3]) for k, v in ranked[: args.profile_top]]
                after = dataset.last_stats.breakdown()
                breakdown = {k: after[k] - before[k] for k in after}
                rows.append(ProfileRow(mode, label, patches, wall, cpu, breakdown, top))
                logger.info("profile %s %s: %d patches in %.1f s", mode, label, patches, wall)
    finally:
        torch.set_num_threads(threads)
    return rows


def profile_report(rows: Sequence[ProfileRow], args: argparse.Namespace) -> str:
    stages = list(rows[0].stages)
    headers = ["mode", "sampling", "patches/s", "CPU us/patch", "CPU vs plain"]
    headers += [f"{s} us/patch" for s in stages]
    body = []
    for r in rows:
        plain = next(p for p in rows if p.mode == r.mode and p.sampling == "plain")
        cpu, plain_cpu = r.cpu_s / r.patches, plain.cpu_s / plain.patches
        body.append([
            r.mode, r.sampling, f"{r.patches / r.wall_s:,.0f}", f"{1e6 * cpu:,.0f}",
            "-" if r is plain else f"{cpu / plain_cpu - 1:+.0%}",
            *[f"{1e6 * r.stages[s] / r.patches:,.0f}" for s in stages],
        ])  # fmt: skip
    lines = [
        f"num_workers=0, one torch thread, {args.profile_batches} timed batches of "
        f"{args.batch_size} after {args.warmup} warm-up batches, decode_threads="
        f"{args.decode_threads}. CPU: this process, the loading thread included; the stages are "
        "wall time (load runs in the loading thread, concurrently with the others).",
        "",
        markdown_table(headers, body),
    ]
    for r in rows:
        if r.sampling != "annotated":
            continue
        top = [
            [name, f"{calls:,}", f"{own:.3f}", f"{1e6 * own / r.patches:,.1f}", f"{cum:.3f}"]
            for name, calls, own, cum in r.top
        ]
        lines += [
            "",
            f"Top functions of the consuming thread, {r.mode} annotated with masks (by own time):",
            "",
            markdown_table(["function", "calls", "own s", "own us/patch", "cumulative s"], top),
        ]
    return "\n".join(lines)


# -- report -----------------------------------------------------------------------------------------


def _find(rows: Sequence[Row], mode: str, sampling: str) -> Row:
    return next(r for r in rows if r.mode == mode and r.sampling == sampling)


def _paired(row: Row, plain: Row) -> str:
    """Median (min-max) over rounds of ``row``'s patches/s over ``plain``'s in the same round: the
    two ran back to back, so a slow drift of the machine's load cancels out."""
    ratios = [a.patches_per_s / b.patches_per_s for a, b in zip(row.runs, plain.runs, strict=True)]
    return f"{statistics.median(ratios):.0%} ({min(ratios):.0%}-{max(ratios):.0%})"


def report(
    rows: Sequence[Row],
    raster_s: Sequence[float],
    reads: dict[str, list[float]],
    args: argparse.Namespace,
) -> str:
    headers = [
        "mode", "sampling", "patches/s", "annotated / plain", "same round (min-max)",
        "CPU us/patch", "CPU vs plain", "first batch (s)",
    ]  # fmt: skip
    body = []
    for r in rows:
        plain = _find(rows, r.mode, "plain")
        cpu, plain_cpu = r.cpu_us_per_patch, plain.cpu_us_per_patch
        annotated = r.sampling == "annotated"
        body.append([
            r.mode,
            r.sampling,
            f"{r.patches_per_s:,.0f}",
            f"{r.patches_per_s / plain.patches_per_s:.0%}" if annotated else "-",
            _paired(r, plain) if annotated else "-",
            "n/a" if cpu is None else f"{cpu:,.0f}",
            f"{cpu / plain_cpu - 1:+.0%}" if annotated and cpu and plain_cpu else "-",
            f"{r.first_batch_s:.2f}",
        ])  # fmt: skip
    lines = [markdown_table(headers, body), ""]
    for mode in MODES:
        ratio = (
            _find(rows, mode, "annotated").patches_per_s / _find(rows, mode, "plain").patches_per_s
        )
        passed = ratio >= TARGET_OF_PLAIN
        lines.append(
            f"- {mode}: annotated sampling costs at most {1 - TARGET_OF_PLAIN:.0%} of the plain "
            f"throughput (annotated >= {TARGET_OF_PLAIN:.0%} of plain): {ratio:.0%} -> "
            f"{'PASS' if passed else 'MISS'}"
        )
    mean = statistics.mean(raster_s)
    lines += [
        "",
        f"Rasterising a {CHUNK}x{CHUNK} label raster (ClassRegions.rasterize, {len(raster_s)} "
        f"windows at annotated placements): mean {1e3 * mean:.1f} ms, median "
        f"{1e3 * statistics.median(raster_s):.1f} ms, max {1e3 * max(raster_s):.1f} ms; "
        f"{1e6 * mean / SMALLCHUNKS:.0f} us per patch at {SMALLCHUNKS} small chunks per big chunk.",
        f"Reading a {CHUNK}x{CHUNK} chunk (decode_threads={args.decode_threads}, "
        f"{len(reads['uniform'])} reads each): uniform placement mean "
        f"{1e3 * statistics.mean(reads['uniform']):.1f} ms, annotated placement mean "
        f"{1e3 * statistics.mean(reads['annotated']):.1f} ms.",
        "",
        f"Medians of {args.repeats} run(s) per row ({args.batches} timed batches of "
        f"{args.batch_size} after {args.warmup} warm-up batches, {args.workers} workers, "
        f"buffer_size={BUFFER_SIZE}, {SMALLCHUNKS} small chunks per big chunk, "
        f"decode_threads={args.decode_threads}, {args.slides} slides of {args.size}x{args.size}); "
        f"1-minute load average before the runs {args.loads[0]:.1f}, before each run "
        f"{min(args.loads[1:], default=args.loads[0]):.1f}-"
        f"{max(args.loads[1:], default=args.loads[0]):.1f} (ours included) on {os.cpu_count()} "
        "CPUs. CPU us/patch: CPU time of the main process and the workers over the timed batches, "
        "per patch (little affected by other work on the machine). 'annotated / plain' divides the "
        "medians; 'same round' divides the two rows' runs of each round (back to back) first.",
    ]
    return "\n".join(lines)


# Options whose default depends on --quick: name -> (default, --quick default, help).
_SCALED = {
    "batches": (400, 40, "timed batches per run"),
    "warmup": (10, 3, "batches skipped after the first one before timing starts"),
    "repeats": (5, 1, "runs of every row, interleaved; the table shows medians"),
    "raster_windows": (50, 10, "label rasters timed per slide"),
    "reads": (8, 2, "chunk reads timed per slide and placement"),
    "profile_batches": (200, 40, "timed batches per configuration with --profile"),
    "profile_top": (15, 10, "functions listed per profiled configuration"),
}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = make_parser(__file__, __doc__)
    add_scaled_options(parser, _SCALED, "smoke run: fewer batches, one round (about 20 s)")
    add_stream_options(
        parser, decode_threads=DECODE_THREADS, slides_dir=REPO_ROOT / ".cache" / "bench-slides" / "annotations"
    )
    parser.add_argument(
        "--profile", action="store_true",
        help="instead of the table: where the time goes, with num_workers=0 and cProfile",
    )  # fmt: skip
    args = parser.parse_args(argv)
    resolve_stream_options(parser, args, _SCALED, CHUNK)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args.loads = [os.getloadavg()[0]]  # before any worker of ours runs: other processes only
    if args.loads[0] > 0.5 * (os.cpu_count() or 1):
        logger.warning(
            "the machine is busy (load average %.1f): timings will be noisy", args.loads[0]
        )
    pairs = annotated_slides(args.slides_dir, n=args.slides, size=args.size, seed=args.seed)
    if args.profile:
        profiled = profile(args, pairs)
        print(profile_report(profiled, args))
        print(f"\nLoad average before the runs: {args.loads[0]:.1f} on {os.cpu_count()} CPUs.")
        if args.json is not None:
            write_json(args.json, args, {"profile": [vars(r) for r in profiled]})
        return 0
    raster_s = rasterize_times(pairs, windows=args.raster_windows, seed=args.seed)
    rows = run(args, pairs)
    reads = read_times(pairs, reads=args.reads, decode_threads=args.decode_threads, seed=args.seed)
    print(report(rows, raster_s, reads, args))
    if args.json is not None:
        payload = {
            "rows": [
                {"mode": r.mode, "sampling": r.sampling, "patches_per_s": r.patches_per_s,
                 "cpu_us_per_patch": r.cpu_us_per_patch, "first_batch_s": r.first_batch_s,
                 "runs": [vars(t) for t in r.runs]}
                for r in rows
            ],
            "rasterize_s": list(raster_s),
            "read_s": reads,
        }  # fmt: skip
        write_json(args.json, args, payload)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
