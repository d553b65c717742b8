"""Messy cohorts: ``on_error`` from construction on (every bad slide found at once, the good ones
kept and the rest reported), chunks clipped to slides smaller than them."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import bigsmall_torch as bst
from bigsmall_torch.synthetic import write_synthetic_slide


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory, shared_slides: Path) -> Path:
    """Two good slides, one smaller than the big chunk, one smaller than the patch, a broken file,
    an empty file and a folder named like a slide."""
    folder = tmp_path_factory.mktemp("cohort")
    write_synthetic_slide(folder / "a_good.tiff", width=1024, height=1024, tile_size=256, seed=1)
    write_synthetic_slide(folder / "b_good.tiff", width=1024, height=768, tile_size=256, seed=2)
    write_synthetic_slide(
        folder / "c_small.tiff", width=384, height=256, tile_size=128, levels=1, seed=3
    )
    write_synthetic_slide(
        folder / "d_tiny.tiff", width=48, height=48, tile_size=16, levels=1, seed=4
    )
    shutil.copy(shared_slides / "broken.svs", folder / "e_broken.tiff")
    (folder / "f_empty.tiff").write_bytes(b"")
    (folder / "g_folder.tiff").mkdir()
    return folder


BAD = {"d_tiny": "smaller than the 64x64 patch", "e_broken": "cannot be read", "f_empty": "empty"}


def _patients(folder: Path) -> bst.Dataset:
    patients = [
        bst.Patient(path.stem, {"wsi": bst.Record(path)}) for path in sorted(folder.glob("*.tiff"))
    ]
    return bst.Dataset("cohort", patients)


def _training(folder: Path, on_error: str, **kwargs: object) -> bst.BigSmallDataset:
    return bst.BigSmallDataset(
        _patients(folder), bst.RandomRegionLoader(size=512), bst.RandomCropCollector(64),
        buffer_size=2, smallchunks_per_bigchunk=8, samples_per_epoch=96, on_error=on_error,
        seed=0, **kwargs,
    )  # fmt: skip


def test_skip_keeps_the_good_slides_and_names_every_bad_one(
    cohort: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        dataset = _training(cohort, "skip")
    skipped = dataset.skipped
    assert set(skipped) == {*BAD, "g_folder"}
    for pid, words in BAD.items():
        assert words in skipped[pid], (pid, skipped[pid])
    assert "is a folder" in skipped["g_folder"]
    assert [p.id for p in dataset.dataset.patients] == ["a_good", "b_good", "c_small"]
    warnings = [r for r in caplog.records if "skipping 4 of 7 slides" in r.getMessage()]
    assert len(warnings) == 1  # one warning for the lot
    # The stream: exact length, every patch equal to the reader's pixels at its coordinates, the
    # slide smaller than the big chunk included (its chunks clipped to it).
    readers = {p.id: bst.open_slide(p.record("wsi").path) for p in dataset.dataset.patients}
    seen = set()
    samples = list(dataset)
    assert len(samples) == 96
    for sample in samples:
        want = readers[sample["patient_id"]].read(sample["x"], sample["y"], 0, 64, 64)
        assert torch.equal(
            sample["image"], torch.from_numpy(np.ascontiguousarray(want)).permute(2, 0, 1)
        )
        seen.add(sample["patient_id"])
    assert seen == {"a_good", "b_good", "c_small"}
    for reader in readers.values():
        reader.close()


def test_raise_names_every_bad_slide_in_one_error(cohort: Path) -> None:
    with pytest.raises(bst.UnusableSlidesError) as info:
        _training(cohort, "raise")
    message = str(info.value)
    assert "4 of 7 slides cannot be used" in message
    for name in ("d_tiny", "e_broken", "f_empty", "g_folder"):
        assert name in message
    assert set(info.value.errors) == {*BAD, "g_folder"}
    assert isinstance(info.value, bst.SlideError) and isinstance(info.value, bst.DatasetError)


def test_one_bad_slide_raises_its_own_error(cohort: Path, tmp_path: Path) -> None:
    shutil.copy(cohort / "a_good.tiff", tmp_path / "a_good.tiff")
    shutil.copy(cohort / "e_broken.tiff", tmp_path / "e_broken.tiff")
    with pytest.raises(bst.SlideOpenError, match=r"e_broken\.tiff"):
        _training(tmp_path, "raise")


def test_every_slide_bad_is_a_dataset_error_even_when_skipping(
    cohort: Path, tmp_path: Path
) -> None:
    shutil.copy(cohort / "e_broken.tiff", tmp_path / "e_broken.tiff")
    (tmp_path / "f_empty.tiff").write_bytes(b"")
    with pytest.raises(bst.DatasetError, match="every one of the 2 slides was skipped"):
        _training(tmp_path, "skip")


def test_sliding_windows_skip_at_construction_too(cohort: Path) -> None:
    windows = bst.SlidingWindowDataset(_patients(cohort), patch_size=64, on_error="skip")
    assert set(windows.skipped) == {*BAD, "g_folder"}
    assert "smaller than patch_size=64x64" in windows.skipped["d_tiny"]
    assert [g.patient_id for g in windows.grids] == ["a_good", "b_good", "c_small"]
    cells = [(s["patient_id"], s["row"], s["col"]) for s in windows]
    assert len(cells) == len(set(cells)) == windows.total_windows == 16 * 16 + 16 * 12 + 6 * 4
    with pytest.raises(bst.UnusableSlidesError, match="4 of 7 slides cannot be used"):
        bst.SlidingWindowDataset(_patients(cohort), patch_size=64)


def test_a_slide_smaller_than_the_chunk_gives_clipped_chunks(cohort: Path) -> None:
    patients = bst.Dataset("one", [bst.Patient("c", {"wsi": bst.Record(cohort / "c_small.tiff")})])
    loader = bst.RandomRegionLoader(size=512)
    collector = bst.ChunkInfoCollector(bst.RandomCropCollector(64))
    dataset = bst.BigSmallDataset(
        patients, loader, collector, buffer_size=1, smallchunks_per_bigchunk=4, samples_per_epoch=8
    )
    sizes = {(int(s["chunk_width"]), int(s["chunk_height"])) for s in dataset}
    assert sizes == {(384, 256)}


def test_from_folder_names_both_files_of_a_clashing_id(cohort: Path, tmp_path: Path) -> None:
    shutil.copy(cohort / "a_good.tiff", tmp_path / "boxes.tiff")
    shutil.copy(cohort / "a_good.tiff", tmp_path / "boxes.svs")
    shutil.copy(cohort / "b_good.tiff", tmp_path / "other.tiff")
    with pytest.raises(
        bst.DatasetError, match=r"'boxes': boxes\.svs, boxes\.tiff; narrow pattern='\*'"
    ):
        bst.Dataset.from_folder(tmp_path, pattern="*")
    assert [p.id for p in bst.Dataset.from_folder(tmp_path, pattern="*.tiff").patients] == [
        "boxes",
        "other",
    ]


@pytest.fixture(scope="module")
def messy(tmp_path_factory: pytest.TempPathFactory, shared_slides: Path, cohort: Path) -> Path:
    """Every kind of file a real cohort folder holds: a tiled SVS (real), a stripped LZW TIFF, an
    RGBA PNG, a JPEG, a slide smaller than the big chunk, one smaller than the patch (a real DICOM
    of 16 x 16), a broken file, a dangling link, and a folder."""
    import tifffile
    from PIL import Image

    folder = tmp_path_factory.mktemp("messy")
    shutil.copy(shared_slides / "cmu-1-small-region.svs", folder / "a_svs.svs")
    pixels = bst.open_slide(cohort / "a_good.tiff").read(0, 0, 0, 700, 500)
    tifffile.imwrite(folder / "b_stripped.tif", pixels[:450, :640], compression="lzw", rowsperstrip=32)
    rgba = np.dstack([pixels[:300, :400], np.full((300, 400), 200, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(folder / "c_rgba.png")
    Image.fromarray(pixels[:333, :517]).save(folder / "d_photo.jpg", quality=90)
    shutil.copy(cohort / "c_small.tiff", folder / "e_small.tiff")
    (folder / "f_dicom").mkdir()
    for name in ("boxes_0.dcm", "boxes_1.dcm"):
        shutil.copy(shared_slides / name, folder / "f_dicom" / name)
    shutil.copy(shared_slides / "broken.svs", folder / "g_broken.svs")
    (folder / "h_gone.svs").symlink_to(folder / "nowhere.svs")
    (folder / "i_folder.svs").mkdir()
    return folder


MESSY_BAD = {
    "f_dicom": "smaller than the 64x64 patch",
    "g_broken": "cannot be read",
    "h_gone": "no such file",
    "i_folder": "is a folder",
}


def _messy_patients(folder: Path) -> bst.Dataset:
    files = sorted(p for p in folder.iterdir() if p.name != "f_dicom")
    files.append(folder / "f_dicom" / "boxes_0.dcm")
    return bst.Dataset(
        "messy", sorted((bst.Patient(p.name.split(".")[0] if p.parent == folder else "f_dicom",
                                     {"wsi": bst.Record(p)}) for p in files), key=lambda p: p.id)
    )  # fmt: skip


def test_a_messy_folder_streams_every_format_and_reports_the_bad_files(messy: Path) -> None:
    dataset = bst.BigSmallDataset(
        _messy_patients(messy), bst.RandomRegionLoader(size=512), bst.RandomCropCollector(64),
        buffer_size=2, smallchunks_per_bigchunk=8, samples_per_epoch=192, on_error="skip", seed=0,
    )  # fmt: skip
    assert set(dataset.skipped) == set(MESSY_BAD)
    for pid, words in MESSY_BAD.items():
        assert words in dataset.skipped[pid], (pid, dataset.skipped[pid])
    good = {p.id: p.record("wsi").path for p in dataset.dataset.patients}
    assert sorted(good) == ["a_svs", "b_stripped", "c_rgba", "d_photo", "e_small"]
    readers = {pid: bst.open_slide(path) for pid, path in good.items()}
    assert {pid: r.info.backend for pid, r in readers.items()} == {
        "a_svs": "tiffslide", "b_stripped": "image", "c_rgba": "image", "d_photo": "image",
        "e_small": "tiffslide",
    }  # fmt: skip
    samples = list(torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=2))
    assert len(samples) == 192
    for sample in samples:
        want = readers[sample["patient_id"]].read(sample["x"], sample["y"], 0, 64, 64)
        assert torch.equal(sample["image"], torch.from_numpy(want).permute(2, 0, 1))
    assert {s["patient_id"] for s in samples} == set(good)
    for reader in readers.values():
        reader.close()
    with pytest.raises(bst.UnusableSlidesError) as info:
        bst.BigSmallDataset(
            _messy_patients(messy), bst.RandomRegionLoader(size=512), bst.RandomCropCollector(64),
            buffer_size=2, smallchunks_per_bigchunk=8,
        )  # fmt: skip
    assert set(info.value.errors) == set(MESSY_BAD)
    for name in ("boxes_0.dcm", "g_broken.svs", "h_gone.svs", "i_folder.svs"):
        assert name in str(info.value)
