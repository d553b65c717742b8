"""The data model: records, patients and datasets of patients (as in PyDmed).

A :class:`Patient` owns one or more :class:`Record` objects (for example a H&E slide under ``"wsi"``
and an IHC slide under ``"ihc"``), an optional label and free-form info. A :class:`Dataset` is a named,
ordered collection of patients with unique ids; it is built from a folder or a CSV manifest, and can
be split (optionally stratified by label), label-balanced by repetition and subset by id.
"""

from __future__ import annotations

import csv
import math
import numbers
import os
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import zip_longest
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ._paths import RemotePath, as_path, is_url
from .errors import ConfigError, DatasetError

if TYPE_CHECKING:
    from .io.remote import RemoteOptions

__all__ = ["Dataset", "Patient", "Record"]

# Domain tags: the first key of a seed sequence, so split and balance streams differ for one seed.
_SPLIT_STREAM = 11
_BALANCE_STREAM = 12


@dataclass(frozen=True)
class Record:
    """One file of a patient, usually a whole-slide image.

    Args:
        path: the file's path, or its URL (``s3://``, ``gs://``, ``az://``, ``https://``, ...:
            a :class:`~bigsmall_torch.RemotePath`, read with its
            :class:`~bigsmall_torch.RemoteOptions`).
        info: free-form metadata kept with the record.
    """

    path: Path | RemotePath
    info: Mapping[str, Any] = field(default_factory=dict)

    def __init__(self, path: str | os.PathLike[str], info: Mapping[str, Any] | None = None) -> None:
        if not isinstance(path, (str, os.PathLike)):
            raise ConfigError(
                f"Record: path must be a str or os.PathLike, got {type(path).__name__}"
            )
        if not os.fspath(path):
            raise ConfigError("Record: path must not be empty (got '')")
        if info is not None and not isinstance(info, Mapping):
            raise ConfigError(f"Record: info must be a mapping or None, got {type(info).__name__}")
        object.__setattr__(self, "path", as_path(path))
        object.__setattr__(self, "info", dict(info) if info is not None else {})


def _remote_options(
    where: str, storage_options: Mapping[str, Any] | None, remote: RemoteOptions | None
) -> RemoteOptions | None:
    """``remote``, or options made of ``storage_options``, or None (refusing both at once)."""
    if storage_options is None:
        return remote
    if remote is not None:
        raise ConfigError(f"{where}: give storage_options or remote (which holds them), not both")
    from .io.remote import RemoteOptions

    return RemoteOptions(storage_options=storage_options)


def _exists(file: Path | RemotePath) -> bool:
    """Whether ``file`` is there; an object the store will not tell about (403, timeout) counts
    as missing, the failure logged."""
    from .errors import RemoteError

    try:
        return file.is_file() if isinstance(file, RemotePath) else file.exists()
    except RemoteError as exc:
        import logging

        logging.getLogger(__name__).warning("%s", exc)
        return False


def _with_remote(patient: Patient, remote: RemoteOptions) -> Patient:
    """``patient`` with its URL records read with ``remote`` (local records as they are)."""
    if not any(isinstance(r.path, RemotePath) for r in patient.records.values()):
        return patient
    records = {
        key: Record(as_path(r.path, remote), r.info) if isinstance(r.path, RemotePath) else r
        for key, r in patient.records.items()
    }
    return Patient(patient.id, records, patient.label, patient.info)


