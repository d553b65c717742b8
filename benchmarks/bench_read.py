"""Region-read benchmark: the tile-direct fast path against ``read_region`` and the raw decode rate.

For random 2048x2048 and 4096x4096 level-0 regions of the benchmark slides, side by side on the same
regions (each region is read by every method in turn, so background load hits all alike):

* ``raw decode``: the region's compressed tiles, already in memory, decoded one after another with
  ``imagecodecs.jpeg8_decode`` in a plain loop: the single-thread limit of this CPU;
* ``fast path``: :class:`bigsmall_torch.io._tiles.TileDecoder` (pread + decode + copy into one array,
  and libjpeg's corruption check of every tile: the default, ``strict=True``) with 1 and 2 threads
  (and ``--threads`` more); ``fast path, no check``: the same with ``strict=False`` (what the check
  costs);
* ``tiffslide`` ``read_region(..., as_array=True)`` and ``openslide`` ``read_region`` (RGBA image
  converted to an RGB array, as bigsmall_torch's reader does).

Rates are megapixels of region per second. Targets: fast path >= 3x tiffslide, and per thread used
>= 70% of the raw decode rate. The slides are the synthetic 32768x32768 ones of ``bench_core``
(256 px JPEG tiles, texture from ``../shared/slides/cmu-1-small-region.svs`` when present), cached
under ``.cache/bench-slides/size-<size>`` and re-used.

Then, in the same run, a second table for JPEG 2000: a synthetic Aperio 33005 slide (256 px tiles,
same texture, ``--j2k-size`` square, cached under ``.cache/bench-slides/size-<size>-jpeg2000``),
random 2048x2048 regions read by ``raw decode`` (``imagecodecs.jpeg2k_decode`` of the tiles in
memory, one thread), the ``fast path`` with 1 and 2 threads (and ``--threads``), ``tiffslide`` (its
``read_region``: the path JPEG 2000 levels took before the fast path read them) and ``openslide``.
Its times are medians over the regions (each region's fastest of ``--repeats`` rounds); ``vs
tiffslide`` is tiffslide's median over the method's.

    python -m benchmarks.bench_read            # full run
    python -m benchmarks.bench_read --quick    # 8192x8192 slides, fewer regions
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bigsmall_torch.io._tiles import TileDecoder

try:
    from ._common import REAL_SLIDE, REPO_ROOT, make_parser, markdown_table, prepare_slides
except ImportError:  # run as a script: python benchmarks/bench_read.py
    from _common import REAL_SLIDE, REPO_ROOT, make_parser, markdown_table, prepare_slides

__all__ = ["Row", "main", "run"]

logger = logging.getLogger("bench_read")

TARGET_X_TIFFSLIDE = 3.0
TARGET_OF_RAW_PER_THREAD = 0.7
J2K_REGION = 2048


@dataclass
class Row:
    """One method at one region size, on the JPEG slides or (``codec="jpeg2000"``) the JPEG 2000
    one."""

    region: int
    method: str
    threads: int
    megapixels: float
    seconds: float
    cpu_seconds: float  # process CPU time, all threads
    codec: str = "jpeg"
    median_seconds: float | None = None  # the median region (JPEG 2000 rows)

    @property
    def cores_busy(self) -> float:
        """CPU seconds per wall second: below the threads used, the machine was busy elsewhere."""
        return self.cpu_seconds / self.seconds

    @property
    def mp_per_s(self) -> float:
        return self.megapixels / self.seconds


class _Slide:
    """One benchmark slide opened by every method; level 0 only."""

    def __init__(self, path: Path, threads: Sequence[int]) -> None:
        import openslide
        import tifffile
        import tiffslide

        self.path = path
        self.tif = tifffile.TiffFile(path)
        self.page = self.tif.series[0].levels[0].keyframe
        self.width, self.height = int(self.page.imagewidth), int(self.page.imagelength)
        self.decoders: dict[int, TileDecoder] = {}
        self.lenient: dict[int, TileDecoder] = {}
        for n in threads:
            decoder = TileDecoder.for_level(self.tif, self.page, path=path, threads=n)
            lenient = TileDecoder.for_level(self.tif, self.page, path=path, threads=n, strict=False)
            if decoder is None or lenient is None:
                raise SystemExit(f"{path}: level 0 is not eligible for the tile fast path")
            self.decoders[n], self.lenient[n] = decoder, lenient
        self.tiffslide = tiffslide.TiffSlide(path)
        self.openslide = openslide.OpenSlide(path)
        self.openslide.set_cache(openslide.OpenSlideCache(0))  # repeated reads must not hit it
        self.fd = open(path, "rb")  # noqa: SIM115 - closed in close()

    def compressed_tiles(self, x: int, y: int, size: int) -> list[bytes]:
        """The compressed tiles covering a region, read into memory (outside any timing)."""
        tw, th = int(self.page.tilewidth), int(self.page.tilelength)
        across = -(-self.width // tw)
        tiles = []
        for row in range(y // th, (y + size - 1) // th + 1):
            for col in range(x // tw, (x + size - 1) // tw + 1):
                index = row * across + col
                self.fd.seek(int(self.page.dataoffsets[index]))
                tiles.append(self.fd.read(int(self.page.databytecounts[index])))
        return tiles

    def close(self) -> None:
        for decoder in [*self.decoders.values(), *self.lenient.values()]:
            decoder.close()
        self.tiffslide.close()
        self.openslide.close()
        self.tif.close()
        self.fd.close()


def _raw_decoder(slide: _Slide) -> Callable[[list[bytes]], None]:
    import imagecodecs

    if slide.page.compression != 7:  # JPEG 2000: OpenJPEG in this thread, as the fast path calls it

        def decode_all_j2k(tiles: list[bytes]) -> None:
            for data in tiles:
                imagecodecs.jpeg2k_decode(data, numthreads=1)

        return decode_all_j2k

    tables = slide.page.jpegtables
    colorspace = 2 if slide.page.photometric == 2 and not slide.page.is_jfif else None

    def decode_all(tiles: list[bytes]) -> None:
        for data in tiles:
            imagecodecs.jpeg8_decode(data, tables=tables, colorspace=colorspace, outcolorspace=2)

    return decode_all


def run(args: argparse.Namespace) -> list[Row]:
    size = 8192 if args.quick else args.size
    paths = prepare_slides(args.slides_dir, n=args.slides, size=size)
    threads = sorted({1, 2, *args.threads})
    slides = [_Slide(path, threads) for path in paths]
    rows: list[Row] = []
    try:
        for index, region in enumerate(args.regions):
            rng = np.random.default_rng(np.random.SeedSequence([args.seed, index]))
            times: dict[tuple[str, int], list[float]] = {}
            for _ in range(args.count):
                slide = slides[int(rng.integers(len(slides)))]
                x = int(rng.integers(0, slide.width - region + 1))
                y = int(rng.integers(0, slide.height - region + 1))
                _measure(
                    slide, x, y, region, times, repeats=args.repeats, check=not rows and not times
                )
            megapixels = args.count * region * region / 1e6
            rows += [Row(region, m, n, megapixels, s, c) for (m, n), (s, c) in times.items()]
    finally:
        for slide in slides:
            slide.close()
    if not args.no_jpeg2000:
        rows += _run_jpeg2000(args, threads)
    return rows


def _prepare_jpeg2000(folder: Path, size: int) -> Path:
    """One synthetic ``size x size`` Aperio 33005 slide, cached like :func:`prepare_slides`'."""
    from bigsmall_torch.synthetic import synthesize_slides

    target = folder / f"size-{size}-jpeg2000"
    logger.info(
        "preparing a %dx%d JPEG 2000 slide in %s; the first run writes it", size, size, target
    )
    start = time.perf_counter()
    (info,) = synthesize_slides(
        target, n=1, width=size, height=size, tile_size=256, tissue="full", compression="jpeg2000",
        texture_source=REAL_SLIDE if REAL_SLIDE.exists() else None,
    )  # fmt: skip
    logger.info("JPEG 2000 slide ready in %.1f s", time.perf_counter() - start)
    return Path(info.path)


