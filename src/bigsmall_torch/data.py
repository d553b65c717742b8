"""The data model: records, patients and datasets of patients (as in PyDmed).

A :class:`Patient` owns one or more :class:`Record` objects (for example a H&E slide under ``"wsi"``
and an IHC slide under ``"ihc"``), an optional label and free-form info. A :class:`Dataset` is a named,
ordered collection of patients with unique ids.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError, DatasetError

__all__ = ["Dataset", "Patient", "Record"]


@dataclass(frozen=True)
class Record:
    """One file of a patient, usually a whole-slide image.

    Args:
        path: the file's path.
        info: free-form metadata kept with the record.
    """

    path: Path
    info: Mapping[str, Any] = field(default_factory=dict)

    def __init__(self, path: str | os.PathLike[str], info: Mapping[str, Any] | None = None) -> None:
        if not isinstance(path, (str, os.PathLike)):
            raise ConfigError(f"Record: path must be a str or os.PathLike, got {type(path).__name__}")
        object.__setattr__(self, "path", Path(path))
        object.__setattr__(self, "info", dict(info) if info is not None else {})


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
    """

    def __init__(self, name: str, patients: Iterable[Patient]) -> None:
        self.name = str(name)
        self.patients: list[Patient] = list(patients)
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
    ) -> Dataset:
        """One patient per file matching ``pattern`` under ``root``.

        Files are sorted by their path relative to ``root``; patient ids are those relative paths
        without the suffix (stable across machines and runs).

        Raises:
            DatasetError: ``root`` is not a folder, or nothing matches ``pattern``.
        """
        folder = Path(root)
        if not folder.exists():
            raise DatasetError(f"Dataset.from_folder: root {str(folder)!r} does not exist")
        if not folder.is_dir():
            raise DatasetError(f"Dataset.from_folder: root {str(folder)!r} is not a folder")
        found = folder.rglob(pattern) if recursive else folder.glob(pattern)
        files = sorted(p for p in found if p.is_file())
        if not files:
            raise DatasetError(
                f"Dataset.from_folder: no file matches pattern {pattern!r} in {str(folder)!r}"
                f"{' (recursive)' if recursive else ''}"
            )
        patients = [
            Patient(
                str(path.relative_to(folder).with_suffix("")),
                {record_key: Record(path)},
            )
            for path in files
        ]
        return cls(name if name is not None else folder.resolve().name, patients)

    def __len__(self) -> int:
        return len(self.patients)

    def __iter__(self) -> Iterator[Patient]:
        return iter(self.patients)

    def __getitem__(self, index: int) -> Patient:
        return self.patients[index]

    def __repr__(self) -> str:
        return f"Dataset(name={self.name!r}, patients={len(self.patients)})"
