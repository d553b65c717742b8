from __future__ import annotations

import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bigsmall_torch.cli import build_parser, main


def test_demo_streams_and_reports(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        [
            "demo",
            "--cache-dir",
            str(tmp_path),
            "--slides",
            "3",
            "--slide-size",
            "2048",
            "--chunk-size",
            "512",
            "--batches",
            "12",
            "--batch-size",
            "16",
            "--workers",
            "2",
            "--no-progress",
        ]
    )
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


def test_inspect_prints_metadata_and_flags_unreadable(
    cmu1: Path, broken_svs: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["inspect", str(cmu1), str(broken_svs)])
    out = capsys.readouterr().out
    assert code == 1
    assert (
        "mpp:       0.499" in out
        and "tile size: 240x240" in out
        and "level 0:   2220 x 2967" in out
    )
    assert re.search(r"tissue:\s+\d+\.\d%", out)
    assert re.search(r"broken\.svs: error: .*backends tried: tiffslide, openslide", out)
    assert main(["inspect", "--no-tissue", str(cmu1)]) == 0


def test_inspect_reports_every_file_and_goes_on(
    cmu1: Path, broken_svs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    damaged = (
        tmp_path / "damaged.svs"
    )  # opens (intact header and directory), its tiles do not decode
    data = bytearray(cmu1.read_bytes())
    data[4096:1_200_000] = bytes(1_200_000 - 4096)  # level 0's JPEG tiles lie in bytes 16..1273756
    damaged.write_bytes(data)
    dicom = cmu1.parent / "boxes_0.dcm"
    missing = tmp_path / "missing.svs"
    code = main(["inspect", str(cmu1), str(broken_svs), str(damaged), str(dicom), str(missing)])
    out = capsys.readouterr().out
    assert code == 1
    lines = out.splitlines()
    headers = [line for line in lines if not line.startswith(" ")]
    assert headers == [
        str(cmu1),
        headers[1],
        headers[2],
        str(dicom),
        headers[4],
    ]  # one block per good slide, one line per bad one, in the order given
    assert re.fullmatch(
        rf"{re.escape(str(broken_svs))}: error: cannot be read as a slide: .*backends tried: .*",
        headers[1],
    )
    assert re.fullmatch(
        rf"{re.escape(str(damaged))}: error: .*cannot decode JPEG tile.*", headers[2]
    )
    assert headers[4] == f"{missing}: error: no such file"
    assert "vendor:    aperio" in out and "vendor:    dicom" in out
    assert len(re.findall(r"tissue:\s+\d+\.\d%", out)) == 2
    assert main(["inspect", str(cmu1), str(dicom)]) == 0


# --- benchmarks: not installed, run from a checkout as modules -------------------------------------

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = sorted(p.stem for p in (REPO / "benchmarks").glob("bench_*.py"))


@pytest.mark.parametrize(
    "argv", [["bench"], ["bench", "read", "--profile"], ["-v", "bench", "gpu_feed"]], ids=" ".join
)
def test_bench_command_says_how_to_run_the_benchmarks(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "not part of the installed package" in err
    assert re.search(r"^ +python -m benchmarks +# lists the benchmarks$", err, re.MULTILINE)
    assert (
        "python -m benchmarks.bench_core --quick" in err
        and "python -m benchmarks.bench_gpu_feed" in err
    )
    with pytest.raises(SystemExit):
        build_parser().parse_args(argv)  # no such command


def test_benchmarks_list_every_benchmark() -> None:
    assert "bench_gpu_feed" in BENCHMARKS and len(BENCHMARKS) >= 5
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    for name in BENCHMARKS:
        assert re.search(rf"^  python -m benchmarks\.{name} +\S", proc.stdout, re.MULTILINE), name


@pytest.mark.parametrize("name", BENCHMARKS)
def test_benchmark_options_reach_only_benchmarks_that_accept_them(
    name: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.syspath_prepend(str(REPO))
    module = importlib.import_module(f"benchmarks.{name}")
    if name in ("bench_core", "bench_annotations", "bench_features"):  # with a profile mode
        assert module.parse_args(["--profile", "--quick"]).profile is True
        return
    with pytest.raises(SystemExit) as exit_info:
        module.parse_args(["--profile"])
    assert exit_info.value.code == 2
    assert (
        f"python -m benchmarks.{name}: error: unrecognized arguments: --profile"
        in capsys.readouterr().err
    )
