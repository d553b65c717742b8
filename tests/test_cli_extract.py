"""``bigsmall-torch extract``: a feature bag per slide of a folder, resumable, with a summary."""

from __future__ import annotations

import csv
import re
import shutil
from pathlib import Path

import pytest

from bigsmall_torch.cli import main

pytest.importorskip("h5py", reason="the [features] extra")
pytest.importorskip("timm", reason="the [features] extra")

# Fast: untrained resnet18 (no network), level 1 of 1024-px slides: 512 px, 2 x 2 windows of 224.
FAST = ["--model", "resnet18", "--no-pretrained", "--level", "1", "--patch-size", "224",
        "--workers", "0", "--no-progress"]  # fmt: skip
WINDOWS = 4
SUMMARY = re.compile(
    r"^(\d+) slides: (\d+) written, (\d+) exists, (\d+) failed; (\d+) windows written in "
    r"[\d.]+ s \([\d,.]+ windows/s\); summary: (.+)$",
    re.MULTILINE,
)


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three 1024x1024 slides with two levels, tissue everywhere."""
    from bigsmall_torch.synthetic import synthesize_slides

    folder = tmp_path_factory.mktemp("extract-slides")
    synthesize_slides(folder, n=3, width=1024, height=1024, levels=2, tissue="full")
    return folder


@pytest.fixture
def with_broken(slides: Path, tmp_path: Path) -> Path:
    """Two good slides and ``broken.tiff`` (garbage bytes)."""
    folder = tmp_path / "slides"
    folder.mkdir()
    for path in sorted(slides.glob("*.tiff"))[:2]:
        shutil.copy(path, folder / path.name)
    (folder / "broken.tiff").write_bytes(b"not a slide at all " * 100)
    return folder


def extract(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str, str]:
    code = main(["extract", *map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def counts(out: str) -> tuple[int, ...]:
    """(slides, written, exists, failed, windows) of the summary line."""
    found = SUMMARY.search(out)
    assert found, out
    return tuple(int(v) for v in found.groups()[:5])


def mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.glob("*.h5")}


def test_extract_writes_a_bag_per_slide_and_resumes(
    slides: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from bigsmall_torch import read_bag

    out_dir = tmp_path / "features"
    code, out, _ = extract(capsys, slides, out_dir, *FAST)
    assert code == 0
    assert counts(out) == (3, 3, 0, 0, 3 * WINDOWS)
    assert SUMMARY.search(out).group(6) == str(out_dir / "summary.csv")  # type: ignore[union-attr]
    names = ["synthetic_000.h5", "synthetic_001.h5", "synthetic_002.h5"]
    assert sorted(mtimes(out_dir)) == names
    bag = read_bag(out_dir / "synthetic_000.h5")
    assert bag["features"].shape == (WINDOWS, 512) and str(bag["features"].dtype) == "float16"
    assert bag["coords"].tolist() == [[0, 0], [448, 0], [0, 448], [448, 448]]  # level 0, row by row
    assert bag["attrs"]["model"] == "resnet18" and bag["attrs"]["level"] == 1
    with open(out_dir / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["id"], r["windows"], r["status"]) for r in rows] == [
        (n.removesuffix(".h5"), str(WINDOWS), "written") for n in names
    ]

    before = mtimes(out_dir)  # a second run keeps every finished file
    code, out, _ = extract(capsys, slides, out_dir, *FAST)
    assert code == 0
    assert counts(out) == (3, 0, 3, 0, 0)
    assert mtimes(out_dir) == before
    assert sorted(p.name for p in out_dir.iterdir()) == sorted([*names, "summary.csv"])

    (out_dir / "synthetic_001.h5").unlink()  # a lost file is redone, and only that one
    code, out, _ = extract(capsys, slides, out_dir, *FAST)
    assert code == 0
    assert counts(out) == (3, 1, 2, 0, WINDOWS)
    after = mtimes(out_dir)
    assert sorted(after) == names
    assert {n: t for n, t in after.items() if n != "synthetic_001.h5"} == {
        n: t for n, t in before.items() if n != "synthetic_001.h5"
    }

    code, out, _ = extract(capsys, slides, out_dir, *FAST, "--overwrite", "--dtype", "float32")
    assert code == 0
    assert counts(out) == (3, 3, 0, 0, 3 * WINDOWS)
    assert str(read_bag(out_dir / "synthetic_002.h5")["features"].dtype) == "float32"


def test_extract_skips_a_broken_slide_and_exits_1(
    with_broken: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_dir = tmp_path / "features"
    code, out, _ = extract(capsys, with_broken, out_dir, *FAST, "--on-error", "skip")
    assert code == 1
    assert counts(out) == (3, 2, 0, 1, 2 * WINDOWS)
    assert re.search(
        rf"^broken: {re.escape(str(with_broken / 'broken.tiff'))}: cannot be read as a slide",
        out,
        re.MULTILINE,
    )
    assert sorted(p.name for p in out_dir.glob("*.h5")) == ["synthetic_000.h5", "synthetic_001.h5"]
    with open(out_dir / "summary.csv", newline="") as f:
        statuses = {r["id"]: r["status"] for r in csv.DictReader(f)}
    assert statuses["broken"].startswith("failed: ") and "broken.tiff" in statuses["broken"]


def test_extract_rerun_reports_the_broken_slide_again(
    with_broken: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_dir = tmp_path / "features"
    assert extract(capsys, with_broken, out_dir, *FAST, "--on-error", "skip")[0] == 1
    code, out, err = extract(capsys, with_broken, out_dir, *FAST, "--on-error", "skip")
    assert code == 1, err
    assert counts(out) == (3, 0, 2, 1, 0)


def test_extract_on_error_raise_stops_naming_the_file(
    with_broken: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_dir = tmp_path / "features"
    code, out, err = extract(capsys, with_broken, out_dir, *FAST, "--on-error", "raise")
    assert code == 1
    assert err.startswith("bigsmall-torch extract: error: ")
    assert str(with_broken / "broken.tiff") in err
    assert not SUMMARY.search(out)
    assert not list(out_dir.glob("*.h5*"))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--level", "1", "--mpp", "0.5"], "argument --mpp: not allowed with argument --level"),
        (["--mpp", "0.5", "--magnification", "20"], "not allowed with argument --mpp"),
        (["--patch-size", "-224"], "argument --patch-size: must be >= 1, got -224"),
        (["--patch-size", "0"], "argument --patch-size: must be >= 1, got 0"),
        (["--stride", "0"], "argument --stride: must be >= 1"),
        (["--mpp", "0"], "argument --mpp: must be > 0"),
        (["--level", "-1"], "argument --level: must be >= 0"),
        (["--dtype", "float64"], "argument --dtype: invalid choice"),
        (["--on-error", "ignore"], "argument --on-error: invalid choice"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else "",
)
def test_extract_rejects_bad_options(
    options: list[str], message: str, slides: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        main(["extract", str(slides), str(tmp_path / "features"), *options])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "usage: bigsmall-torch extract" in err and message in err
    assert not (tmp_path / "features").exists()


def test_extract_needs_a_folder_with_slides(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_dir = tmp_path / "features"
    code, _, err = extract(capsys, tmp_path / "nowhere", out_dir, *FAST)
    assert code == 2
    assert err == f"bigsmall-torch extract: error: SLIDES_DIR '{tmp_path}/nowhere' does not exist\n"
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no slides here")
    (empty / "sub").mkdir()
    code, _, err = extract(capsys, empty, out_dir, *FAST)
    assert code == 2
    assert f"no slide in '{empty}' matches *.[sS][vV][sS]" in err and "--pattern" in err
    code, _, err = extract(capsys, empty / "notes.txt", out_dir, *FAST)
    assert code == 2 and "is not a folder" in err
    assert not out_dir.exists()


def test_extract_finds_slides_by_suffix_in_any_case(
    slides: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "mixed"
    (folder / "sub").mkdir(parents=True)
    shutil.copy(slides / "synthetic_000.tiff", folder / "a.TIF")
    shutil.copy(slides / "synthetic_001.tiff", folder / "sub" / "b.tiff")
    (folder / "summary.csv").write_text("id\n")  # not a slide: left alone
    out_dir = tmp_path / "features"
    code, out, _ = extract(capsys, folder, out_dir, *FAST)
    assert code == 0 and counts(out)[:2] == (1, 1)
    code, out, _ = extract(capsys, folder, out_dir, *FAST, "--recursive")
    assert code == 0 and counts(out)[:3] == (2, 1, 1)
    assert sorted(p.relative_to(out_dir).as_posix() for p in out_dir.glob("*.h5")) == [
        "a.h5",
        "sub__b.h5",
    ]
    code, out, _ = extract(capsys, folder, tmp_path / "only-b", *FAST, "--recursive",
                           "--pattern", "b.tiff")  # fmt: skip
    assert code == 0 and counts(out)[:2] == (1, 1)
    assert [p.name for p in (tmp_path / "only-b").glob("*.h5")] == ["sub__b.h5"]


def test_extract_refuses_two_slides_with_one_id(
    slides: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "clash"
    folder.mkdir()
    shutil.copy(slides / "synthetic_000.tiff", folder / "a.tiff")
    shutil.copy(slides / "synthetic_001.tiff", folder / "a.svs")
    code, _, err = extract(capsys, folder, tmp_path / "features", *FAST)
    assert code == 2
    assert "have the same id 'a'" in err and "a.svs" in err and "a.tiff" in err
