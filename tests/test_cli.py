from __future__ import annotations

import re
from pathlib import Path

import pytest

from bigsmall_torch.cli import main


def test_demo_streams_and_reports(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["demo", "--cache-dir", str(tmp_path), "--slides", "3", "--slide-size", "2048",
                 "--chunk-size", "512", "--batches", "12", "--batch-size", "16", "--workers", "2",
                 "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0
    assert len(list((tmp_path / "demo-slides").glob("*.tiff"))) == 3
    assert re.search(r"192 patches of 224x224 in [\d.]+ s: [\d,]+ patches/s", out)
    counts = dict(re.findall(r"(synthetic_\d+)=(\d+)", out))
    assert len(counts) == 3 and sum(map(int, counts.values())) == 192
    assert len(list((tmp_path / "demo-output" / "sampling").glob("*.png"))) == 3
    windows = int(re.search(r"sliding-window inference: (\d+) windows", out).group(1))  # type: ignore[union-attr]
    assert windows == (2048 // 4 // 64) ** 2  # 2 mpp: a quarter of the 0.5-mpp slide, 64-px windows
    assert (tmp_path / "demo-output" / "heatmaps" / "synthetic_000.png").exists()
    assert (tmp_path / "demo-output" / "heatmaps" / "synthetic_000.npy").exists()


def test_demo_rejects_bad_numbers(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        main(["demo", "--cache-dir", str(tmp_path), "--workers", "-1"])


def test_inspect_prints_metadata_and_flags_unreadable(cmu1: Path, broken_svs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["inspect", str(cmu1), str(broken_svs)])
    out = capsys.readouterr().out
    assert code == 1
    assert "mpp:       0.499" in out and "tile size: 240x240" in out and "level 0:   2220 x 2967" in out
    assert re.search(r"tissue:\s+\d+\.\d%", out)
    assert re.search(r"broken\.svs: error: .*backends tried: tiffslide, openslide", out)
    assert main(["inspect", "--no-tissue", str(cmu1)]) == 0