def _run_jpeg2000(args: argparse.Namespace, threads: Sequence[int]) -> list[Row]:
    """Random 2048x2048 regions of the JPEG 2000 slide, every method on each: medians."""
    size = 8192 if args.quick else args.j2k_size
    slide = _Slide(_prepare_jpeg2000(args.slides_dir, size), threads)
    rng = np.random.default_rng(np.random.SeedSequence([args.seed, 2000]))
    per_region: dict[tuple[str, int], list[tuple[float, float]]] = {}
    try:
        for index in range(args.count):
            x = int(rng.integers(0, slide.width - J2K_REGION + 1))
            y = int(rng.integers(0, slide.height - J2K_REGION + 1))
            times: dict[tuple[str, int], list[float]] = {}
            _measure(slide, x, y, J2K_REGION, times, repeats=args.repeats, check=index == 0,
                     lenient=False)  # fmt: skip
            for key, (wall, cpu) in times.items():
                per_region.setdefault(key, []).append((wall, cpu))
    finally:
        slide.close()
    megapixels = args.count * J2K_REGION * J2K_REGION / 1e6
    return [
        Row(J2K_REGION, m, n, megapixels, sum(w for w, _ in walls), sum(c for _, c in walls),
            codec="jpeg2000", median_seconds=statistics.median(w for w, _ in walls))
        for (m, n), walls in per_region.items()
    ]  # fmt: skip


