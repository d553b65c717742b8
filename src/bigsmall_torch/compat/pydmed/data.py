"""PyDmed's data model (``pydmed.utils.data``): ``Record``, ``Patient``, ``Dataset``."""

from __future__ import annotations

import numbers
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ... import data as _data
from ...errors import ConfigError, DatasetError

__all__ = ["Dataset", "Patient", "Record"]


_PLACEHOLDER_RECORD = "pydmed_placeholder"


# -- the data model -------------------------------------------------------------------------------


class Record:
    """PyDmed's record: a file at ``rootdir`` + ``relativedir`` with free-form ``dict_infos``.

    The three attributes keep what was given (PyDmed code reads ``rootdir + relativedir``, so a
    ``rootdir`` ending with ``/`` keeps working); :attr:`path` joins them as a
    :class:`~pathlib.Path`.
    """

    def __init__(
        self,
        rootdir: str | os.PathLike[str],
        relativedir: str | os.PathLike[str],
        dict_infos: Any = None,
    ) -> None:
        for name, value in (("rootdir", rootdir), ("relativedir", relativedir)):
            if not isinstance(value, (str, os.PathLike)):
                raise ConfigError(
                    f"Record: {name} must be a str or os.PathLike, got {type(value).__name__}"
                )
        self.rootdir = rootdir
        self.relativedir = relativedir
        self.dict_infos = dict_infos if dict_infos is not None else {}

    @property
    def path(self) -> Path:
        """``rootdir / relativedir``."""
        return Path(self.rootdir) / self.relativedir

    def __repr__(self) -> str:
        return f"Record(rootdir={self.rootdir!r}, relativedir={self.relativedir!r})"


class Patient:
    """PyDmed's patient: a unique id and a dict of records.

    ``dict_records`` holds :class:`Record` objects and anything else the user keeps there (PyDmed
    code stores labels there, e.g. ``{"H&E": Record(...), "HER2-status": 2}``, and reads them back
    with ``patient.dict_records["HER2-status"]``). Patients are equal when their ids are, and hash
    by id, as in PyDmed.
    """

    def __init__(self, int_uniqueid: int | str, dict_records: Mapping[str, Any]) -> None:
        if isinstance(int_uniqueid, numbers.Integral) and not isinstance(int_uniqueid, bool):
            int_uniqueid = int(int_uniqueid)
        elif not isinstance(int_uniqueid, str):
            raise ConfigError(
                f"Patient: int_uniqueid must be an int (or a str), got {int_uniqueid!r}"
            )
        if not isinstance(dict_records, Mapping):
            raise ConfigError(
                f"Patient {int_uniqueid!r}: dict_records must be a dict, "
                f"got {type(dict_records).__name__}"
            )
        self.int_uniqueid = int_uniqueid
        self.dict_records = dict_records

    def __hash__(self) -> int:
        return hash(self.int_uniqueid)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Patient):
            return NotImplemented
        return self.int_uniqueid == other.int_uniqueid

    def __repr__(self) -> str:
        return f"Patient(int_uniqueid={self.int_uniqueid!r})"


class Dataset:
    """PyDmed's dataset: a name and a list of :class:`Patient` with distinct ids."""

    def __init__(self, str_dsname: str, list_patients: Sequence[Patient]) -> None:
        self.str_dsname = str_dsname
        self.list_patients = (
            list_patients if isinstance(list_patients, list) else list(list_patients)
        )
        seen: set[int | str] = set()
        duplicates = []
        for patient in self.list_patients:
            if not isinstance(patient, Patient):
                raise DatasetError(
                    f"Dataset {str_dsname!r}: list_patients must hold "
                    f"bigsmall_torch.compat.pydmed.Patient objects, got {type(patient).__name__}"
                )
            if patient.int_uniqueid in seen:
                duplicates.append(patient.int_uniqueid)
            seen.add(patient.int_uniqueid)
        if duplicates:
            raise DatasetError(f"Dataset {str_dsname!r}: duplicate int_uniqueid {duplicates}")

    def __len__(self) -> int:
        return len(self.list_patients)

    def __repr__(self) -> str:
        return f"Dataset(str_dsname={self.str_dsname!r}, patients={len(self.list_patients)})"

    def to_bigsmall(
        self, func_getlabel_of_patient: Callable[[Patient], Any] | None = None
    ) -> _data.Dataset:
        """This dataset as a :class:`bigsmall_torch.Dataset` (the migration path).

        Ids are the ``int_uniqueid``; every :class:`Record` of ``dict_records`` becomes a record
        under the same key (path ``rootdir / relativedir``, ``dict_infos`` as info when a dict), and
        the other entries become the patient's ``info``. ``func_getlabel_of_patient`` (as in
        PyDmed's ``LabelBalancedDL``) gives the labels. A patient without any :class:`Record` gets a
        placeholder record, as bigsmall_torch patients need one (only a custom loader reads it).
        """
        if func_getlabel_of_patient is not None and not callable(func_getlabel_of_patient):
            raise ConfigError(
                "func_getlabel_of_patient must be callable or None, "
                f"got {func_getlabel_of_patient!r}"
            )
        patients = []
        for patient in self.list_patients:
            records = {
                str(key): _data.Record(
                    value.path, value.dict_infos if isinstance(value.dict_infos, Mapping) else None
                )
                for key, value in patient.dict_records.items()
                if isinstance(value, Record)
            }
            if not records:
                records = {_PLACEHOLDER_RECORD: _data.Record(os.devnull, {"placeholder": True})}
            info = {
                str(key): value
                for key, value in patient.dict_records.items()
                if not isinstance(value, Record)
            }
            label = func_getlabel_of_patient(patient) if func_getlabel_of_patient else None
            patients.append(_data.Patient(patient.int_uniqueid, records, label, info))
        return _data.Dataset(self.str_dsname, patients)
