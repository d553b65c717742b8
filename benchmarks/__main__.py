"""``python -m benchmarks``: list the benchmarks of this checkout and how to run them.

The benchmarks are not part of the installed package (``bigsmall-torch`` has no ``bench`` command);
each one is a module run from the repository root, ``python -m benchmarks.<name> [options]``, and
refuses, naming itself, any option it does not accept.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["benchmarks", "main"]

HERE = Path(__file__).resolve().parent


def benchmarks() -> dict[str, str]:
    """Module name -> first line of its docstring, for every ``bench_*.py`` here (read, not imported:
    listing them costs no torch import)."""
    found = {}
    for path in sorted(HERE.glob("bench_*.py")):
        doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
        found[path.stem] = doc.strip().splitlines()[0] if doc.strip() else ""
    return found


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    listing = benchmarks()
    width = max(map(len, listing), default=0)
    lines = ["Benchmarks (run from the repository root; pip install -e '.[bench]'):"]
    lines += [
        f"  python -m benchmarks.{name:<{width}}  {summary}" for name, summary in listing.items()
    ]
    lines.append("Each takes --help; most take --quick for a short run.")
    if argv and argv[0] not in ("-h", "--help"):
        sys.stderr.write(f"python -m benchmarks takes no arguments (got {' '.join(argv)})\n")
        sys.stderr.write("\n".join(lines) + "\n")
        return 2
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