@dataclass(frozen=True)
class Patient:
    """A patient: an id, named records, an optional label and free-form info.

    Args:
        id: unique id within a dataset (an int or a str).
        records: the patient's records by key, e.g. ``{"wsi": Record(...)}``.
        label: an optional label, used by label-balanced sampling and splits.
        info: free-form metadata.
    """

    id: int | str
    records: Mapping[str, Record]
    label: Any = None
    info: Mapping[str, Any] = field(default_factory=dict)

    def __init__(
        self,
        id: int | str,
        records: Mapping[str, Record],
        label: Any = None,
        info: Mapping[str, Any] | None = None,
    ) -> None:
        if not isinstance(id, (int, str)) or isinstance(id, bool):
            raise ConfigError(f"Patient: id must be an int or a str, got {id!r}")
        if not isinstance(records, Mapping) or not records:
            raise ConfigError(
                f"Patient {id!r}: records must be a non-empty dict of key -> Record, got {records!r}"
            )
        for key, record in records.items():
            if not isinstance(record, Record):
                raise ConfigError(
                    f"Patient {id!r}: records[{key!r}] must be a Record, got {type(record).__name__}"
                )
        object.__setattr__(self, "id", id)
        object.__setattr__(self, "records", dict(records))
        object.__setattr__(self, "label", label)
        object.__setattr__(self, "info", dict(info) if info is not None else {})

    def record(self, key: str) -> Record:
        """The record under ``key``; raises :class:`~bigsmall_torch.ConfigError` naming the keys."""
        try:
            return self.records[key]
        except KeyError:
            raise ConfigError(
                f"patient {self.id!r} has no record {key!r}; its records are {sorted(self.records)}"
            ) from None


