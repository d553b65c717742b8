"""Core throughput benchmark: bigsmall_torch against per-patch readers and a crop-only ceiling.

Every row uses the same DataLoader settings (batch 64, 2 workers, 224x224 crops, uint8 CHW batches):

* ``bigsmall_torch per-sample``: :class:`~bigsmall_torch.BigSmallDataset` with
  ``RandomRegionLoader(2048)`` and ``RandomCropCollector(224)``, ``buffer_size=4``, at 256 and at 1024
  small chunks per big chunk, ``DataLoader(batch_size=64)`` collating the samples;
* ``bigsmall_torch batched``: the same datasets with ``batch_size=64`` (whole batches built in the
  worker, in shared memory) and ``DataLoader(batch_size=None)``;
* ``naive read_region``: a map-style dataset calling openslide ``read_region`` once per patch at a
  random location (what most WSI pipelines do);
* ``MONAI PatchWSIDataset``: MONAI's patch dataset (optional: skipped with a note when ``monai`` is
  not importable) with its OpenSlide reader, one random location per sample. Its ``tifffile`` reader
  decodes the whole level for every patch (``TiffFileWSIReader._get_patch`` calls
  ``wsi.asarray(level)``: about 16 s per patch on these slides) and cuCIM needs a CUDA build, so
  OpenSlide is the one that works here. A transform turns its ``MetaTensor`` into a plain uint8 CHW
  tensor and drops the metadata;
* ``crop-only ceiling``: random crops of one 2048x2048 array already in RAM per worker: the cost of
  cropping, collating and moving batches between processes, with no slide I/O at all. Two rows: the
  array interleaved (HWC in memory) and channel-planar, the layout bigsmall_torch's loaders store big
  chunks in; "% of ceiling" is relative to the planar one (per-sample, collated by the DataLoader).

The slides are synthetic pyramidal TIFFs (32768x32768, 256 px JPEG tiles, texture taken from the real
slide ``../shared/slides/cmu-1-small-region.svs`` when present) cached under ``.cache/bench-slides``.

    python -m benchmarks.bench_core                       # full run (a few minutes)
    python -m benchmarks.bench_core --quick               # smoke run, about a minute
    python -m benchmarks.bench_core --decode-threads 2    # JPEG decode threads per worker
    python -m benchmarks.bench_core --profile             # per-stage time breakdown and mixing

``--profile`` does not time the DataLoader rows: it runs the four bigsmall_torch configurations with
``num_workers=0`` (everything in this process, so that ``ds.last_stats`` is the one that ran) and
prints where the time went (:meth:`~bigsmall_torch.ReservoirStats.breakdown`), then measures how well
batches mix (distinct patients and big chunks per batch, same-chunk transitions) with the benchmark's
own settings (2 workers).
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import statistics
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

import bigsmall_torch as bst
from bigsmall_torch.chunks import BigChunk, ChunkContext, SmallChunk

try:
    from ._common import (
        REPO_ROOT,
        LoaderTiming,
        add_scaled_options,
        make_parser,
        markdown_table,
        prepare_slides,
        resolve_scaled,
        time_loader,
    )
except ImportError:  # run as a script: python benchmarks/bench_core.py
    from _common import (
        REPO_ROOT,
        LoaderTiming,
        add_scaled_options,
        make_parser,
        markdown_table,
        prepare_slides,
        resolve_scaled,
        time_loader,
    )

__all__ = [
    "CropCeilingDataset",
    "NaiveReadRegionDataset",
    "TaggingCropCollector",
    "main",
    "make_bigsmall",
    "make_monai",
    "mixing",
    "run",
]

logger = logging.getLogger("bench_core")

CHUNK = 2048  # big chunk (and ceiling array) side
PATCH = 224
BUFFER_SIZE = 4
SMALLCHUNKS = (256, 1024)
DECODE_THREADS = 1  # measured best on the 2-core benchmark machine (see docs/tuning.md)
TARGET_X_NAIVE = 7.0  # per-sample at 256 small chunks per big chunk vs naive
TARGET_BATCHED_X_NAIVE = 12.0  # batched at 256 vs naive
TARGET_OF_CEILING = 0.8  # per-sample at 1024 vs the crop-only ceiling
TARGET_BATCHED_OF_CEILING = 1.3  # batched at 1024 vs the (per-sample) crop-only ceiling
TARGET_FIRST_BATCH_S = 1.0
NAIVE = "naive read_region"
MONAI = "MONAI PatchWSIDataset (OpenSlide)"
OURS = "bigsmall_torch per-sample"
OURS_BATCHED = "bigsmall_torch batched"
CEILINGS = {False: "crop-only ceiling, HWC array", True: "crop-only ceiling, planar array"}
CEILING = CEILINGS[True]  # the faster layout, the one bigsmall_torch's loaders use


class NaiveReadRegionDataset(Dataset):
    """One openslide ``read_region`` per patch; sample ``index`` -> seeded random slide and location.

    Slides are opened lazily, so each DataLoader worker opens its own handles.
    """

    def __init__(
        self, paths: Sequence[Path], *, length: int, patch: int = PATCH, seed: int = 0
    ) -> None:
        import openslide

        self.paths = [str(p) for p in paths]
        self.ids = [Path(p).stem for p in paths]
        self.length = length
        self.patch = patch
        self.seed = seed
        self.dimensions = []
        for path in self.paths:
            with openslide.OpenSlide(path) as slide:
                self.dimensions.append(slide.dimensions)
        self._handles: dict[int, Any] = {}

    def __len__(self) -> int:
        return self.length

    def _slide(self, index: int) -> Any:
        if index not in self._handles:
            import openslide

            self._handles[index] = openslide.OpenSlide(self.paths[index])
        return self._handles[index]

    def __getitem__(self, index: int) -> dict[str, Any]:
        rng = np.random.default_rng([self.seed, index])
        i = int(rng.integers(len(self.paths)))
        width, height = self.dimensions[i]
        x = int(rng.integers(0, width - self.patch + 1))
        y = int(rng.integers(0, height - self.patch + 1))
        rgba = np.asarray(self._slide(i).read_region((x, y), 0, (self.patch, self.patch)))
        image = torch.from_numpy(np.ascontiguousarray(rgba[:, :, :3])).permute(2, 0, 1)
        return {"image": image, "patient_id": self.ids[i], "x": x, "y": y, "level": 0}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_handles": {}}  # handles never travel to another process


class CropCeilingDataset(IterableDataset):
    """Endless random crops of one ``chunk x chunk`` uint8 array held in RAM by each worker.

    The array is ``H x W x 3`` either way; ``planar=True`` keeps it channel-planar in memory (as
    bigsmall_torch's loaders store big chunks), so that the CHW crops batch as row copies.
    """

    def __init__(
        self, *, chunk: int = CHUNK, patch: int = PATCH, planar: bool = False, seed: int = 0
    ) -> None:
        self.chunk = chunk
        self.patch = patch
        self.planar = planar
        self.seed = seed

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        rng = np.random.default_rng([self.seed, info.id if info is not None else 0])
        if self.planar:
            array = rng.integers(0, 256, (3, self.chunk, self.chunk), dtype=np.uint8)
            array = array.transpose(1, 2, 0)
        else:
            array = rng.integers(0, 256, (self.chunk, self.chunk, 3), dtype=np.uint8)
        limit = self.chunk - self.patch + 1
        while True:
            x, y = int(rng.integers(limit)), int(rng.integers(limit))
            crop = array[y : y + self.patch, x : x + self.patch]
            yield {
                "image": torch.from_numpy(crop).permute(2, 0, 1),
                "patient_id": "ceiling",
                "x": x,
                "y": y,
                "level": 0,
            }


class TaggingCropCollector(bst.RandomCropCollector):
    """:class:`~bigsmall_torch.RandomCropCollector` that also stores the level-0 ``chunk_x`` /
    ``chunk_y`` of the big chunk each sample comes from (to measure how batches mix)."""

    def extract_smallchunk(
        self, call_count: int, bigchunk: BigChunk, ctx: ChunkContext
    ) -> SmallChunk | None:
        small = super().extract_smallchunk(call_count, bigchunk, ctx)
        if small is not None:
            small.info["chunk_x"] = bigchunk.info["x"]
            small.info["chunk_y"] = bigchunk.info["y"]
        return small


class MonaiToImage:
    """MONAI transform: the sample's ``MetaTensor`` image as a plain uint8 CHW tensor, nothing else."""

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        image = sample["image"]
        plain = image.as_tensor() if hasattr(image, "as_tensor") else torch.as_tensor(image)
        return {"image": plain.to(torch.uint8)}


def make_monai(
    paths: Sequence[Path], *, length: int, patch: int = PATCH, seed: int = 0
) -> Dataset | None:
    """MONAI's ``PatchWSIDataset`` over ``length`` seeded random level-0 locations (OpenSlide
    reader); None when ``monai`` is not importable."""
    try:
        from monai.data import PatchWSIDataset
    except ImportError:
        return None
    import openslide

    sizes = []
    for path in paths:
        with openslide.OpenSlide(str(path)) as slide:
            sizes.append(slide.dimensions)
    rng = np.random.default_rng([seed, 1])
    data = []
    for _ in range(length):
        i = int(rng.integers(len(paths)))
        width, height = sizes[i]
        x, y = int(rng.integers(0, width - patch + 1)), int(rng.integers(0, height - patch + 1))
        # MONAI locations are (row, column) of the top-left at level 0 with center_location=False.
        data.append({"image": str(paths[i]), "location": [y, x]})
    return PatchWSIDataset(
        data,
        patch_size=patch,
        patch_level=0,
        include_label=False,
        center_location=False,
        transform=MonaiToImage(),
        reader="OpenSlide",
    )


def make_bigsmall(
    paths: Sequence[Path],
    *,
    smallchunks: int,
    samples: int | None,
    batch_size: int | None,
    decode_threads: int,
    seed: int,
    tagging: bool = False,
) -> bst.BigSmallDataset:
    """The benchmark's :class:`~bigsmall_torch.BigSmallDataset` (per-sample when ``batch_size`` is
    None, else batched)."""
    patients = bst.Dataset("bench", [bst.Patient(p.stem, {"wsi": bst.Record(p)}) for p in paths])
    collector = TaggingCropCollector(patch_size=PATCH) if tagging else bst.RandomCropCollector(patch_size=PATCH)
    return bst.BigSmallDataset(
        patients,
        bst.RandomRegionLoader(size=CHUNK, level=0),
        collector,
        buffer_size=BUFFER_SIZE,
        smallchunks_per_bigchunk=smallchunks,
        samples_per_epoch=samples,
        seed=seed,
        batch_size=batch_size,
        decode_threads=decode_threads,
    )


@dataclass
class Row:
    """One row of the table: the median over rounds of one loader configuration."""

    loader: str
    smallchunks_per_bigchunk: int | None
    patches_per_s: float
    first_batch_s: float
    worker_peak_rss_mib: float | None  # the largest over workers and rounds
    main_peak_rss_mib: float | None
    total_peak_rss_mib: float | None  # main + every worker, largest over rounds
    cpu_us_per_patch: float | None  # all processes of the loader, median over rounds
    runs: list[LoaderTiming]

    @classmethod
    def of(cls, loader: str, spc: int | None, runs: list[LoaderTiming]) -> Row:
        workers = [m for r in runs for m in r.worker_peak_rss_mib if m is not None]
        mains = [r.main_peak_rss_mib for r in runs if r.main_peak_rss_mib is not None]
        totals = [
            r.main_peak_rss_mib + sum(r.worker_peak_rss_mib)  # type: ignore[arg-type]
            for r in runs
            if r.main_peak_rss_mib is not None and None not in r.worker_peak_rss_mib
        ]
        cpus = [r.cpu_us_per_patch for r in runs if r.cpu_us_per_patch is not None]
        return cls(
            loader,
            spc,
            statistics.median(r.patches_per_s for r in runs),
            statistics.median(r.first_batch_s for r in runs),
            max(workers, default=None),
            max(mains, default=None),
            max(totals, default=None),
            statistics.median(cpus) if cpus else None,
            runs,
        )


@dataclass
class _Config:
    name: str
    spc: int | None
    dataset: Any
    batches: int
    batched: bool = False  # the dataset yields whole batches: DataLoader(batch_size=None)


def _epoch(args: argparse.Namespace, batches: int) -> int:
    """Samples per epoch: twice what is read, so that no worker reaches its end while timed."""
    return 2 * (1 + args.warmup + batches) * args.batch_size


def run(args: argparse.Namespace) -> tuple[list[Row], list[str]]:
    """Measure every configuration ``args.repeats`` times, interleaved (so that a burst of load from
    other processes hits every row alike), each time with fresh DataLoader workers.

    Returns the rows and notes about rows that were skipped.
    """
    paths = prepare_slides(args.slides_dir, n=args.slides, size=args.size, seed=args.seed)
    notes: list[str] = []
    naive = NaiveReadRegionDataset(paths, length=_epoch(args, args.naive_batches), seed=args.seed)
    configs = [_Config(NAIVE, None, naive, args.naive_batches)]
    if not args.no_monai:
        monai = make_monai(paths, length=_epoch(args, args.naive_batches), seed=args.seed)
        if monai is None:
            notes.append(f"{MONAI}: skipped, `monai` is not importable (`pip install monai`)")
        else:
            configs.append(_Config(MONAI, None, monai, args.naive_batches))
    for batched in (False, True):
        for per_chunk in SMALLCHUNKS:
            dataset = make_bigsmall(
                paths,
                smallchunks=per_chunk,
                samples=_epoch(args, args.batches),
                batch_size=args.batch_size if batched else None,
                decode_threads=args.decode_threads,
                seed=args.seed,
            )
            name = OURS_BATCHED if batched else OURS
            configs.append(_Config(name, per_chunk, dataset, args.batches, batched))
    for planar in (False, True):
        ceiling = CropCeilingDataset(planar=planar, seed=args.seed)
        configs.append(_Config(CEILINGS[planar], None, ceiling, args.batches))

    runs: list[list[LoaderTiming]] = [[] for _ in configs]
    for round_ in range(args.repeats):
        for config, done in zip(configs, runs, strict=True):
            args.loads.append(os.getloadavg()[0])
            loader = DataLoader(
                config.dataset,
                batch_size=None if config.batched else args.batch_size,
                num_workers=args.workers,
            )
            timing = time_loader(
                loader,
                warmup=args.warmup,
                batches=config.batches,
                patch=PATCH,
                batch_size=args.batch_size,
            )
            label = config.name if config.spc is None else f"{config.name} @{config.spc}"
            logger.info(
                "round %d/%d, %s: %.0f patches/s, first batch %.2f s",
                *(round_ + 1, args.repeats, label, timing.patches_per_s, timing.first_batch_s),
            )
            done.append(timing)
    rows = [Row.of(c.name, c.spc, done) for c, done in zip(configs, runs, strict=True)]
    return rows, notes


def _find(rows: Sequence[Row], loader: str, spc: int | None = None) -> Row:
    return next(r for r in rows if r.loader == loader and r.smallchunks_per_bigchunk == spc)


def targets(rows: Sequence[Row]) -> list[dict[str, Any]]:
    """The five targets with the measured value and whether each is met."""
    naive, ceiling = _find(rows, NAIVE), _find(rows, CEILING)
    low, high = (_find(rows, OURS, spc) for spc in SMALLCHUNKS)
    blow, bhigh = (_find(rows, OURS_BATCHED, spc) for spc in SMALLCHUNKS)
    ours = (low, high, blow, bhigh)
    first = max(ours, key=lambda r: r.first_batch_s)
    lo, hi = SMALLCHUNKS
    goals = [
        (
            f"batched at {hi} >= {TARGET_BATCHED_OF_CEILING:g}x the per-sample planar ceiling",
            bhigh.patches_per_s / ceiling.patches_per_s,
            TARGET_BATCHED_OF_CEILING,
            "x",
        ),
        (
            f"batched at {lo} >= {TARGET_BATCHED_X_NAIVE:g}x naive",
            blow.patches_per_s / naive.patches_per_s,
            TARGET_BATCHED_X_NAIVE,
            "x",
        ),
        (
            f"per-sample at {lo} >= {TARGET_X_NAIVE:g}x naive",
            low.patches_per_s / naive.patches_per_s,
            TARGET_X_NAIVE,
            "x",
        ),
        (
            f"per-sample at {hi} >= {TARGET_OF_CEILING:.0%} of the planar ceiling",
            high.patches_per_s / ceiling.patches_per_s,
            TARGET_OF_CEILING,
            "%",
        ),
    ]
    out = [
        {
            "target": text,
            "value": f"{value:.0%}" if unit == "%" else f"{value:.2f}x",
            "passed": value >= goal,
        }
        for text, value, goal, unit in goals
    ]
    label = f"{first.loader} @{first.smallchunks_per_bigchunk}"
    out.append(
        {
            "target": f"bigsmall first batch < {TARGET_FIRST_BATCH_S:g} s",
            "value": f"{first.first_batch_s:.2f} s (slowest: {label})",
            "passed": first.first_batch_s < TARGET_FIRST_BATCH_S,
        }
    )
    return out


def _mib(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.0f}"


def report(
    rows: Sequence[Row],
    goals: Sequence[dict[str, Any]],
    notes: Sequence[str],
    loads: Sequence[float],
    decode_threads: int,
) -> str:
    """The Markdown table, the target lines and the notes."""
    naive, ceiling = _find(rows, NAIVE), _find(rows, CEILING)
    headers = [
        "loader",
        "smallchunks/bigchunk",
        "patches/s",
        "x naive",
        "% of planar ceiling",
        "first batch (s)",
        "peak RSS/worker (MiB)",
        "peak RSS total (MiB)",
        "CPU us/patch",
    ]
    body = []
    for r in rows:
        body.append(
            [
                r.loader,
                "-" if r.smallchunks_per_bigchunk is None else str(r.smallchunks_per_bigchunk),
                f"{r.patches_per_s:,.0f}",
                f"{r.patches_per_s / naive.patches_per_s:.1f}",
                f"{r.patches_per_s / ceiling.patches_per_s:.0%}",
                f"{r.first_batch_s:.2f}",
                _mib(r.worker_peak_rss_mib),
                _mib(r.total_peak_rss_mib),
                "n/a" if r.cpu_us_per_patch is None else f"{r.cpu_us_per_patch:,.0f}",
            ]
        )
    lines = [markdown_table(headers, body), ""]
    lines += [
        f"- {g['target']}: {g['value']} -> {'PASS' if g['passed'] else 'MISS'}" for g in goals
    ]
    lines += ["", *[f"Note: {n}" for n in notes]] if notes else []
    lines += [
        "",
        f"Medians of {len(rows[0].runs)} run(s) per row; bigsmall decode_threads={decode_threads}; "
        f"1-minute load average before the runs {loads[0]:.1f}, before each run "
        f"{min(loads[1:], default=loads[0]):.1f}-{max(loads[1:], default=loads[0]):.1f} (ours "
        f"included) on {os.cpu_count()} CPUs. Peak RSS total is the main process plus every worker "
        "(sum of peaks, largest over runs). CPU us/patch: CPU time of the main process and the "
        "workers over the timed batches, per patch (little affected by other work on the machine; "
        f"{os.cpu_count()} cores / CPU per patch bounds patches/s).",
    ]
    return "\n".join(lines)


# -- --profile: where the time goes, and how batches mix ------------------------------------------


@dataclass
class ProfileRow:
    """One bigsmall configuration run with ``num_workers=0``."""

    mode: str
    smallchunks_per_bigchunk: int
    wall_s: float
    samples: int
    chunks_loaded: int
    stages: dict[str, float]

    @property
    def other_s(self) -> float:
        """Consumer-thread time no stage accounts for (the reservoir's own bookkeeping)."""
        consumer = sum(v for k, v in self.stages.items() if not k.startswith("load"))
        return self.wall_s - consumer


def profile(args: argparse.Namespace, paths: Sequence[Path]) -> list[ProfileRow]:
    """Each bigsmall configuration for ``args.profile_batches`` batches with ``num_workers=0``."""
    rows = []
    samples = 2 * (args.profile_batches + 1) * args.batch_size
    for batched in (False, True):
        for per_chunk in SMALLCHUNKS:
            dataset = make_bigsmall(
                paths,
                smallchunks=per_chunk,
                samples=samples,
                batch_size=args.batch_size if batched else None,
                decode_threads=args.decode_threads,
                seed=args.seed,
            )
            loader = DataLoader(
                dataset, batch_size=None if batched else args.batch_size, num_workers=0
            )
            start = time.perf_counter()
            count = 0
            for count, _batch in enumerate(loader, start=1):
                if count >= args.profile_batches:
                    break
            wall = time.perf_counter() - start
            del loader  # ends the stream (and its loading thread)
            stats = dataset.last_stats
            mode = "batched" if batched else "per-sample"
            rows.append(
                ProfileRow(
                    mode, per_chunk, wall, stats.samples, stats.chunks_loaded, stats.breakdown()
                )
            )
            logger.info("profile %s @%d: %d batches in %.1f s", mode, per_chunk, count, wall)
    return rows


@dataclass
class Mixing:
    """How the batches of one configuration mix (means over batches)."""

    mode: str
    smallchunks_per_bigchunk: int
    batches: int
    patients_per_batch: float
    patients_range: tuple[int, int]
    chunks_per_batch: float
    chunks_range: tuple[int, int]
    same_chunk_transitions: float  # fraction of consecutive pairs in a batch from the same chunk


def mixing(
    paths: Sequence[Path],
    *,
    smallchunks: int,
    batched: bool,
    batches: int,
    batch_size: int,
    workers: int,
    decode_threads: int,
    seed: int,
) -> Mixing:
    """Batches of the benchmark configuration (``workers`` workers), tagged with their big chunk."""
    dataset = make_bigsmall(
        paths,
        smallchunks=smallchunks,
        samples=batches * batch_size,
        batch_size=batch_size if batched else None,
        decode_threads=decode_threads,
        seed=seed,
        tagging=True,
    )
    loader = DataLoader(dataset, batch_size=None if batched else batch_size, num_workers=workers)
    patients, chunks, same, pairs = [], [], 0, 0
    for batch in loader:
        keys = [
            (p, int(x), int(y))
            for p, x, y in zip(batch["patient_id"], batch["chunk_x"], batch["chunk_y"], strict=True)
        ]
        patients.append(len({k[0] for k in keys}))
        chunks.append(len(set(keys)))
        same += sum(a == b for a, b in itertools.pairwise(keys))
        pairs += len(keys) - 1
    return Mixing(
        "batched" if batched else "per-sample",
        smallchunks,
        len(chunks),
        statistics.mean(patients),
        (min(patients), max(patients)),
        statistics.mean(chunks),
        (min(chunks), max(chunks)),
        same / pairs,
    )


def profile_report(
    rows: Sequence[ProfileRow], mixes: Sequence[Mixing], args: argparse.Namespace
) -> str:
    stages = list(rows[0].stages)
    headers = [
        "mode",
        "smallchunks/bigchunk",
        "wall (s)",
        "patches/s",
        *[f"{s} s (% wall)" for s in stages],
        "other s (% wall)",
        "chunks loaded",
        "load/chunk (ms)",
    ]
    body = []
    for r in rows:
        cells = [f"{r.stages[s]:.2f} ({r.stages[s] / r.wall_s:.0%})" for s in stages]
        body.append(
            [
                r.mode,
                str(r.smallchunks_per_bigchunk),
                f"{r.wall_s:.2f}",
                f"{r.samples / r.wall_s:,.0f}",
                *cells,
                f"{r.other_s:.2f} ({r.other_s / r.wall_s:.0%})",
                str(r.chunks_loaded),
                f"{1000 * r.stages[stages[0]] / max(r.chunks_loaded, 1):.0f}",
            ]
        )
    mix_headers = [
        "mode",
        "smallchunks/bigchunk",
        "batches",
        "distinct patients/batch (min-max)",
        "distinct big chunks/batch (min-max)",
        "same-chunk transitions",
    ]
    mix_body = [
        [
            m.mode,
            str(m.smallchunks_per_bigchunk),
            str(m.batches),
            f"{m.patients_per_batch:.2f} ({m.patients_range[0]}-{m.patients_range[1]})",
            f"{m.chunks_per_batch:.2f} ({m.chunks_range[0]}-{m.chunks_range[1]})",
            f"{m.same_chunk_transitions:.1%}",
        ]
        for m in mixes
    ]
    return "\n".join(
        [
            f"Time breakdown, num_workers=0, {args.profile_batches} batches of {args.batch_size}, "
            f"decode_threads={args.decode_threads} (load runs in the loading thread, concurrently "
            "with the other stages, so its % can overlap them; 'other' is consumer-thread time no "
            "stage accounts for):",
            "",
            markdown_table(headers, body),
            "",
            f"Mixing with the benchmark settings ({args.workers} workers, {args.slides} slides, "
            f"buffer_size={BUFFER_SIZE}; a batch comes from one worker; the same-chunk rate of "
            f"uniform draws over the resident chunks is 1/{BUFFER_SIZE} = {1 / BUFFER_SIZE:.0%}):",
            "",
            markdown_table(mix_headers, mix_body),
        ]
    )


# Options whose default depends on --quick: name -> (default, --quick default, help).
_SCALED = {
    "size": (32768, 8192, "slide width and height in pixels"),
    "slides": (4, 2, "number of synthetic slides"),
    "batches": (600, 60, "timed batches per run of the bigsmall and ceiling rows"),
    "naive_batches": (40, 10, "timed batches per run of the naive and MONAI rows"),
    "warmup": (10, 3, "batches skipped after the first one before timing starts"),
    "repeats": (3, 1, "runs of every row, interleaved; the table shows medians"),
    "profile_batches": (300, 60, "batches per configuration with --profile"),
    "mixing_batches": (200, 40, "batches per configuration of the --profile mixing measure"),
}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = make_parser(__file__, __doc__)
    add_scaled_options(parser, _SCALED, "smoke run: small slides, few batches (about a minute)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers (default 2)")
    parser.add_argument("--batch-size", type=int, default=64, help="batch size (default 64)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every row (default 0)")
    parser.add_argument(
        "--decode-threads",
        type=int,
        default=DECODE_THREADS,
        help=f"JPEG decode threads per worker of the bigsmall datasets (default {DECODE_THREADS})",
    )
    parser.add_argument("--no-monai", action="store_true", help="leave the MONAI row out")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="instead of the table: per-stage time breakdown (num_workers=0) and batch mixing",
    )
    parser.add_argument(
        "--slides-dir",
        type=Path,
        default=REPO_ROOT / ".cache" / "bench-slides",
        help="where the synthetic slides are cached (default <repo>/.cache/bench-slides)",
    )
    parser.add_argument("--json", type=Path, help="also write the results as JSON to this path")
    args = parser.parse_args(argv)
    resolve_scaled(parser, args, _SCALED, ["workers", "batch_size", "seed", "decode_threads"])
    if args.size < CHUNK:
        parser.error(f"--size must be >= {CHUNK} (the big chunk side), got {args.size}")
    return args


