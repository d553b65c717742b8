"""Every notebook in notebooks/ runs top to bottom as a plain script (no Jupyter needed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
TIMEOUT_S = 300  # a notebook that hangs fails instead of blocking the suite


def load(notebook: Path) -> dict:
    content = json.loads(notebook.read_text(encoding="utf-8"))
    if content.get("nbformat") != 4:
        pytest.fail(f"{notebook.name}: expected nbformat 4, got {content.get('nbformat')!r}")
    return content


def source(cell: dict) -> str:
    text = cell["source"]
    return text if isinstance(text, str) else "".join(text)


def script_of(notebook: Path) -> str:
    """The notebook's code cells, in order, as one Python script."""
    parts = []
    for index, cell in enumerate(load(notebook)["cells"]):
        if cell["cell_type"] != "code":
            continue
        code = source(cell)
        magics = [line for line in code.splitlines() if line.lstrip().startswith(("%", "!"))]
        if magics:
            pytest.fail(
                f"{notebook.name}, cell {index}: IPython magics cannot run as a script: {magics}"
            )
        parts.append(f"# -- cell {index} --\n{code}\n")
    return "\n".join(parts)


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[path.name for path in NOTEBOOKS])
def test_notebook_runs(notebook: Path, tmp_path: Path) -> None:
    script = tmp_path / f"{notebook.stem}.py"
    script.write_text(script_of(notebook), encoding="utf-8")
    env = {**os.environ, "MPLBACKEND": "Agg", "TMPDIR": str(tmp_path)}
    try:
        result = subprocess.run(
            [sys.executable, str(script)],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{notebook.name} did not finish within {TIMEOUT_S} s:\n{exc.stderr or ''}")
    assert result.returncode == 0, (
        f"{notebook.name} failed (exit {result.returncode}); the script is {script}\n"
        f"--- stderr ---\n{result.stderr[-8000:]}\n--- stdout ---\n{result.stdout[-2000:]}"
    )


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[path.name for path in NOTEBOOKS])
def test_notebook_is_stored_without_outputs(notebook: Path) -> None:
    code_cells = [cell for cell in load(notebook)["cells"] if cell["cell_type"] == "code"]
    assert code_cells, f"{notebook.name} has no code cell"
    dirty = [
        i for i, cell in enumerate(code_cells) if cell.get("outputs") or cell.get("execution_count")
    ]
    assert not dirty, f"{notebook.name}: clear the outputs of code cells {dirty} before committing"