class Dataset:
    """A named collection of patients with unique ids.

    Args:
        name: a name for the dataset.
        patients: the patients, in a stable order.
        storage_options: options for fsspec (credentials, endpoint) of every record that is a URL;
            without them each store's standard configuration applies (for S3 the ``AWS_*``
            variables, ``AWS_ENDPOINT_URL`` included, and profiles).
        remote: instead of ``storage_options``, all of how URLs are read
            (:class:`~bigsmall_torch.RemoteOptions`: credentials, a local disk cache, retries).
    """

    def __init__(
        self,
        name: str,
        patients: Iterable[Patient],
        *,
        storage_options: Mapping[str, Any] | None = None,
        remote: RemoteOptions | None = None,
    ) -> None:
        self.name = str(name)
        self.patients: list[Patient] = list(patients)
        options = _remote_options(f"Dataset {name!r}", storage_options, remote)
        if options is not None:
            self.patients = [_with_remote(p, options) if isinstance(p, Patient) else p for p in self.patients]
        seen: set[int | str] = set()
        duplicates: list[int | str] = []
        for patient in self.patients:
            if not isinstance(patient, Patient):
                raise DatasetError(
                    f"Dataset {name!r}: patients must be Patient objects, got {type(patient).__name__}"
                )
            if patient.id in seen:
                duplicates.append(patient.id)
            seen.add(patient.id)
        if duplicates:
            raise DatasetError(f"Dataset {name!r}: duplicate patient ids {duplicates}")

    @classmethod
    def from_folder(
        cls,
        root: str | os.PathLike[str],
        *,
        pattern: str = "*.svs",
        record_key: str = "wsi",
        recursive: bool = False,
        name: str | None = None,
        storage_options: Mapping[str, Any] | None = None,
        remote: RemoteOptions | None = None,
    ) -> Dataset:
        """One patient per file matching ``pattern`` under ``root``.

        ``root`` may be a prefix in object storage (``"s3://bucket/cohort"``, ``gs://``,
        ``az://``): its objects are listed like a folder's files (ids relative to the prefix, as
        for local folders), and read with ``storage_options`` (or ``remote``). Web servers
        (``https://``) have no listing: use :meth:`from_csv` with a URL per row.

        Files are sorted by their path relative to ``root``; patient ids are those relative paths
        without the suffix (stable across machines and runs).

        A DICOM whole-slide image is a folder of instances (one per level, plus label and overview
        images), and OpenSlide opens it from any of them: ``.dcm`` files are taken as one patient
        per folder (id: the folder's path relative to ``root``, or ``root``'s name), read from the
        first file; keep one slide per folder.

        The default pattern takes Aperio ``.svs`` slides only. Plain images (PNG, JPEG, BMP,
        stripped TIFFs, read by the ``"image"`` backend) need a pattern that names them, e.g.
        ``pattern="*.png"``, or ``pattern="*"`` for every file in the folder (so keep other files,
        such as a CSV manifest, elsewhere; a glob has no ``{png,jpg}`` alternatives). A plain
        image records no mpp as a rule: build the dataset with :meth:`from_csv` and an ``mpp``
        column (or ``Record(path, {"mpp": 0.25})``) to read it with ``mpp=``.

        Raises:
            DatasetError: ``root`` is not a folder, or nothing matches ``pattern``.
        """
        if not isinstance(root, (str, os.PathLike)) or not os.fspath(root):
            raise ConfigError(
                f"Dataset.from_folder: root must be a folder path (a non-empty str or os.PathLike), "
                f"got {root!r}"
            )
        if not isinstance(pattern, str) or not pattern:
            raise ConfigError(f"Dataset.from_folder: pattern must be a non-empty str, got {pattern!r}")
        options = _remote_options("Dataset.from_folder", storage_options, remote)
        if is_url(root):
            return cls._from_prefix(
                as_path(root, options), pattern=pattern, record_key=record_key, recursive=recursive, name=name  # type: ignore[arg-type]
            )
        folder = Path(root)
        if not folder.exists():
            raise DatasetError(f"Dataset.from_folder: root {str(folder)!r} does not exist")
        if not folder.is_dir():
            raise DatasetError(f"Dataset.from_folder: root {str(folder)!r} is not a folder")
        found = folder.rglob(pattern) if recursive else folder.glob(pattern)
        # Not only existing files: a dangling link is a patient the datasets' check reports.
        files = sorted(p for p in found if not p.is_dir())
        if not files:
            raise DatasetError(
                f"Dataset.from_folder: no file matches pattern {pattern!r} in {str(folder)!r}"
                f"{' (recursive)' if recursive else ''}"
            )
        files, ids = _one_per_dicom_folder(folder, files)
        by_id: dict[str, list[str]] = {}
        for patient_id, path in zip(ids, files, strict=True):
            by_id.setdefault(patient_id, []).append(str(path.relative_to(folder)))
        clashes = [f"{i!r}: {', '.join(names)}" for i, names in by_id.items() if len(names) > 1]
        if clashes:
            raise DatasetError(
                f"Dataset.from_folder: files in {str(folder)!r} share a patient id (ids are paths "
                f"without the suffix): {'; '.join(clashes)}; narrow pattern={pattern!r} or rename them"
            )
        patients = [Patient(i, {record_key: Record(path)}) for i, path in zip(ids, files, strict=True)]
        return cls(name if name is not None else folder.resolve().name, patients)

    @classmethod
    def _from_prefix(
        cls, root: RemotePath, *, pattern: str, record_key: str, recursive: bool, name: str | None
    ) -> Dataset:
        """:meth:`from_folder` of a prefix in object storage."""
        from .errors import RemoteError
        from .io.remote import list_objects

        try:
            objects = list_objects(root, pattern, recursive=recursive)
        except RemoteError as exc:
            raise DatasetError(f"Dataset.from_folder: cannot list {root.url!r}: {exc.reason}") from exc
        if not objects:
            raise DatasetError(
                f"Dataset.from_folder: no object matches pattern {pattern!r} under {root.url!r}"
                f"{' (recursive)' if recursive else ''}"
            )
        ids: list[str] = []
        for path in objects:
            relative = path.relative_to(root)
            ids.append(str(relative.with_suffix("")) if relative.suffix else str(relative))
        clashes = [i for i, n in Counter(ids).items() if n > 1]
        if clashes:
            raise DatasetError(
                f"Dataset.from_folder: objects under {root.url!r} share a patient id (ids are paths "
                f"without the suffix): {clashes}; narrow pattern={pattern!r}"
            )
        patients = [Patient(i, {record_key: Record(path)}) for i, path in zip(ids, objects, strict=True)]
        return cls(name if name is not None else root.name, patients)

    @classmethod
    def from_csv(
        cls,
        path: str | os.PathLike[str],
        *,
        id_column: str = "patient_id",
        label_column: str | None = "label",
        record_columns: Sequence[str] = ("wsi",),
        root: str | os.PathLike[str] | None = None,
        name: str | None = None,
        check_files: bool = True,
        mpp_column: str | None = "mpp",
        storage_options: Mapping[str, Any] | None = None,
        remote: RemoteOptions | None = None,
    ) -> Dataset:
        """One patient per row of a CSV manifest (UTF-8, with a header row).

        Each of ``record_columns`` holds a file path, relative paths being resolved against ``root``
        (default: the CSV's folder, made absolute), or a URL (``s3://...``, ``https://...``, read
        with ``storage_options`` or ``remote``; ``root`` may be a URL prefix too); an empty cell means the patient has no such
        record, but every patient needs at least one. ``label_column`` may be absent from the file
        (labels are then None); an empty label cell gives None. Every other column is kept, as a
        string, in ``patient.info``. Ids (and labels) become ints when every one is an int written
        plainly (``"7"``, ``"-2"``; an ``"007"`` keeps them all strings), else stay strings. Cells
        are stripped of surrounding spaces, rows whose cells are all empty are skipped, and columns
        without a name (e.g. a pandas index) are not kept. A single str ``record_columns`` is one
        column.

        When the CSV has the column ``mpp_column`` (default ``"mpp"``; None: no such column), each
        record of a row gets ``info={"mpp": float(cell)}``, the microns per pixel of files that
        record none (plain images; an mpp the file records always wins, see
        :meth:`~bigsmall_torch.SlideCache.get`); an empty cell gives no mpp. The column also stays
        in ``patient.info`` as a string, like every other column.

        Raises:
            ConfigError: ``record_columns`` is empty or repeats/clashes with the id or label column.
            DatasetError: the CSV is missing or unreadable, lacks the id or a record column, has no
                rows, rows with too many cells, an empty id, no record, duplicate ids, or mpp cells
                that are not numbers > 0, or (with ``check_files``) record files that do not exist
                (all of them are listed).
        """
        columns = (record_columns,) if isinstance(record_columns, str) else tuple(record_columns)
        if mpp_column is not None and (
            not isinstance(mpp_column, str) or mpp_column in (id_column, label_column, *columns)
        ):
            raise ConfigError(
                "Dataset.from_csv: mpp_column must be None or a column name other than the id, "
                f"label and record columns, got {mpp_column!r}"
            )
        if (
            not columns
            or len(set(columns)) != len(columns)
            or {id_column, label_column} & set(columns)
        ):
            raise ConfigError(
                "Dataset.from_csv: record_columns must be distinct column names, other than the "
                f"id column {id_column!r} and label column {label_column!r}, got {record_columns!r}"
            )
        csv_path = Path(path)
        where = f"CSV {str(csv_path)!r}"
        if not csv_path.is_file():
            raise DatasetError(f"Dataset.from_csv: {where} does not exist or is not a file")
        try:
            with csv_path.open(newline="", encoding="utf-8-sig") as handle:
                reader = csv.reader(handle)
                header = [cell.strip() for cell in next(reader, [])]
                rows = [(reader.line_num, row) for row in reader if any(c.strip() for c in row)]
        except (UnicodeDecodeError, csv.Error) as exc:
            raise DatasetError(f"{where} cannot be read as a UTF-8 CSV file: {exc}") from exc
        repeated = sorted(c for c, n in Counter(header).items() if n > 1 and c)
        if repeated:
            raise DatasetError(f"{where}: the header repeats the columns {repeated}")
        missing_columns = [c for c in (id_column, *columns) if c not in header]
        if missing_columns:
            raise DatasetError(
                f"{where} has no column(s) {missing_columns}; its columns are {header}"
            )
        if not rows:
            raise DatasetError(f"{where} has no patient rows")
        too_long = [line for line, row in rows if len(row) > len(header)]
        if too_long:
            raise DatasetError(
                f"{where}: lines {too_long} have more cells than the header ({len(header)})"
            )
        table = [
            (line, dict(zip_longest(header, (c.strip() for c in row), fillvalue="")))
            for line, row in rows
        ]
        no_id = [line for line, cells in table if not cells[id_column]]
        if no_id:
            raise DatasetError(f"{where}: lines {no_id} have an empty {id_column!r}")
        no_record = [line for line, cells in table if not any(cells[c] for c in columns)]
        if no_record:
            raise DatasetError(
                f"{where}: lines {no_record} have none of the records {list(columns)}"
            )
        ids = _ints_or_strs([cells[id_column] for _, cells in table])
        lines_of: dict[int | str, list[int]] = {}
        for patient_id, (line, _) in zip(ids, table, strict=True):
            lines_of.setdefault(patient_id, []).append(line)
        duplicates = [f"{i!r} (lines {lines})" for i, lines in lines_of.items() if len(lines) > 1]
        if duplicates:
            raise DatasetError(f"{where}: duplicate patient ids {', '.join(duplicates)}")
        labels: list[Any] = [None] * len(table)
        if label_column is not None and label_column in header:
            texts = [cells[label_column] for _, cells in table]
            parsed = iter(_ints_or_strs([text for text in texts if text]))
            labels = [next(parsed) if text else None for text in texts]
        mpps: list[float | None] = [None] * len(table)
        if mpp_column is not None and mpp_column in header:
            mpps = _mpp_cells(where, mpp_column, table)
        options = _remote_options("Dataset.from_csv", storage_options, remote)
        base = as_path(root, options) if root is not None else csv_path.parent
        base = base.absolute()
        info_columns = [c for c in header if c and c not in (id_column, label_column, *columns)]
        patients, missing_files = [], []
        for patient_id, label, mpp, (line, cells) in zip(ids, labels, mpps, table, strict=True):
            records = {}
            for column in columns:
                if cells[column]:
                    given = as_path(cells[column], options)
                    file = given if isinstance(given, RemotePath) or given.is_absolute() else base / given
                    records[column] = Record(file, None if mpp is None else {"mpp": mpp})
                    if check_files and not _exists(file):
                        missing_files.append(
                            f"line {line}, patient {patient_id!r}, {column!r}: {getattr(file, 'display', file)}"
                        )
            info = {c: cells[c] for c in info_columns}
            patients.append(Patient(patient_id, records, label, info))
        if missing_files:
            raise DatasetError(
                f"{where}: {len(missing_files)} record file(s) not found (relative paths are "
                f"resolved against {str(base)!r}, see root=):\n  " + "\n  ".join(missing_files)
            )
        return cls(name if name is not None else csv_path.stem, patients)

    def __len__(self) -> int:
        return len(self.patients)

    def __iter__(self) -> Iterator[Patient]:
        return iter(self.patients)

    def __getitem__(self, index: int) -> Patient:
        return self.patients[index]

    def __repr__(self) -> str:
        return f"Dataset(name={self.name!r}, patients={len(self.patients)})"

    def labels(self) -> Counter[Any]:
        """Patients per label (None counts the unlabelled ones), labels in order of first use."""
        return Counter(patient.label for patient in self.patients)

    def subset(self, ids: Iterable[int | str], *, name: str | None = None) -> Dataset:
        """The patients with the given ids, in this dataset's order (repeated ids count once).

        Raises:
            DatasetError: some ids are not in this dataset (all of them are listed).
        """
        if isinstance(ids, (str, int)):
            raise ConfigError(
                f"Dataset.subset: ids must be an iterable of patient ids, got {ids!r}"
            )
        wanted = dict.fromkeys(ids)
        unknown = [i for i in wanted if i not in {patient.id for patient in self.patients}]
        if unknown:
            raise DatasetError(f"Dataset {self.name!r} has no patients with ids {unknown}")
        return Dataset(name if name is not None else self.name, [p for p in self if p.id in wanted])

    def split(
        self, percentages: Mapping[str, float], *, seed: int = 0, stratify: bool = False
    ) -> dict[str, Dataset]:
        """Split the patients into disjoint datasets, e.g. ``{"train": 70, "val": 15, "test": 15}``.

        Patients are shuffled from ``seed`` and each split gets ``len(self) * pct / 100`` of them,
        rounded by largest remainder (ties go to the split named first) so the sizes add up. With
        ``stratify`` each label group is split that way, so every split keeps the label proportions
        (each label within one patient of its exact share). Patients keep this dataset's order
        within a split; the split datasets are named ``f"{self.name}/{split_name}"``.

        Raises:
            ConfigError: a percentage is not a number > 0, or they do not sum to 100.
            DatasetError: a split would get no patient, or ``stratify`` and a patient has no label.
        """
        fractions = _check_percentages(percentages)
        rng = _rng(_SPLIT_STREAM, seed, "Dataset.split")
        if stratify:
            groups = list(self._label_groups("split(stratify=True)").values())
        else:
            groups = [list(range(len(self.patients)))]
        shares = list(fractions.values())
        chosen: list[list[int]] = [[] for _ in shares]
        # Quota minus patients given so far, per split: breaks ties in favour of splits behind.
        deficit = [0.0] * len(shares)
        for group in groups:
            order = [group[k] for k in rng.permutation(len(group))]
            start = 0
            for j, size in enumerate(_largest_remainder(len(group), shares, deficit)):
                chosen[j].extend(order[start : start + size])
                deficit[j] += len(group) * shares[j] - size
                start += size
        for split_name, members in zip(fractions, chosen, strict=True):
            if not members:
                raise DatasetError(
                    f"Dataset {self.name!r}: split {split_name!r} ({percentages[split_name]}%) "
                    f"would get none of the {len(self)} patients; use fewer splits or more patients"
                )
        return {
            split_name: Dataset(
                f"{self.name}/{split_name}", [self.patients[i] for i in sorted(members)]
            )
            for split_name, members in zip(fractions, chosen, strict=True)
        }

    def balance_by_repeat(self, *, seed: int = 0) -> Dataset:
        """A dataset in which every label has as many patients as the largest label group.

        The patients of a smaller group are repeated by cycling through a permutation of the group
        drawn from ``seed``: whole rounds first, then the start of the permutation. The k-th
        repetition of patient ``p`` (k = 1, 2, ...) gets the id ``f"{p.id}#{k}"`` (ids must stay
        unique), the same records and label, and ``p``'s info plus ``info["repeat_of"] = p.id``.
        The original patients come first, in order, then the repetitions; the name is kept.

        Raises:
            DatasetError: a patient has no label.
        """
        rng = _rng(_BALANCE_STREAM, seed, "Dataset.balance_by_repeat")
        groups = self._label_groups("balance_by_repeat")
        target = max((len(group) for group in groups.values()), default=0)
        repeats: list[Patient] = []
        for group in groups.values():
            order = rng.permutation(len(group))
            times: Counter[int] = Counter()
            for k in range(target - len(group)):
                index = group[order[k % len(group)]]
                times[index] += 1
                p = self.patients[index]
                info = {**p.info, "repeat_of": p.id}
                repeats.append(Patient(f"{p.id}#{times[index]}", p.records, p.label, info))
        return Dataset(self.name, [*self.patients, *repeats])

    def _label_groups(self, what: str) -> dict[Any, list[int]]:
        """Patient indices by label, labels in order of first use; every patient needs a label."""
        unlabelled = [patient.id for patient in self.patients if patient.label is None]
        if unlabelled:
            raise DatasetError(
                f"Dataset {self.name!r}: {what} needs a label on every patient; "
                f"patients without a label: {unlabelled}"
            )
        groups: dict[Any, list[int]] = {}
        for index, patient in enumerate(self.patients):
            groups.setdefault(patient.label, []).append(index)
        return groups