def _timed(call: Callable[[], Any]) -> tuple[Any, float, float]:
    """``call()``, its wall and its process CPU seconds."""
    start, cpu = time.perf_counter(), time.process_time()
    result = call()
    return result, time.perf_counter() - start, time.process_time() - cpu


def _measure(
    slide: _Slide,
    x: int,
    y: int,
    size: int,
    times: dict[tuple[str, int], list[float]],
    *,
    repeats: int,
    check: bool,
    lenient: bool = True,
) -> None:
    """Read one region with every method in turn, ``repeats`` rounds; the fastest round of each
    method counts (a round slowed by other work on the machine does not). An untimed read first
    warms the page cache. ``lenient=False`` leaves out the ``strict=False`` fast path."""
    slide.decoders[max(slide.decoders)].read(x, y, size, size)
    tiles, decode_all = slide.compressed_tiles(x, y, size), _raw_decoder(slide)
    methods: dict[tuple[str, int], Callable[[], Any]] = {
        ("raw decode", 1): lambda: decode_all(tiles)
    }
    for n, decoder in slide.decoders.items():
        methods[("fast path", n)] = lambda d=decoder: d.read(x, y, size, size)
        if lenient:
            methods[("fast path, no check", n)] = lambda d=slide.lenient[n]: d.read(
                x, y, size, size
            )
    methods[("tiffslide", 0)] = lambda: slide.tiffslide.read_region(
        (x, y), 0, (size, size), as_array=True
    )
    methods[("openslide", 0)] = lambda: np.ascontiguousarray(
        np.asarray(slide.openslide.read_region((x, y), 0, (size, size)))[..., :3]
    )
    best: dict[tuple[str, int], tuple[float, float]] = {}
    results: dict[tuple[str, int], Any] = {}
    for _ in range(repeats):
        for key, method in methods.items():
            results[key], wall, cpu = _timed(method)
            if key not in best or wall < best[key][0]:
                best[key] = (wall, cpu)
    for key, (wall, cpu) in best.items():
        total = times.setdefault(key, [0.0, 0.0])
        total[0] += wall
        total[1] += cpu
    if check:
        want = results[("tiffslide", 0)]
        for key, got in results.items():
            if key[0] != "raw decode" and key[0] != "tiffslide" and not np.array_equal(got, want):
                raise SystemExit(
                    f"{slide.path}: {key[0]} and tiffslide differ at ({x}, {y}) {size}"
                )


