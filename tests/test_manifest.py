"""CSV manifests, splits, label balancing and subsets of :class:`bigsmall_torch.Dataset`."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest

import bigsmall_torch as bst


def _touch(*paths: Path) -> None:
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")


def _write_csv(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def _dataset(labels: list[object], name: str = "ds") -> bst.Dataset:
    record = {"wsi": bst.Record("x.svs")}
    return bst.Dataset(name, [bst.Patient(i, record, label) for i, label in enumerate(labels)])


# --- from_csv ------------------------------------------------------------------------------------


def test_from_csv_two_records_info_relative_and_absolute(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere" / "p2_ihc.tiff"
    _touch(tmp_path / "slides/p1.svs", tmp_path / "slides/p1_ihc.tiff", tmp_path / "slides/p2.svs")
    _touch(elsewhere, tmp_path / "slides/p3_ihc.tiff")
    csv_path = _write_csv(
        tmp_path / "cohort.csv",
        "patient_id,wsi,ihc,label,site,age\n"
        "p1,slides/p1.svs,slides/p1_ihc.tiff,0,lung, 61\n"
        f"p2,slides/p2.svs,{elsewhere},1,breast,\n"
        "p3,,slides/p3_ihc.tiff,1,colon,45\n",
    )
    ds = bst.Dataset.from_csv(csv_path, record_columns=("wsi", "ihc"))
    assert ds.name == "cohort" and [p.id for p in ds] == ["p1", "p2", "p3"]
    p1, p2, p3 = ds
    assert p1.records["wsi"].path == tmp_path / "slides/p1.svs"
    assert p1.records["ihc"].path == tmp_path / "slides/p1_ihc.tiff"
    assert p2.records["ihc"].path == elsewhere
    assert set(p3.records) == {"ihc"}
    assert [p.label for p in ds] == [0, 1, 1]
    assert p1.info == {"site": "lung", "age": "61"} and p2.info == {"site": "breast", "age": ""}


def test_from_csv_root_name_and_int_ids(tmp_path: Path) -> None:
    root = tmp_path / "data"
    _touch(root / "a.svs", root / "b.svs")
    csv_path = _write_csv(tmp_path / "m.csv", "case,slide,grade\n7,a.svs,low\n12,b.svs,high\n")
    ds = bst.Dataset.from_csv(
        csv_path,
        id_column="case",
        record_columns=("slide",),
        label_column="grade",
        root=root,
        name="x",
    )
    assert ds.name == "x" and [p.id for p in ds] == [7, 12]
    assert [p.label for p in ds] == ["low", "high"]
    assert ds[0].records["slide"].path == root / "a.svs" and ds[0].info == {}


def test_from_csv_ids_and_labels_stay_str_unless_all_ints(tmp_path: Path) -> None:
    _touch(tmp_path / "a.svs")
    csv_path = _write_csv(
        tmp_path / "m.csv", "patient_id,wsi,label\n1,a.svs,1\nx2,a.svs,\n007,a.svs,2\n"
    )
    ds = bst.Dataset.from_csv(csv_path)
    assert [p.id for p in ds] == ["1", "x2", "007"]  # "007" is not written as a plain int
    assert [p.label for p in ds] == [1, None, 2]  # an empty label cell is None
    mixed = _write_csv(tmp_path / "n.csv", "patient_id,wsi,label\n1,a.svs,1\n2,a.svs,b\n")
    ds = bst.Dataset.from_csv(mixed)
    assert [p.id for p in ds] == [1, 2] and [p.label for p in ds] == ["1", "b"]


def test_from_csv_without_label_column_and_check_files_off(tmp_path: Path) -> None:
    csv_path = _write_csv(tmp_path / "m.csv", "patient_id,wsi\n\na,nowhere.svs\n,\n")
    ds = bst.Dataset.from_csv(csv_path, check_files=False)  # blank rows are skipped
    assert [p.id for p in ds] == ["a"] and ds[0].label is None
    assert ds[0].records["wsi"].path == tmp_path / "nowhere.svs"


def test_from_csv_missing_file_and_columns(tmp_path: Path) -> None:
    with pytest.raises(bst.DatasetError, match=r"CSV '.*nope\.csv' does not exist"):
        bst.Dataset.from_csv(tmp_path / "nope.csv")
    csv_path = _write_csv(tmp_path / "m.csv", "id,wsi,extra\n1,a.svs,x\n")
    with pytest.raises(
        bst.DatasetError,
        match=r"has no column\(s\) \['patient_id'\]; its columns are \['id', 'wsi', 'extra'\]",
    ):
        bst.Dataset.from_csv(csv_path)
    with pytest.raises(bst.DatasetError, match=r"has no column\(s\) \['ihc'\]"):
        bst.Dataset.from_csv(csv_path, id_column="id", record_columns=("wsi", "ihc"))


def test_from_csv_no_rows(tmp_path: Path) -> None:
    csv_path = _write_csv(tmp_path / "m.csv", "patient_id,wsi\n")
    with pytest.raises(bst.DatasetError, match=r"m\.csv' has no patient rows"):
        bst.Dataset.from_csv(csv_path)
    with pytest.raises(bst.DatasetError, match="has no column"):
        bst.Dataset.from_csv(_write_csv(tmp_path / "empty.csv", ""))


def test_from_csv_duplicate_ids_listed(tmp_path: Path) -> None:
    _touch(tmp_path / "a.svs")
    text = "patient_id,wsi\na,a.svs\nb,a.svs\na,a.svs\nc,a.svs\nb,a.svs\n"
    with pytest.raises(
        bst.DatasetError,
        match=r"m\.csv': duplicate patient ids 'a' \(lines \[2, 4\]\), 'b' \(lines \[3, 6\]\)",
    ):
        bst.Dataset.from_csv(_write_csv(tmp_path / "m.csv", text))


def test_from_csv_empty_id_and_row_without_record(tmp_path: Path) -> None:
    _touch(tmp_path / "a.svs")
    empty_id = _write_csv(tmp_path / "m.csv", "patient_id,wsi,ihc\na,a.svs,\n,a.svs,\n")
    with pytest.raises(bst.DatasetError, match=r"m\.csv': lines \[3\] have an empty 'patient_id'"):
        bst.Dataset.from_csv(empty_id, record_columns=("wsi", "ihc"))
    no_record = _write_csv(tmp_path / "n.csv", "patient_id,wsi,ihc,site\na,a.svs,,x\nb,,,y\n")
    with pytest.raises(
        bst.DatasetError, match=r"n\.csv': lines \[3\] have none of the records \['wsi', 'ihc'\]"
    ):
        bst.Dataset.from_csv(no_record, record_columns=("wsi", "ihc"))


def test_from_csv_lists_all_missing_files(tmp_path: Path) -> None:
    _touch(tmp_path / "here.svs")
    csv_path = _write_csv(
        tmp_path / "m.csv",
        "patient_id,wsi,ihc\na,here.svs,gone_a.tiff\nb,gone_b.svs,\nc,here.svs,\n"
        "d,gone_d.svs,gone_d2.tiff\n",
    )
    with pytest.raises(bst.DatasetError) as info:
        bst.Dataset.from_csv(csv_path, record_columns=("wsi", "ihc"))
    message = str(info.value)
    assert "m.csv" in message and "4 record file(s) not found" in message
    for line, patient, name in [
        (2, "a", "gone_a.tiff"),
        (3, "b", "gone_b.svs"),
        (5, "d", "gone_d.svs"),
        (5, "d", "gone_d2.tiff"),
    ]:
        assert re.search(rf"line {line}, patient '{patient}', '\w+': .*{re.escape(name)}", message)
    assert "here.svs" not in message


def test_from_csv_rejects_bad_arguments_and_long_rows(tmp_path: Path) -> None:
    _touch(tmp_path / "a.svs")
    csv_path = _write_csv(tmp_path / "m.csv", "patient_id,wsi\na,a.svs,extra\n")
    with pytest.raises(bst.DatasetError, match=r"lines \[2\] have more cells than the header"):
        bst.Dataset.from_csv(csv_path)
    for columns in [(), ("wsi", "wsi"), ("label",), ("patient_id",)]:
        with pytest.raises(bst.ConfigError, match="record_columns must be distinct column names"):
            bst.Dataset.from_csv(csv_path, record_columns=columns)


# --- split ---------------------------------------------------------------------------------------


def test_split_sizes_disjoint_union_and_names() -> None:
    ds = _dataset([None] * 101)
    splits = ds.split({"train": 70, "val": 15, "test": 15}, seed=3)
    assert list(splits) == ["train", "val", "test"]
    # 70.7 / 15.15 / 15.15: the largest remainder (train's 0.7) gets the extra patient.
    assert [len(s) for s in splits.values()] == [71, 15, 15]
    assert [s.name for s in splits.values()] == ["ds/train", "ds/val", "ds/test"]
    ids = [[p.id for p in s] for s in splits.values()]
    assert sorted(i for part in ids for i in part) == list(range(101))
    assert all(part == sorted(part) for part in ids)  # the dataset's order is kept


def test_split_is_deterministic_per_seed() -> None:
    ds = _dataset(["a", "b"] * 50)
    pct = {"train": 80, "test": 20}

    def ids(seed: int) -> list[list[int | str]]:
        return [[p.id for p in s] for s in ds.split(pct, seed=seed).values()]

    assert ids(0) == ids(0) and ids(5) == ids(5)
    assert ids(0) != ids(1)


def test_split_float_percentages_and_single_split() -> None:
    ds = _dataset([None] * 10)
    thirds = ds.split({"a": 100 / 3, "b": 100 / 3, "c": 100 / 3})
    assert [len(s) for s in thirds.values()] == [4, 3, 3]
    assert len(ds.split({"all": 100})["all"]) == 10


def test_split_stratified_keeps_label_proportions() -> None:
    ds = _dataset(["A"] * 60 + ["B"] * 40)
    pct = {"train": 70, "val": 15, "test": 15}
    splits = ds.split(pct, seed=7, stratify=True)
    assert sum(len(s) for s in splits.values()) == 100
    for split_name, split in splits.items():
        counts = split.labels()
        assert abs(counts["A"] - 60 * pct[split_name] / 100) <= 1
        assert abs(counts["B"] - 40 * pct[split_name] / 100) <= 1
    odd = _dataset(["A"] * 7 + ["B"] * 5 + ["C"] * 3)
    for split_name, split in odd.split({"x": 50, "y": 30, "z": 20}, stratify=True).items():
        share = {"x": 0.5, "y": 0.3, "z": 0.2}[split_name]
        for label, total in {"A": 7, "B": 5, "C": 3}.items():
            assert abs(split.labels()[label] - total * share) < 1


def test_split_stratified_spreads_ties_across_splits() -> None:
    # Each label has one patient: per label the tie goes to the split that is behind its quota.
    ds = _dataset(["A", "B", "C", "D"])
    sizes = [len(s) for s in ds.split({"x": 50, "y": 50}, stratify=True).values()]
    assert sizes == [2, 2]


def test_split_stratified_needs_labels() -> None:
    ds = _dataset(["A", None, "B", None])
    with pytest.raises(bst.DatasetError, match=r"needs a label on every patient.*\[1, 3\]"):
        ds.split({"a": 50, "b": 50}, stratify=True)


@pytest.mark.parametrize(
    ("percentages", "match"),
    [
        ({"train": 70, "test": 20}, "must sum to 100, got 90"),
        ({"train": 80, "test": 30}, "must sum to 100, got 110"),
        ({"train": 100, "test": 0}, r"percentages\['test'\] must be > 0, got 0"),
        ({"train": 110, "test": -10}, r"percentages\['test'\] must be > 0, got -10"),
        ({"train": "70", "test": 30}, r"percentages\['train'\] must be > 0, got '70'"),
        ({}, "must be a non-empty dict"),
        ([70, 30], "must be a non-empty dict"),
    ],
)
def test_split_rejects_bad_percentages(percentages: object, match: str) -> None:
    with pytest.raises(bst.ConfigError, match=match):
        _dataset([None] * 10).split(percentages)  # type: ignore[arg-type]


def test_split_allows_tiny_float_error_and_rejects_bad_seed() -> None:
    ds = _dataset([None] * 10)
    assert len(ds.split({"a": 33.3333333, "b": 66.6666667})) == 2
    with pytest.raises(bst.ConfigError, match=r"seed must be an int >= 0, got -1"):
        ds.split({"a": 100}, seed=-1)


def test_split_empty_split_raises() -> None:
    ds = _dataset([None] * 5)
    with pytest.raises(
        bst.DatasetError,
        match=r"split 'test' \(5%\) would get none of the 5 patients; use fewer splits",
    ):
        ds.split({"train": 80, "val": 15, "test": 5})


# --- balance_by_repeat, labels, subset -----------------------------------------------------------


def test_balance_by_repeat_counts_and_ids() -> None:
    ds = _dataset(["A"] * 7 + ["B"] * 3 + ["C"] * 2 + ["D"] * 7, name="cohort")
    balanced = ds.balance_by_repeat(seed=1)
    assert balanced.name == "cohort"
    assert balanced.labels() == {"A": 7, "B": 7, "C": 7, "D": 7}
    assert balanced.patients[: len(ds)] == ds.patients  # originals first, unchanged
    repeats = balanced.patients[len(ds) :]
    for patient in repeats:
        original = ds[patient.info["repeat_of"]]
        k = int(str(patient.id).split("#")[1])
        assert patient.id == f"{original.id}#{k}" and k >= 1
        assert patient.label == original.label and patient.records == original.records
    # Whole rounds first: B (3 -> 7) repeats every patient once, then one of them a second time.
    per_b = Counter(p.info["repeat_of"] for p in repeats if p.label == "B")
    assert sorted(per_b.values()) == [1, 1, 2]
    per_c = Counter(p.info["repeat_of"] for p in repeats if p.label == "C")
    assert sorted(per_c.values()) == [2, 3]
    assert {p.id for p in repeats if p.info["repeat_of"] == max(per_c, key=per_c.__getitem__)} == {
        f"{max(per_c, key=per_c.__getitem__)}#{k}" for k in (1, 2, 3)
    }


def test_balance_by_repeat_seeded_and_keeps_info() -> None:
    record = {"wsi": bst.Record("x.svs")}
    patients = [bst.Patient(f"p{i}", record, "A", {"site": "lung"}) for i in range(5)]
    patients += [bst.Patient(f"q{i}", record, "B") for i in range(3)]
    ds = bst.Dataset("d", patients)

    def repeat_ids(seed: int) -> list[int | str]:
        return [p.id for p in ds.balance_by_repeat(seed=seed).patients[len(ds) :]]

    assert repeat_ids(0) == repeat_ids(0)
    assert len({tuple(repeat_ids(seed)) for seed in range(10)}) > 1
    balanced = _dataset(["A", "B"]).balance_by_repeat()
    assert len(balanced) == 2
    info_ds = bst.Dataset("d", [*patients[:2], bst.Patient("r", record, "B", {"site": "x"})])
    (copy,) = info_ds.balance_by_repeat().patients[3:]
    assert copy.id == "r#1" and copy.info == {"site": "x", "repeat_of": "r"}


def test_balance_by_repeat_needs_labels() -> None:
    with pytest.raises(bst.DatasetError, match=r"balance_by_repeat needs a label.*\[2\]"):
        _dataset(["A", "B", None]).balance_by_repeat()


def test_labels_counts() -> None:
    ds = _dataset(["B", "A", "B", None])
    labels = ds.labels()
    assert labels == {"B": 2, "A": 1, None: 1} and list(labels) == ["B", "A", None]
    assert isinstance(labels, dict)


def test_subset() -> None:
    ds = _dataset(["A", "B", "C", "D"])
    sub = ds.subset([3, 1, 3])
    assert [p.id for p in sub] == [1, 3] and sub.name == ds.name
    assert ds.subset([0], name="one").name == "one"
    with pytest.raises(bst.DatasetError, match=r"has no patients with ids \[7, '1'\]"):
        ds.subset([0, 7, "1"])
    with pytest.raises(bst.ConfigError, match="ids must be an iterable of patient ids"):
        ds.subset("abc")