def _mpp_cells(
    where: str, column: str, table: list[tuple[int, dict[str, str]]]
) -> list[float | None]:
    """The ``column`` cell of each row as an mpp (a number > 0) or None when empty; a
    :class:`DatasetError` lists the lines and values of the other cells."""
    mpps: list[float | None] = []
    bad: list[str] = []
    for line, cells in table:
        text = cells[column]
        try:
            value = float(text) if text else None
        except ValueError:
            value = math.nan
        if value is not None and not (math.isfinite(value) and value > 0):
            bad.append(f"line {line}: {text!r}")
        mpps.append(value)
    if bad:
        raise DatasetError(
            f"{where}: the {column!r} column holds microns per pixel, a number > 0 (or nothing), "
            f"but has {'; '.join(bad)}"
        )
    return mpps


def _ints_or_strs(texts: list[str]) -> list[int | str]:
    """The texts as ints if each is an int written plainly (``str(int(t)) == t``), else as strs."""
    try:
        values: list[int | str] = [int(text) for text in texts]
    except ValueError:
        return list(texts)
    return values if all(str(v) == t for v, t in zip(values, texts, strict=True)) else list(texts)


def _rng(stream: int, seed: int, where: str) -> np.random.Generator:
    """The generator of ``stream`` for ``seed`` (an int >= 0)."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ConfigError(f"{where}: seed must be an int >= 0, got {seed!r}")
    return np.random.default_rng(np.random.SeedSequence([stream, int(seed)]))


def _check_percentages(percentages: Mapping[str, float]) -> dict[str, float]:
    """Split name -> fraction of the patients (summing to 1), from percentages summing to 100."""
    if not isinstance(percentages, Mapping) or not percentages:
        raise ConfigError(
            "Dataset.split: percentages must be a non-empty dict of split name -> percentage, "
            f"e.g. {{'train': 70, 'val': 15, 'test': 15}}, got {percentages!r}"
        )
    for split_name, pct in percentages.items():
        if not isinstance(split_name, str) or not split_name:
            raise ConfigError(
                f"Dataset.split: split names must be non-empty str, got {split_name!r}"
            )
        if isinstance(pct, bool) or not isinstance(pct, numbers.Real) or not 0 < pct < math.inf:
            raise ConfigError(
                f"Dataset.split: percentages[{split_name!r}] must be > 0, got {pct!r}"
            )
    total = math.fsum(float(pct) for pct in percentages.values())
    if not math.isclose(total, 100.0, abs_tol=1e-6):
        raise ConfigError(
            f"Dataset.split: percentages must sum to 100, got {total:g} from {dict(percentages)}"
        )
    return {split_name: float(pct) / total for split_name, pct in percentages.items()}


def _largest_remainder(n: int, fractions: list[float], deficit: list[float]) -> list[int]:
    """``n`` cut into parts of about ``n * fraction`` that add up to ``n``: floors, then one more to
    the largest remainders (ties to the largest ``deficit``, then to the first)."""
    quotas = [round(n * f, 9) for f in fractions]
    sizes = [math.floor(q) for q in quotas]
    ranked = sorted(
        range(len(sizes)), key=lambda j: (-round(quotas[j] - sizes[j], 9), -round(deficit[j], 9), j)
    )
    for j in ranked[: n - sum(sizes)]:
        sizes[j] += 1
    return sizes


def _one_per_dicom_folder(root: Path, files: list[Path]) -> tuple[list[Path], list[str]]:
    """``files`` with the ``.dcm`` files of one folder (one DICOM slide) kept once, and their ids:
    the path relative to ``root`` without the suffix, a DICOM folder's path for its slide."""
    kept: list[Path] = []
    ids: list[str] = []
    seen: set[Path] = set()
    for path in files:
        if path.suffix.lower() == ".dcm":
            if path.parent in seen:
                continue
            seen.add(path.parent)
            relative = path.parent.relative_to(root)
            ids.append(str(relative) if relative.parts else root.resolve().name)
        else:
            ids.append(str(path.relative_to(root).with_suffix("")))
        kept.append(path)
    return kept, ids
