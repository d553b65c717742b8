"""Damaged JPEG tiles: what each reader catches, and what catching costs.

One tile at a time of a real Aperio slide (``../shared/slides/cmu-1-small-region.svs``) and of a
synthetic slide gets 1-32 bytes overwritten (zeros, 0xFF, or random bytes) somewhere after its
first quarter, side by side for every reader on the same damage:

* ``strict``: bigsmall_torch's fast path as it runs by default (libjpeg's warnings are errors);
* ``lenient``: the same decoder with ``strict=False`` (tifffile's and imagecodecs' behaviour):
  the damage counts as *silent* when it returns pixels that differ from the intact tile;
* ``openslide``: OpenSlide reading the tile from a copy of the slide with the damage written in.

Then the cost of the check: milliseconds per tile of the fast path reading all of level 0, with
``strict=False`` and with the default, one thread. Nothing here is timed against a target; the table is for the docs.

    python -m benchmarks.bench_corruption [--trials 100]
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

try:
    from ._common import REPO_ROOT, make_parser, markdown_table
except ImportError:  # run as a script
    from _common import REPO_ROOT, make_parser, markdown_table

from bigsmall_torch.io._tiles import check_jpeg
from bigsmall_torch.synthetic import write_synthetic_slide

SHARED = REPO_ROOT.parent / "shared" / "slides" / "cmu-1-small-region.svs"


def _tiles(path: Path) -> tuple[list[tuple[int, bytes]], bytes, int | None, tuple[int, int]]:
    """(file offset, bytes) of every level-0 tile, the JPEG tables, the colorspace, the tile size."""
    import tifffile

    with tifffile.TiffFile(path) as tif, open(path, "rb") as f:
        page = tif.pages[0]
        tiles = []
        for offset, count in zip(page.dataoffsets, page.databytecounts, strict=True):
            f.seek(offset)
            tiles.append((int(offset), f.read(count)))
        colorspace = 2 if page.photometric == 2 and not page.is_jfif else None
        return tiles, page.jpegtables or b"", colorspace, (int(page.tilewidth), int(page.tilelength))


def _decode(data: bytes, tables: bytes, colorspace: int | None) -> np.ndarray:
    import imagecodecs

    return imagecodecs.jpeg8_decode(data, tables=tables or None, colorspace=colorspace, outcolorspace=2)


def detection(path: Path, trials: int, seed: int) -> list[list[str]]:
    import openslide
    import tifffile

    tiles, tables, colorspace, (tw, th) = _tiles(path)
    prefix = tables[:-2] if tables else b""
    with tifffile.TiffFile(path) as tif:
        across = -(-int(tif.pages[0].imagewidth) // tw)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / path.name
        shutil.copy(path, copy)
        copy.chmod(0o644)
        for kind in ("zeros", "0xFF", "random"):
            rng = np.random.default_rng([seed, len(kind)])
            caught = silent = refused = 0
            for _ in range(trials):
                index = int(rng.integers(len(tiles)))
                offset, data = tiles[index]
                at = int(rng.integers(len(data) // 4, len(data) - 40))
                n = int(rng.integers(1, 33))
                fill = {"zeros": b"\0" * n, "0xFF": b"\xff" * n, "random": rng.bytes(n)}[kind]
                damaged = data[:at] + fill + data[at + n :]
                try:
                    check_jpeg(damaged, prefix)
                except ValueError:
                    caught += 1
                with contextlib.suppress(Exception):  # a hard libjpeg error: not silent
                    silent += not np.array_equal(
                        _decode(damaged, tables, colorspace), _decode(data, tables, colorspace)
                    )
                with open(copy, "r+b") as f:
                    f.seek(offset + at)
                    f.write(fill)
                try:
                    slide = openslide.OpenSlide(copy)
                    col, row = index % across, index // across
                    slide.read_region((col * tw, row * th), 0, (tw, th))
                    slide.close()
                except openslide.OpenSlideError:
                    refused += 1
                with open(copy, "r+b") as f:
                    f.seek(offset + at)
                    f.write(data[at : at + n])
            rows.append([path.name, kind, str(trials), f"{caught}", f"{silent}", f"{refused}"])
    return rows


def cost(paths: Sequence[Path]) -> list[list[str]]:
    """Whole level 0 read by the fast path with and without the check, best of 5 rounds each,
    alternating so that background load hits both alike."""
    import tifffile

    from bigsmall_torch.io._tiles import TileDecoder

    rows = []
    for path in paths:
        with tifffile.TiffFile(path) as tif:
            page = tif.series[0].levels[0].keyframe
            strict = TileDecoder.for_level(tif, page, path=path, threads=1)
            lenient = TileDecoder.for_level(tif, page, path=path, threads=1, strict=False)
        assert strict is not None and lenient is not None
        size = (strict.width, strict.height)
        tiles = strict.tiles_across * -(-strict.height // strict.tile_height)
        best = {"no check": np.inf, "strict": np.inf}
        for _ in range(5):
            for name, decoder in (("no check", lenient), ("strict", strict)):
                start = time.perf_counter()
                decoder.read(0, 0, *size)
                best[name] = min(best[name], time.perf_counter() - start)
        strict.close()
        lenient.close()
        per = {k: v / tiles * 1e3 for k, v in best.items()}
        kind = "RGB (decode + check)" if strict._colorspace == 2 else "YCbCr (one strict decode)"
        rows.append([path.name, kind, str(tiles), f"{per['no check']:.3f}", f"{per['strict']:.3f}",
                     f"{per['strict'] / per['no check'] - 1:+.0%}"])  # fmt: skip
    return rows


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = make_parser(__file__, __doc__)
    parser.add_argument("--trials", type=int, default=100, help="damaged tiles per slide and kind")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.trials < 1:
        parser.error("--trials must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        synthetic = Path(tmp) / "synthetic.tiff"
        write_synthetic_slide(synthetic, width=2048, height=2048, tile_size=256, tissue="full", seed=1)
        paths = [p for p in (SHARED, synthetic) if p.exists()]
        found = [row for p in paths for row in detection(p, args.trials, args.seed)]
        print(markdown_table(
            ["slide", "damage", "tiles", "strict: caught", "lenient: wrong pixels, no error",
             "openslide: refused"], found))  # fmt: skip
        print()
        print(markdown_table(
            ["slide", "tiles are", "tiles", "no check ms/tile", "strict ms/tile", "strict costs"],
            cost(paths),
        ))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
