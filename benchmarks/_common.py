"""Helpers shared by the benchmark scripts: cached synthetic slides, timing a DataLoader, peak RSS,
Markdown tables."""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader

__all__ = [
    "REAL_SLIDE",
    "REPO_ROOT",
    "LoaderTiming",
    "cpu_seconds",
    "make_parser",
    "markdown_table",
    "peak_rss_mib",
    "prepare_slides",
    "reset_peak_rss",
    "time_loader",
]

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
REAL_SLIDE = REPO_ROOT.parent / "shared" / "slides" / "cmu-1-small-region.svs"


def make_parser(module_file: str, doc: str | None) -> argparse.ArgumentParser:
    """The argument parser of a benchmark: usage and errors name it as ``python -m benchmarks.<name>``,
    so an option it does not accept is refused with the benchmark's name."""
    summary = (doc or "").strip().splitlines()
    return argparse.ArgumentParser(
        prog=f"python -m benchmarks.{Path(module_file).stem}",
        description=summary[0] if summary else None,
    )


def add_scaled_options(
    parser: argparse.ArgumentParser, scaled: dict[str, tuple[int, int, str]], quick_help: str
) -> None:
    """``--quick`` plus one int option per entry of ``scaled`` (``name -> (default, --quick
    default, help)``), whose default depends on ``--quick`` (see :func:`resolve_scaled`)."""
    parser.add_argument("--quick", action="store_true", help=quick_help)
    for name, (full, quick, text) in scaled.items():
        flag = "--" + name.replace("_", "-")
        parser.add_argument(flag, type=int, help=f"{text} (default {full}; --quick {quick})")


def add_stream_options(parser: argparse.ArgumentParser, *, decode_threads: int, slides_dir: Path) -> None:
    """The options of a benchmark that streams synthetic slides: ``--size``, ``--slides``,
    ``--workers``, ``--batch-size``, ``--seed``, ``--decode-threads``, ``--slides-dir`` and
    ``--json``."""
    parser.add_argument("--size", type=int, default=8192, help="slide width and height (default 8192)")
    parser.add_argument("--slides", type=int, default=2, help="number of slides (default 2)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers (default 2)")
    parser.add_argument("--batch-size", type=int, default=64, help="batch size (default 64)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every row (default 0)")
    parser.add_argument(
        "--decode-threads", type=int, default=decode_threads,
        help=f"JPEG decode threads per worker (default {decode_threads})",
    )  # fmt: skip
    shown = slides_dir.relative_to(REPO_ROOT) if slides_dir.is_relative_to(REPO_ROOT) else slides_dir
    parser.add_argument(
        "--slides-dir", type=Path, default=slides_dir,
        help=f"where the slides are cached (default <repo>/{shown})",
    )  # fmt: skip
    parser.add_argument("--json", type=Path, help="also write the results as JSON to this path")


def resolve_stream_options(
    parser: argparse.ArgumentParser, args: argparse.Namespace, scaled: dict[str, tuple[int, int, str]], chunk: int
) -> None:
    """:func:`resolve_scaled` for a benchmark with :func:`add_stream_options`, and ``--size`` at
    least two ``chunk`` sides and a multiple of 256."""
    resolve_scaled(parser, args, scaled, ["slides", "workers", "batch_size", "seed", "decode_threads"])
    if args.size < 2 * chunk or args.size % 256:
        parser.error(f"--size must be a multiple of 256 and >= {2 * chunk}, got {args.size}")