def report(rows: Sequence[Row]) -> str:
    """The Markdown table, then one line per target and a warning when the machine was busy.

    ``MP/CPU-s`` (megapixels per second of this process's CPU time, all threads) does not depend on
    free cores: it shows the work each method does per pixel, where ``MP/s`` also shows contention.
    """
    headers = ["region", "method", "threads", "MP/s", "vs tiffslide", "per thread / raw",
               "MP/CPU-s", "cores busy"]  # fmt: skip
    table: list[list[str]] = []
    verdicts: list[str] = []
    busy = False
    jpeg2000 = [r for r in rows if r.codec == "jpeg2000"]
    rows = [r for r in rows if r.codec == "jpeg"]
    for region in sorted({r.region for r in rows}):
        group = [r for r in rows if r.region == region]
        by = {(r.method, r.threads): r.mp_per_s for r in group}
        raw, tiff = by[("raw decode", 1)], by[("tiffslide", 0)]
        for r in group:
            per_thread = f"{r.mp_per_s / r.threads / raw:.0%}" if r.threads else "-"
            busy |= r.cores_busy < 0.9 * (r.threads or 1)
            table.append(
                [f"{region}x{region}", r.method, str(r.threads or "lib"), f"{r.mp_per_s:.1f}",
                 f"{r.mp_per_s / tiff:.2f}x", per_thread, f"{r.megapixels / r.cpu_seconds:.1f}",
                 f"{r.cores_busy:.2f}"]
            )  # fmt: skip
        for n in sorted(t for m, t in by if m == "fast path"):
            fast = by[("fast path", n)]
            x_tiff, of_raw = fast / tiff, fast / n / raw
            verdicts.append(
                f"- {region}x{region}, {n} thread(s): {x_tiff:.2f}x tiffslide "
                f"(target >= {TARGET_X_TIFFSLIDE:g}x: "
                f"{'met' if x_tiff >= TARGET_X_TIFFSLIDE else 'MISSED'}), "
                f"{of_raw:.0%} of raw per thread (target >= {TARGET_OF_RAW_PER_THREAD:.0%}: "
                f"{'met' if of_raw >= TARGET_OF_RAW_PER_THREAD else 'MISSED'})"
            )
    busy |= any(r.cores_busy < 0.9 * (r.threads or 1) for r in jpeg2000)
    if busy:
        verdicts.append(
            "- WARNING: some method kept fewer cores busy than it had threads (cores busy < 0.9 x "
            "threads): other work on this machine slowed it; its MP/s understate it."
        )
    text = markdown_table(headers, table) if table else ""
    if jpeg2000:
        text += ("\n\n" if text else "") + report_jpeg2000(jpeg2000)
    return text + "\n\n" + "\n".join(verdicts)


def report_jpeg2000(rows: Sequence[Row]) -> str:
    """The JPEG 2000 table: medians over the regions, and each method against tiffslide's."""
    headers = ["JPEG 2000 region", "method", "threads", "median s", "MP/s (median)",
               "vs tiffslide", "per thread / raw", "cores busy"]  # fmt: skip
    median = {(r.method, r.threads): r.median_seconds or r.seconds for r in rows}
    tiff, raw = median[("tiffslide", 0)], median[("raw decode", 1)]
    table = []
    for r in rows:
        s = median[(r.method, r.threads)]
        per_thread = f"{raw / s / r.threads:.0%}" if r.threads else "-"
        table.append(
            [f"{r.region}x{r.region}", r.method, str(r.threads or "lib"), f"{s:.3f}",
             f"{r.region * r.region / 1e6 / s:.1f}", f"{tiff / s:.2f}x", per_thread,
             f"{r.cores_busy:.2f}"]
        )  # fmt: skip
    return markdown_table(headers, table)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = make_parser(__file__, __doc__)
    parser.add_argument(
        "--slides-dir",
        type=Path,
        default=REPO_ROOT / ".cache" / "bench-slides",
        help="cache of benchmark slides (default <repo>/.cache/bench-slides)",
    )
    parser.add_argument("--quick", action="store_true", help="8192x8192 slides, 4 regions per size")
    parser.add_argument("--size", type=int, default=32768, help="slide side (default 32768)")
    parser.add_argument("--slides", type=int, default=1, help="number of slides (default 1)")
    parser.add_argument(
        "--regions",
        type=int,
        nargs="+",
        default=[2048, 4096],
        help="region sides (default 2048 4096)",
    )
    parser.add_argument("--count", type=int, help="random regions per size (default 16; quick 4)")
    parser.add_argument(
        "--threads", type=int, nargs="*", default=[], help="fast-path thread counts besides 1 and 2"
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="rounds per region, fastest counts (default 3)"
    )
    parser.add_argument(
        "--j2k-size",
        type=int,
        default=8192,
        help="side of the JPEG 2000 slide (default 8192; --quick too)",
    )
    parser.add_argument("--no-jpeg2000", action="store_true", help="leave out the JPEG 2000 table")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the results as JSON to this path")
    args = parser.parse_args(argv)
    if args.count is None:
        args.count = 4 if args.quick else 16
    for name in ("count", "slides", "size", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if any(n < 1 for n in args.threads) or any(r < 1 for r in args.regions):
        parser.error("--threads and --regions must be >= 1")
    if args.j2k_size < J2K_REGION:
        parser.error(f"--j2k-size must be >= {J2K_REGION}, got {args.j2k_size}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    rows = run(args)
    print(report(rows))
    if args.json:
        payload = [asdict(r) | {"mp_per_s": r.mp_per_s} for r in rows]
        args.json.write_text(json.dumps(payload, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
