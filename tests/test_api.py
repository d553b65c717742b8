from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import bigsmall_torch as bst

README = Path(__file__).resolve().parents[1] / "README.md"


def documented_names() -> set[str]:
    text = README.read_text()
    section = text.split("## API", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and "---" not in line][1:]
    return {name for row in rows for name in re.findall(r"`([A-Za-z_][A-Za-z0-9_]*)`", row.split("|")[2])}


def test_all_matches_the_readme_api_table() -> None:
    assert set(bst.__all__) == documented_names()
    assert all(hasattr(bst, name) for name in bst.__all__)


def test_import_is_light() -> None:
    # Heavy optional modules are not imported with the package.
    code = "import sys, bigsmall_torch; print(' '.join(m for m in ('openslide', 'tiffslide', 'imagecodecs') if m in sys.modules))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert loaded == []


def test_readme_starts_with_the_two_commands() -> None:
    lines = README.read_text().splitlines()
    block = lines[lines.index("```bash") + 1 : lines.index("```bash") + 3]
    assert block == ['pip install . && bigsmall-torch demo', 'pip install -e ".[test]" && python -m pytest']
    ci = (README.parent / ".ci" / "run").read_text()
    assert block[1] in ci