def write_json(path: Path, args: argparse.Namespace, payload: dict[str, Any]) -> None:
    """Write ``payload`` and the run's options (``"config"``) as JSON to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    config = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    path.write_text(json.dumps({"config": config, **payload}, indent=2, default=str) + "\n")
    logger.info("results written to %s", path)


def resolve_scaled(
    parser: argparse.ArgumentParser,
    args: argparse.Namespace,
    scaled: dict[str, tuple[int, int, str]],
    checked: Sequence[str] = (),
    zero_ok: Sequence[str] = ("warmup", "workers", "seed"),
) -> None:
    """Fill the ``scaled`` options left unset from ``--quick``; then require every scaled and
    ``checked`` option to be >= 1 (>= 0 for ``zero_ok``), as a parser error naming the flag."""
    for name, (full, quick, _) in scaled.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    for name in [*scaled, *checked]:
        minimum = 0 if name in zero_ok else 1
        if getattr(args, name) < minimum:
            flag = "--" + name.replace("_", "-")
            parser.error(f"{flag} must be >= {minimum}, got {getattr(args, name)}")


def prepare_slides(folder: Path, *, n: int, size: int, seed: int = 0) -> list[Path]:
    """``n`` synthetic ``size x size`` slides (256 px JPEG tiles, tissue everywhere) cached in
    ``folder/size-<size>``: written on first use, re-used afterwards.

    The texture comes from the real slide :data:`REAL_SLIDE` when present (so JPEG size and decode
    cost resemble tissue), else from the procedural generator.
    """
    from bigsmall_torch.synthetic import synthesize_slides

    target = folder / f"size-{size}"
    target.mkdir(parents=True, exist_ok=True)
    texture = REAL_SLIDE if REAL_SLIDE.exists() else None
    logger.info(
        "preparing %d slides of %dx%d in %s (texture: %s); the first run writes them",
        n,
        size,
        size,
        target,
        texture or "procedural",
    )
    start = time.perf_counter()
    infos = synthesize_slides(
        target,
        n=n,
        width=size,
        height=size,
        tile_size=256,
        tissue="full",
        texture_source=texture,
        seed=seed,
    )
    logger.info("slides ready in %.1f s", time.perf_counter() - start)
    return [Path(info.path) for info in infos]


def peak_rss_mib(pid: int) -> float | None:
    """Peak resident set size (``VmHWM``) of process ``pid`` in MiB; None where /proc has no answer."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    """Reset this process's ``VmHWM`` to its current RSS (Linux ``clear_refs``); False if refused."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return False
    return True


@dataclass
class LoaderTiming:
    """What :func:`time_loader` measured for one DataLoader."""

    patches: int
    seconds: float
    first_batch_s: float
    worker_peak_rss_mib: list[float | None] = field(default_factory=list)
    main_peak_rss_mib: float | None = None
    cpu_s: float | None = None  # CPU seconds of the main process and the workers while timed

    @property
    def patches_per_s(self) -> float:
        return self.patches / self.seconds

    @property
    def cpu_us_per_patch(self) -> float | None:
        """CPU microseconds (all processes of the loader) per patch: unlike patches/s, barely
        changed by other work competing for the cores."""
        return None if self.cpu_s is None else 1e6 * self.cpu_s / self.patches


def cpu_seconds(pids: Sequence[int]) -> float | None:
    """User + system CPU seconds used so far by processes ``pids`` (all their threads); None when
    one has ended or psutil is missing."""
    try:
        import psutil
    except ImportError:
        return None
    try:
        return sum(sum(psutil.Process(pid).cpu_times()[:2]) for pid in pids)
    except psutil.Error:
        return None


def _check_batch(batch: Any, batch_size: int, patch: int) -> None:
    image = batch["image"]
    expected = (batch_size, 3, patch, patch)
    if tuple(image.shape) != expected or str(image.dtype) != "torch.uint8":
        raise RuntimeError(
            f"expected uint8 images of shape {expected}, got {image.dtype} {tuple(image.shape)}"
        )


def time_loader(
    loader: DataLoader,
    *,
    warmup: int,
    batches: int,
    patch: int,
    batch_size: int | None = None,
) -> LoaderTiming:
    """Time ``loader`` from a cold iterator (fresh workers).

    The first batch is timed from ``iter(loader)``; then ``warmup`` batches are skipped and the next
    ``batches`` timed. Peak RSS of every worker is read just before the workers are shut down.
    ``batch_size`` is the expected batch length, by default the loader's own (give it for datasets
    that yield whole batches, used with ``DataLoader(batch_size=None)``).
    """
    reset_peak_rss()
    start = time.perf_counter()
    iterator = iter(loader)
    try:
        first = next(iterator)
        first_batch_s = time.perf_counter() - start
        _check_batch(first, batch_size or loader.batch_size or 1, patch)
        for _ in range(warmup):
            next(iterator)
        pids = [os.getpid(), *(w.pid for w in getattr(iterator, "_workers", []))]
        patches = 0
        cpu_start, start = cpu_seconds(pids), time.perf_counter()
        for _ in range(batches):
            patches += len(next(iterator)["image"])
        seconds = time.perf_counter() - start
        cpu_end = cpu_seconds(pids)
        cpu = None if cpu_start is None or cpu_end is None else cpu_end - cpu_start
        workers = [peak_rss_mib(w.pid) for w in getattr(iterator, "_workers", [])]
    except StopIteration:
        raise RuntimeError(
            f"the loader ended before {1 + warmup + batches} batches; give it a longer epoch"
        ) from None
    finally:
        shutdown = getattr(iterator, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
    return LoaderTiming(patches, seconds, first_batch_s, workers, peak_rss_mib(os.getpid()), cpu)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub Markdown table with right-aligned columns after the first."""
    align = [":---"] + ["---:"] * (len(headers) - 1)
    lines = [headers, align, *rows]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines)
