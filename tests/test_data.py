from __future__ import annotations

from pathlib import Path

import pytest

import bigsmall_torch as bst


def test_record_patient_dataset_attributes(tmp_path: Path) -> None:
    record = bst.Record(tmp_path / "a.svs", {"stain": "HE"})
    patient = bst.Patient(7, {"wsi": record}, label=1, info={"age": 50})
    ds = bst.Dataset("ds", [patient])
    assert ds.name == "ds" and ds.patients == [patient] and len(ds) == 1 and ds[0] is patient
    assert patient.id == 7 and patient.records["wsi"] is record and patient.label == 1
    assert record.path == tmp_path / "a.svs" and record.info == {"stain": "HE"}
    assert patient.record("wsi") is record


def test_patient_with_several_records(tmp_path: Path) -> None:
    patient = bst.Patient("p", {"wsi": bst.Record(tmp_path / "a"), "ihc": bst.Record(tmp_path / "b")})
    assert set(patient.records) == {"wsi", "ihc"}
    with pytest.raises(bst.ConfigError, match=r"no record 'xyz'.*'ihc', 'wsi'"):
        patient.record("xyz")


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((1.5, {"wsi": None}), "id must be an int or a str"),
        ((1, {}), "records must be a non-empty dict"),
        ((1, {"wsi": "a.svs"}), r"records\['wsi'\] must be a Record"),
    ],
)
def test_patient_rejects_bad_input(args: tuple, match: str) -> None:
    with pytest.raises(bst.ConfigError, match=match):
        bst.Patient(*args)


def test_dataset_rejects_duplicate_ids(tmp_path: Path) -> None:
    p = bst.Patient(1, {"wsi": bst.Record(tmp_path / "a")})
    with pytest.raises(bst.DatasetError, match=r"duplicate patient ids \[1\]"):
        bst.Dataset("d", [p, p])


def test_from_folder_sorted_stable_ids(tmp_path: Path) -> None:
    for name in ["b.svs", "a.svs", "c.tiff", "sub/d.svs"]:
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    ds = bst.Dataset.from_folder(tmp_path, pattern="*.svs")
    assert [p.id for p in ds] == ["a", "b"]
    assert ds.patients[0].records["wsi"].path == tmp_path / "a.svs"
    deep = bst.Dataset.from_folder(tmp_path, pattern="*.svs", recursive=True, record_key="he")
    assert [p.id for p in deep] == ["a", "b", "sub/d"]
    assert set(deep.patients[0].records) == {"he"}
    assert deep.name == tmp_path.name


def test_from_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(bst.DatasetError, match="does not exist"):
        bst.Dataset.from_folder(tmp_path / "missing")
    (tmp_path / "file.svs").write_bytes(b"x")
    with pytest.raises(bst.DatasetError, match="is not a folder"):
        bst.Dataset.from_folder(tmp_path / "file.svs")
    with pytest.raises(bst.DatasetError, match=r"no file matches pattern '\*\.ndpi'"):
        bst.Dataset.from_folder(tmp_path, pattern="*.ndpi")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(bst.DatasetError, match="no file matches"):
        bst.Dataset.from_folder(empty)