def _write_json(path: Path, args: argparse.Namespace, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    path.write_text(json.dumps({"config": config, **payload}, indent=2, default=str) + "\n")
    logger.info("results written to %s", path)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    load = os.getloadavg()[0]  # before any worker of ours runs: other processes only
    if load > 0.5 * (os.cpu_count() or 1):
        logger.warning("the machine is busy (load average %.1f): timings will be noisy", load)
    if args.profile:
        paths = prepare_slides(args.slides_dir, n=args.slides, size=args.size, seed=args.seed)
        rows = profile(args, paths)
        mixes = [
            mixing(
                paths,
                smallchunks=spc,
                batched=batched,
                batches=args.mixing_batches,
                batch_size=args.batch_size,
                workers=args.workers,
                decode_threads=args.decode_threads,
                seed=args.seed,
            )
            for batched in (False, True)
            for spc in SMALLCHUNKS
        ]
        print(profile_report(rows, mixes, args))
        print(f"\nLoad average before the runs: {load:.1f} on {os.cpu_count()} CPUs.")
        if args.json is not None:
            payload = {
                "load_average_before": load,
                "profile": [asdict(r) | {"other_s": r.other_s} for r in rows],
                "mixing": [asdict(m) for m in mixes],
            }
            _write_json(args.json, args, payload)
        return 0
    args.loads = [load]
    rows, notes = run(args)
    goals = targets(rows)
    print(report(rows, goals, notes, args.loads, args.decode_threads))
    if args.json is not None:
        payload = {
            "load_averages": args.loads,
            "rows": [asdict(r) for r in rows],
            "targets": goals,
            "notes": notes,
        }
        _write_json(args.json, args, payload)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
