"""Two processes under torchrun (gloo, CPU): rank and world size come from torch.distributed."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from conftest import run_process_group

SCRIPT = Path(__file__).parent / "scripts" / "torchrun_streams.py"


def test_torchrun_two_ranks(slide_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "gathered.json"
    code, stderr = run_process_group(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(SCRIPT), str(slide_folder), str(out)],
    )
    assert code == 0, stderr[-3000:]
    ranks = json.loads(out.read_text())
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["world"] == 2 for r in ranks)
    # Training: each rank half of the epoch, the same number of batches, disjoint patients.
    assert [r["len"] for r in ranks] == [48, 48] and ranks[0]["batches"] == ranks[1]["batches"] == 6
    assert {s[0] for s in ranks[0]["samples"]}.isdisjoint({s[0] for s in ranks[1]["samples"]})
    # Inference: every window exactly once across 2 ranks x 2 workers, gathered.
    windows = [tuple(w) for r in ranks for w in r["windows"]]
    assert len(windows) == len(set(windows)) == ranks[0]["total_windows"]
    assert [len(r["windows"]) for r in ranks] == [(r["total_windows"] + 1 - i) // 2 for i, r in enumerate(ranks)]
