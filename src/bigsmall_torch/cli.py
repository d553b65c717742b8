"""The ``bigsmall-torch`` command line: ``demo`` (a tour on synthetic slides), ``inspect`` (what a
slide holds) and ``extract`` (a feature bag per slide of a folder). The benchmarks are not installed: run them from a source checkout with
``python -m benchmarks.bench_core`` and the like (``python -m benchmarks`` lists them)."""

from __future__ import annotations

import argparse
import collections
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["main"]

logger = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    """``$BIGSMALL_CACHE``, else ``$XDG_CACHE_HOME/bigsmall_torch``, else ``~/.cache/bigsmall_torch``."""
    if "BIGSMALL_CACHE" in os.environ:
        return Path(os.environ["BIGSMALL_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "bigsmall_torch"


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def run_demo(args: argparse.Namespace) -> int:
    """Synthesise slides (cached), stream batches, print patches/s and the patient mix per batch."""
    import torch
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    import bigsmall_torch as bst
    from bigsmall_torch.synthetic import synthesize_slides

    folder = Path(args.cache_dir) / "demo-slides"
    folder.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    infos = synthesize_slides(
        folder, n=args.slides, width=args.slide_size, height=args.slide_size, tissue="blobs"
    )
    print(
        f"{len(infos)} synthetic slides of {args.slide_size}x{args.slide_size} in {folder} "
        f"({time.perf_counter() - started:.1f} s)"
    )

    samples = args.batches * args.batch_size
    slides = bst.Dataset.from_folder(folder, pattern="*.tiff")
    ds = bst.BigSmallDataset(
        slides,
        bst.RandomRegionLoader(size=args.chunk_size, level=0, tissue_only=True),
        bst.ChunkInfoCollector(bst.RandomCropCollector(patch_size=args.patch_size, tissue_only=True)),
        buffer_size=args.buffer_size,
        smallchunks_per_bigchunk=args.smallchunks_per_bigchunk,
        samples_per_epoch=samples,
        seed=args.seed,
        batch_size=args.batch_size,  # batched mode: whole batches built in the workers
    )
    loader = DataLoader(
        ds, batch_size=None, num_workers=args.workers, pin_memory=torch.cuda.is_available()
    )
    mix: list[int] = []
    patients: collections.Counter[str] = collections.Counter()
    recorder = bst.SamplingRecorder()
    started = time.perf_counter()
    first_batch = None
    count = 0
    for batch in tqdm(loader, desc="batches", unit="batch", disable=args.no_progress):
        if first_batch is None:
            first_batch = time.perf_counter() - started
        ids = [str(i) for i in batch["patient_id"]]
        mix.append(len(set(ids)))
        patients.update(ids)
        count += len(ids)
        recorder.update(batch)
    elapsed = time.perf_counter() - started
    print(
        f"{count} patches of {args.patch_size}x{args.patch_size} in {elapsed:.2f} s: "
        f"{count / elapsed:,.0f} patches/s (first batch after {first_batch or 0:.2f} s)"
    )
    print(
        f"distinct patients per batch: min {min(mix)}, mean {sum(mix) / len(mix):.2f}, max {max(mix)}"
    )
    print("patches per patient: " + ", ".join(f"{k}={v}" for k, v in sorted(patients.items())))
    out = Path(args.cache_dir) / "demo-output"
    pictures = recorder.render_all(slides, out / "sampling", thumbnail_size=768)
    print(
        f"where the patches came from (tissue only): {len(pictures)} pictures in {out / 'sampling'}"
    )
    if args.no_inference:
        return 0
    windows = bst.SlidingWindowDataset(
        bst.Dataset("demo", slides.patients[:1]), patch_size=64, mpp=2.0, batch_size=64
    )
    stitcher = bst.Stitcher(
        windows, out / "heatmaps", vmin=0.0, vmax=1.0, progress=not args.no_progress
    )
    model = _tissue_score_model()
    started = time.perf_counter()
    with torch.no_grad():
        for batch in DataLoader(windows, batch_size=None, num_workers=args.workers):
            stitcher.add(model(batch["image"]), batch)
    result = next(iter(stitcher.finish().values()))
    print(
        f"sliding-window inference: {windows.total_windows} windows in {time.perf_counter() - started:.2f} s; "
        f"heatmap {result.paths.get('png')}"
    )
    return 0


def _tissue_score_model() -> Any:
    """A tiny stand-in model: the fraction of stained (saturated) pixels of each window."""
    import torch

    class TissueScore(torch.nn.Module):
        def forward(self, images: torch.Tensor) -> torch.Tensor:
            rgb = images.float() / 255
            saturation = rgb.amax(dim=1) - rgb.amin(dim=1)
            return (saturation > 0.08).float().mean(dim=(1, 2))

    return TissueScore().eval()


def _describe(path: str, args: argparse.Namespace) -> list[str]:
    """The lines ``inspect`` prints about one slide; raises whatever reading it raises."""
    import bigsmall_torch as bst

    reader = bst.open_slide(path, backend=args.backend)
    try:
        info = reader.info
        tile = f"{info.tile_size[0]}x{info.tile_size[1]}" if info.tile_size else "-"
        lines = [
            f"{info.path}",
            f"  backend:   {info.backend}",
            f"  vendor:    {info.vendor or '-'}",
            f"  mpp:       {info.mpp if info.mpp is not None else '-'}",
            f"  objective: {info.objective_power if info.objective_power is not None else '-'}",
            f"  tile size: {tile}",
        ]
        levels = zip(info.level_dimensions, info.level_downsamples, strict=True)
        for level, ((w, h), ds) in enumerate(levels):
            lines.append(f"  level {level}:   {w} x {h} (downsample {ds:g})")
        if not args.no_tissue:
            try:
                lines.append(f"  tissue:    {bst.tissue_mask(reader).fraction:.1%}")
            except bst.MissingDependencyError as exc:
                lines.append(f"  tissue:    - ({exc})")
        return lines
    finally:
        reader.close()


def run_inspect(args: argparse.Namespace) -> int:
    """Print what each slide holds. A slide that cannot be opened or read gets one line naming it
    and the reason, the others are still reported, and the exit code is then 1."""
    from bigsmall_torch.errors import SlideError

    failed = 0
    for path in args.slides:
        try:
            lines = _describe(path, args)
        except Exception as exc:  # one bad file must not hide the report on the others
            logger.debug("inspecting %s failed", path, exc_info=True)
            reason = exc.reason if isinstance(exc, SlideError) else f"{type(exc).__name__}: {exc}"
            print(f"{path}: error: {reason}", flush=True)
            failed += 1
            continue
        print("\n".join(lines), flush=True)
    return 1 if failed else 0


# Slide files ``extract`` looks for when no --pattern is given (case-insensitive): the formats the
# tiffslide, OpenSlide and DICOM backends read. A glob has no alternatives, so one pattern each.
SLIDE_SUFFIXES = (
    *("svs", "tif", "tiff", "ndpi", "vms", "vmu"),
    *("scn", "mrxs", "bif", "svslide", "dcm"),
)


def _any_case(suffix: str) -> str:
    """``*.svs`` -> ``*.[sS][vV][sS]``: a glob that matches the suffix in any case."""
    return "*." + "".join(f"[{c.lower()}{c.upper()}]" if c.isalpha() else c for c in suffix)


def _find_slides(folder: Path, patterns: Sequence[str], recursive: bool) -> Any:
    """A Dataset of the files under ``folder`` matching any of ``patterns`` (one ``from_folder``
    per pattern that matches something, merged); raises DatasetError when there is none."""
    import bigsmall_torch as bst
    from bigsmall_torch.errors import DatasetError

    if not folder.exists():
        raise DatasetError(f"SLIDES_DIR {str(folder)!r} does not exist")
    if not folder.is_dir():
        raise DatasetError(f"SLIDES_DIR {str(folder)!r} is not a folder")
    patients: dict[Any, Any] = {}
    for pattern in patterns:
        found = folder.rglob(pattern) if recursive else folder.glob(pattern)
        if not any(not p.is_dir() for p in found):
            continue
        found_here = bst.Dataset.from_folder(folder, pattern=pattern, recursive=recursive)
        for patient in found_here.patients:
            same = patients.setdefault(patient.id, patient)
            if same is not patient and same.record("wsi").path != patient.record("wsi").path:
                raise DatasetError(
                    f"{same.record('wsi').path} and {patient.record('wsi').path} have the same id "
                    f"{patient.id!r} (ids are paths without the suffix): rename one or narrow --pattern"
                )
    if not patients:
        where = "under" if recursive else "in"
        raise DatasetError(
            f"no slide {where} {str(folder)!r} matches {' '.join(patterns)} "
            "(give --pattern for other files, --recursive for sub-folders)"
        )
    return bst.Dataset(folder.resolve().name, sorted(patients.values(), key=lambda p: str(p.id)))


def run_extract(args: argparse.Namespace) -> int:
    """Extract a feature bag per slide of SLIDES_DIR; print the failed slides and the totals.
    Exit 0 when every slide has its file; 1 when one failed (or, with --on-error raise, at the
    first error); 2 when SLIDES_DIR holds no slide or the library refuses an option (e.g. an
    unknown --model)."""
    import bigsmall_torch as bst
    from bigsmall_torch.errors import BigSmallError, ConfigError, DatasetError, SlideError

    patterns = args.pattern or [_any_case(s) for s in SLIDE_SUFFIXES]
    try:
        dataset = _find_slides(args.slides_dir, patterns, args.recursive)
    except DatasetError as exc:
        sys.stderr.write(f"bigsmall-torch extract: error: {exc}\n")
        return 2
    resolution: dict[str, Any] = {"level": 0 if args.level is None else args.level}
    if args.mpp is not None:
        resolution = {"mpp": args.mpp}
    elif args.magnification is not None:
        resolution = {"magnification": args.magnification}
    started = time.perf_counter()
    try:
        summary = bst.extract_features(
            dataset,
            args.model,
            args.out_dir,
            patch_size=args.patch_size,
            stride=args.stride,
            **resolution,
            tissue_only=not args.all_windows,
            batch_size=args.batch_size,
            num_workers=args.workers,
            device=args.device,
            dtype=args.dtype,
            on_error=args.on_error,
            overwrite=args.overwrite,
            pretrained=args.pretrained,
            progress=not args.no_progress,
        )
    except BigSmallError as exc:  # the library's messages name the slide and how to fix it
        logger.debug("extract failed", exc_info=True)
        sys.stderr.write(f"bigsmall-torch extract: error: {exc}\n")
        return 2 if isinstance(exc, ConfigError) and not isinstance(exc, SlideError) else 1
    elapsed = time.perf_counter() - started
    counts = {"written": 0, "exists": 0, "failed": 0}
    for row in summary.slides:
        key = row.status.split(":")[0]
        counts[key] = counts.get(key, 0) + 1
        if key == "failed":
            reason = row.status.partition(":")[2].strip()
            print(f"{row.patient_id}: {reason}", flush=True)
    windows = sum(r.windows for r in summary.slides if r.status == "written")
    print(
        f"{len(summary.slides)} slides: {counts['written']} written, {counts['exists']} exists, "
        f"{counts['failed']} failed; {windows} windows written in {elapsed:.1f} s "
        f"({windows / elapsed if elapsed > 0 else 0.0:,.1f} windows/s); summary: {summary.csv}",
        flush=True,
    )
    return 1 if counts["failed"] else 0


BENCH_HELP = """\
bigsmall-torch: the benchmarks are not part of the installed package, so there is no `bench` command.
Run them from the root of a source checkout (git clone the repository, then pip install -e '.[bench]'):
    python -m benchmarks                          # lists the benchmarks
    python -m benchmarks.bench_core --quick       # core throughput, about a minute
    python -m benchmarks.bench_core --profile     # per-stage time breakdown (bench_core only)
    python -m benchmarks.bench_gpu_feed --help    # each benchmark lists the options it accepts
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bigsmall-torch", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="synthesise slides and stream patches from them")
    demo.add_argument(
        "--cache-dir", type=Path, default=default_cache_dir(), help="where slides are cached"
    )
    demo.add_argument("--slides", type=_positive, default=4, help="number of synthetic slides")
    demo.add_argument(
        "--slide-size", type=_positive, default=8192, help="slide width and height (px)"
    )
    demo.add_argument("--chunk-size", type=_positive, default=2048, help="big chunk size (px)")
    demo.add_argument("--patch-size", type=_positive, default=224, help="small chunk size (px)")
    demo.add_argument(
        "--buffer-size", type=_positive, default=4, help="resident big chunks per worker"
    )
    demo.add_argument("--smallchunks-per-bigchunk", type=_positive, default=256)
    demo.add_argument("--batch-size", type=_positive, default=64)
    demo.add_argument("--batches", type=_positive, default=200, help="batches to stream")
    demo.add_argument("--workers", type=_non_negative, default=2, help="DataLoader workers")
    demo.add_argument("--seed", type=_non_negative, default=0)
    demo.add_argument("--no-progress", action="store_true", help="no progress bar")
    demo.add_argument(
        "--no-inference", action="store_true", help="skip the sliding-window inference"
    )
    demo.set_defaults(run=run_demo)
    inspect = commands.add_parser(
        "inspect", help="print levels, mpp, vendor, tile size, tissue of slides"
    )
    inspect.add_argument(
        "slides", nargs="+", type=str,
        help="slide files or URLs (s3://, gs://, https://, ...; credentials from the store's "
        "standard configuration, e.g. the AWS_* variables)",
    )  # fmt: skip
    inspect.add_argument("--backend", default="auto", choices=["auto", "openslide", "tiffslide"])
    inspect.add_argument("--no-tissue", action="store_true", help="skip the tissue fraction")
    inspect.set_defaults(run=run_inspect)
    _add_extract(commands)
    return parser


def _add_extract(commands: Any) -> None:
    extract = commands.add_parser(
        "extract",
        help="run a timm model over every window of every slide of a folder: one .h5 per slide",
        description="Run a timm model over every (tissue) window of every slide of SLIDES_DIR and "
        "write OUT_DIR/<slide id>.h5 (features, coords, grid) and OUT_DIR/summary.csv. Slides whose "
        "file is already complete are kept (re-run to resume; --overwrite to redo them).",
    )
    extract.add_argument("slides_dir", metavar="SLIDES_DIR", type=Path, help="folder of slides")
    extract.add_argument("out_dir", metavar="OUT_DIR", type=Path, help="where the .h5 files go")
    extract.add_argument(
        "--pattern",
        action="append",
        metavar="GLOB",
        help="slide files to take, repeatable (default: any-case "
        + ", ".join(f"*.{s}" for s in SLIDE_SUFFIXES)
        + ")",
    )
    extract.add_argument("--recursive", action="store_true", help="look in sub-folders too")
    extract.add_argument("--model", default="resnet18", help="timm model name (default: resnet18)")
    extract.add_argument(
        "--pretrained",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="load the model's pretrained weights (default: yes; needs network access once)",
    )
    extract.add_argument("--patch-size", type=_positive, default=224, help="window size (px)")
    extract.add_argument(
        "--stride", type=_positive, default=None, help="window step (px; default: the patch size)"
    )
    where = extract.add_mutually_exclusive_group()
    where.add_argument("--level", type=_non_negative, help="pyramid level to read (default: 0)")
    where.add_argument("--mpp", type=_positive_float, help="resolution in microns per pixel")
    where.add_argument("--magnification", type=_positive_float, help="objective power, e.g. 20")
    extract.add_argument("--batch-size", type=_positive, default=64)
    extract.add_argument(
        "--workers", type=_non_negative, default=None, help="DataLoader workers (default: up to 4)"
    )
    extract.add_argument("--device", default=None, help="e.g. cuda:1 (default: cuda if available)")
    extract.add_argument(
        "--dtype", choices=["float16", "float32"], default="float16", help="how features are stored"
    )
    extract.add_argument(
        "--all-windows", action="store_true", help="every window of the grid, not only tissue"
    )
    extract.add_argument(
        "--on-error",
        choices=["raise", "skip"],
        default="skip",
        help="an unreadable slide stops the run, or is listed as failed (default: skip)",
    )
    extract.add_argument(
        "--overwrite", action="store_true", help="redo slides whose file is already complete"
    )
    extract.add_argument("--no-progress", action="store_true", help="no progress bar")
    extract.set_defaults(run=run_extract)


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if next((a for a in argv if not a.startswith("-")), None) == "bench":
        sys.stderr.write(BENCH_HELP)  # the command of earlier versions: say where it went
        return 2
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    return int(args.run(args))


if __name__ == "__main__":
    raise SystemExit(main())
