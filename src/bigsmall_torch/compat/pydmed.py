"""PyDmed's API on top of bigsmall_torch: PyDmed code runs with only its imports changed.

Replace ``from pydmed.lightdl import *`` and ``from pydmed.utils.data import *`` with::

    from bigsmall_torch.compat.pydmed import (
        BigChunk, BigChunkLoader, Dataset, LightDL, Patient, Record, SmallChunk,
        SmallChunkCollector, get_default_constglobinf,
    )

and the tutorial's loaders, collectors and training loop run unchanged: ``LightDL`` builds a
:class:`~bigsmall_torch.BigSmallDataset` and a ``torch.utils.data.DataLoader`` underneath, and two
adapters call the user's PyDmed-style classes from the reservoir engine.

How PyDmed's pieces map onto the engine (the full table, with a before/after example, is in
``docs/coming_from_pydmed.md``):

- ``Record(rootdir, relativedir, dict_infos)`` / ``Patient(int_uniqueid, dict_records)`` /
  ``Dataset(str_dsname, list_patients)``: kept as they are; :meth:`Dataset.to_bigsmall` gives the
  :class:`bigsmall_torch.Dataset` the engine streams (ids from ``int_uniqueid``, records from the
  :class:`Record` entries of ``dict_records``, the other entries as ``info``).
- ``extract_bigchunk(last_message_fromroot)`` / ``extract_smallchunk(call_count, bigchunk,
  last_message_fromroot)``: called by adapters implementing the engine's
  ``extract_bigchunk(patient, ctx)`` / ``extract_smallchunk(call_count, bigchunk, ctx)``; the
  message is ``ctx.message``, ``get_checkpoint`` / ``set_checkpoint`` read and write ``ctx.state``.
- ``const_global_info["num_bigchunkloaders"]``: the resident big chunks of all workers together
  (``buffer_size = ceil(num_bigchunkloaders / num_workers)`` per worker).
- ``LightDL.get()``: the next batch of an endless ``DataLoader`` over the engine;
  ``pause_loading()``: that iterator shut down, and the engine moved to its next epoch
  (``set_epoch``), so that the next ``get()`` continues the stream instead of replaying it;
  ``send_message``: ``BigSmallDataset.send_message``; :class:`LabelBalancedDL`:
  :class:`~bigsmall_torch.LabelBalancedScheduler`.

Keys of ``const_global_info`` this layer adds (absent keys take the defaults of
:func:`get_default_constglobinf`): ``"num_workers"`` (DataLoader workers, 0 loads in the calling
process), ``"smallchunks_per_bigchunk"`` (samples a big chunk gives before it retires) and
``"seed"`` (the root of every random stream). ``maxlength_queue_smallchunk``,
``maxlength_queue_lightdl``, ``interval_resched`` and ``core-assignment`` are accepted and ignored.
Any other key is kept and reaches the user's classes as ``self.const_global_info``.

What behaves differently, and why:

- **No process per patient, no taskset.** PyDmed starts processes per loaded patient and pins them
  to cores. Here the DataLoader's workers each keep a reservoir of big chunks and load the next ones
  in a background thread; PyTorch starts and joins them, the OS schedules them.
- **Rescheduling by exhaustion, not by a timer.** PyDmed swaps a big chunk every
  ``interval_resched`` seconds, so what a chunk yields depends on machine speed. Here a big chunk
  retires after ``smallchunks_per_bigchunk`` samples, or when ``extract_smallchunk`` returns None,
  and a seeded scheduler (least visited first) picks the next patient.
- **Messages are seen sooner and stay.** PyDmed hands a message to a patient's processes when the
  patient is next scheduled, once. Here ``extract_smallchunk`` gets the last message sent about its
  patient at its next call, ``extract_bigchunk`` at the next big chunk it loads (prefetched chunks
  keep the message they saw), and a message stays until another replaces it.
- **Checkpoints live in the worker** that owns the patient: they survive the big chunk being
  retired and reloaded there, and the loader sees them; as loading runs ahead, a loader may read a
  checkpoint one chunk old. With workers, loading restarted after ``pause_loading`` starts
  without them (they lived in the workers that shut down).
- **Random numbers.** ``np.random`` and ``random`` are seeded per worker from ``"seed"`` and the
  epoch, so workers never draw the same crops and a restart does not replay them; the loading and
  collecting threads share them, so their order is not reproducible. ``self.rng`` (a seeded
  ``numpy.random.Generator``) is: prefer it. With ``"num_workers": 0`` they are left alone.
- **A batch comes from one worker** (its resident big chunks), consecutive batches from different
  workers, rather than every batch from all resident chunks.
- ``SmallChunk.data`` is None after the default collate (PyDmed puts a placeholder string there);
  ``log`` writes at once; ``LightDL`` is not a ``multiprocessing.Process``, and a subclass
  overriding ``schedule`` / ``initial_schedule`` is refused (write a
  :class:`~bigsmall_torch.Scheduler`); ``flag_grabqueue_onunsched`` has no effect (no small chunk
  is ever discarded).
"""

from __future__ import annotations

import functools
import logging
import math
import numbers
import os
import random
import weakref
from collections.abc import Callable, Generator, Iterator, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch.utils.data import DataLoader

from .. import chunks as _chunks
from .. import data as _data
from .._sharding import derive_seed
from ..dataset import BigSmallDataset
from ..errors import ConfigError, DatasetError, ExtractorError
from ..schedulers import LabelBalancedScheduler, Scheduler

__all__ = [
    "BigChunk",
    "BigChunkLoader",
    "Dataset",
    "LabelBalancedDL",
    "LightDL",
    "Patient",
    "Record",
    "SmallChunk",
    "SmallChunkCollector",
    "get_default_constglobinf",
]

logger = logging.getLogger(__name__)

_CHECKPOINT = "pydmed_checkpoint"  # the key of a patient's checkpoint in ctx.state
_GLOBAL_RNG_STREAM = 21  # domain tag of the seeds of np.random / random in workers
_PLACEHOLDER_RECORD = "pydmed_placeholder"
_IGNORED_KEYS = (
    "maxlength_queue_smallchunk",
    "maxlength_queue_lightdl",
    "interval_resched",
    "core-assignment",
)


def get_default_constglobinf() -> dict[str, Any]:
    """PyDmed's default ``const_global_info``, plus the keys of this layer.

    ``num_bigchunkloaders`` is the number of big chunks resident in all workers together;
    ``num_workers`` the DataLoader workers (0: load in the calling process);
    ``smallchunks_per_bigchunk`` how many samples a big chunk gives before it retires; ``seed`` the
    root of every random stream. The queue lengths, ``interval_resched`` and ``core-assignment`` are
    PyDmed's and are ignored here.
    """
    return {
        "num_bigchunkloaders": 10,
        "maxlength_queue_smallchunk": 100,
        "maxlength_queue_lightdl": 10000,
        "interval_resched": 10,
        "core-assignment": {"lightdl": None, "smallchunkloaders": None, "bigchunkloaders": None},
        "num_workers": 2,
        "smallchunks_per_bigchunk": 200,
        "seed": 0,
    }


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


# -- chunks and the two classes users subclass ----------------------------------------------------


class BigChunk:
    """PyDmed's big chunk: ``data`` (e.g. an ``H x W x 3`` array), ``dict_info_of_bigchunk`` (e.g.
    its ``x``/``y``) and the :class:`Patient` it came from."""

    def __init__(self, data: Any, dict_info_of_bigchunk: Any, patient: Patient) -> None:
        self.data = data
        self.dict_info_of_bigchunk = dict_info_of_bigchunk
        self.patient = patient

    def __repr__(self) -> str:
        return (
            f"BigChunk(patient={self.patient!r}, "
            f"dict_info_of_bigchunk={self.dict_info_of_bigchunk!r})"
        )


class SmallChunk:
    """PyDmed's small chunk: ``data`` (e.g. a ``224 x 224 x 3`` array), its info, the info of the
    big chunk it was cut from, and the :class:`Patient`."""

    def __init__(
        self,
        data: Any,
        dict_info_of_smallchunk: Any,
        dict_info_of_bigchunk: Any,
        patient: Patient,
    ) -> None:
        self.data = data
        self.dict_info_of_smallchunk = dict_info_of_smallchunk
        self.dict_info_of_bigchunk = dict_info_of_bigchunk
        self.patient = patient

    def __repr__(self) -> str:
        return (
            f"SmallChunk(patient={self.patient!r}, "
            f"dict_info_of_smallchunk={self.dict_info_of_smallchunk!r})"
        )


def _require_override(
    cls: type, base: type, method: str, signature: str, *, argument: str = "the class"
) -> None:
    """Refuse ``cls`` unless it is a subclass of ``base`` overriding ``base.method`` (the abstract
    method users implement)."""
    if not isinstance(cls, type) or not issubclass(cls, base):
        raise ConfigError(
            f"{argument} must be a subclass of {base.__name__} (the class, not an instance), "
            f"got {cls!r}"
        )
    if getattr(cls, method) is getattr(base, method):
        raise ExtractorError(
            f"{cls.__name__} cannot be used: a subclass of {base.__name__} must implement "
            f"{signature}"
        )


class _Extractor:
    """What PyDmed's loaders and collectors share: ``patient``, ``const_global_info``, checkpoints,
    ``log`` and a seeded ``rng``."""

    def __init__(self, patient: Patient, const_global_info: Any, old_checkpoint: Any) -> None:
        self.patient = patient
        self.const_global_info = const_global_info if const_global_info is not None else {}
        self.old_checkpoint = old_checkpoint
        #: A seeded generator; inside LightDL the engine's reproducible stream of this worker.
        self.rng: np.random.Generator = np.random.default_rng(0)
        # The patient's checkpoint store: ctx.state inside LightDL, None when checkpoints are off.
        self._checkpoints: MutableMapping[str, Any] | None = {_CHECKPOINT: old_checkpoint}
        self._logfile: str | None = None

    def _bind(
        self,
        rng: np.random.Generator,
        checkpoints: MutableMapping[str, Any] | None,
        logfile: str | None,
    ) -> None:
        self.rng = rng
        self._checkpoints = checkpoints
        self._logfile = logfile

    def get_checkpoint(self) -> Any:
        """The patient's last checkpoint (set by a collector of this patient), or None."""
        if self._checkpoints is None:
            return None
        return self._checkpoints.get(_CHECKPOINT)

    def log(self, str_input: str) -> None:
        """Write ``str_input`` to LightDL's ``fname_logfile`` (as given: add ``"\\n"`` yourself) and
        to this module's logger (INFO)."""
        text = str(str_input)
        logger.info("%s: %s", self.patient, text.rstrip("\n"))
        if self._logfile is not None:
            # One short append per call: O_APPEND keeps lines from several workers whole.
            with open(self._logfile, "a", encoding="utf-8") as handle:
                handle.write(text)


class BigChunkLoader(_Extractor):
    """PyDmed's big-chunk loader: subclass it and implement ``extract_bigchunk(self,
    last_message_fromroot)``, returning a :class:`BigChunk` (or any object your collector expects;
    None means "nothing to give this time").

    In ``extract_bigchunk`` use ``self.patient`` (your :class:`Patient`),
    ``self.const_global_info``, ``self.get_checkpoint()`` (what the patient's collector last set),
    ``self.log(str)`` and ``self.rng``. One instance loads one big chunk.

    The abstract method is checked when the class is instantiated (and when ``LightDL`` is built),
    not by ``abc.ABCMeta``: PyDmed's tutorial decorates the implementing method itself with
    ``@abstractmethod``, which ABCMeta would refuse.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> BigChunkLoader:
        _require_override(
            cls, BigChunkLoader, "extract_bigchunk", "extract_bigchunk(self, last_message_fromroot)"
        )
        return super().__new__(cls)

    def __init__(
        self,
        patient: Patient,
        queue_bigchunk: Any = None,
        const_global_info: Any = None,
        queue_logs: Any = None,
        old_checkpoint: Any = None,
        last_message_from_root: Any = None,
    ) -> None:
        # queue_bigchunk and queue_logs are PyDmed's plumbing, accepted for signature compatibility.
        super().__init__(patient, const_global_info, old_checkpoint)
        self.last_message_from_root = last_message_from_root

    def extract_bigchunk(self, last_message_fromroot: Any) -> Any:
        """Load and return a big chunk of ``self.patient`` (see the class docstring)."""
        raise NotImplementedError(f"{type(self).__name__} must implement extract_bigchunk")


class SmallChunkCollector(_Extractor):
    """PyDmed's small-chunk collector: subclass it and implement ``extract_smallchunk(self,
    call_count, bigchunk, last_message_fromroot)``, returning a :class:`SmallChunk`, or None when
    ``bigchunk`` is used up (it then retires and another one takes its place).

    ``call_count`` counts the small chunks already taken from this big chunk. Use ``self.patient``,
    ``self.const_global_info``, ``self.set_checkpoint(obj)`` / ``self.get_checkpoint()`` (per
    patient, surviving the big chunk's retirement), ``self.log(str)`` and ``self.rng``. One
    instance serves one big chunk; its ``__init__`` may be overridden as in PyDmed
    (``def __init__(self, *args, **kwargs): ...; super().__init__(*args, **kwargs)``).
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> SmallChunkCollector:
        _require_override(
            cls,
            SmallChunkCollector,
            "extract_smallchunk",
            "extract_smallchunk(self, call_count, bigchunk, last_message_fromroot)",
        )
        return super().__new__(cls)

    def __init__(
        self,
        patient: Patient,
        queue_smallchunks: Any = None,
        const_global_info: Any = None,
        type_bigchunkloader: type[BigChunkLoader] | None = None,
        queue_logs: Any = None,
        old_checkpoint: Any = None,
        queue_checkpoint: Any = None,
        last_message_from_root: Any = None,
    ) -> None:
        # The queue_* arguments are PyDmed's plumbing, accepted for signature compatibility.
        super().__init__(patient, const_global_info, old_checkpoint)
        self.type_bigchunkloader = type_bigchunkloader
        self.last_message_from_root = last_message_from_root

    def set_checkpoint(self, checkpoint: Any) -> None:
        """Store ``checkpoint`` (any picklable object) for this patient: later collectors and
        loaders of the patient in this worker get it from :meth:`get_checkpoint`."""
        if self._checkpoints is None:
            raise ConfigError(
                "set_checkpoint: checkpoints are disabled (LightDL(..., "
                "flag_enable_setgetcheckpoint=False)); pass True to use them"
            )
        self._checkpoints[_CHECKPOINT] = checkpoint

    def extract_smallchunk(self, call_count: int, bigchunk: Any, last_message_fromroot: Any) -> Any:
        """Return the next small chunk of ``bigchunk`` or None (see the class docstring)."""
        raise NotImplementedError(f"{type(self).__name__} must implement extract_smallchunk")


# -- adapters: the engine's extension points calling the user's PyDmed-style classes -------------


class _Tracker:
    """Resident big chunks and big chunks loaded, per worker and patient, in shared memory (each
    worker writes its own row), so the main process can answer ``get_list_loadedpatients``."""

    def __init__(self, ids: Sequence[int | str], rows: int) -> None:
        self.column = {patient_id: i for i, patient_id in enumerate(ids)}
        self.resident = torch.zeros((rows, len(ids)), dtype=torch.int64).share_memory_()
        self.loads = torch.zeros((rows, len(ids)), dtype=torch.int64).share_memory_()

    @staticmethod
    def _row() -> int:
        info = torch.utils.data.get_worker_info()
        return 0 if info is None else info.id

    def loaded(self, patient_id: int | str) -> None:
        self.loads[self._row(), self.column[patient_id]] += 1

    def moved(self, patient_id: int | str, delta: int) -> None:
        self.resident[self._row(), self.column[patient_id]] += delta

    def resident_ids(self) -> set[int | str]:
        counts = self.resident.sum(dim=0)
        return {pid for pid, col in self.column.items() if int(counts[col]) > 0}

    def load_count(self, patient_id: int | str) -> int:
        return int(self.loads[:, self.column[patient_id]].sum())

    def clear(self) -> None:
        self.resident.zero_()


@dataclass
class _Plan:
    """Everything the adapters need, picklable (user classes travel as types)."""

    type_bigchunkloader: type[BigChunkLoader]
    type_smallchunkcollector: type[SmallChunkCollector]
    const_global_info: Any
    patients: dict[int | str, Patient]
    smallchunks_per_bigchunk: int
    tracker: _Tracker
    fname_logfile: str | None = None
    messages: bool = True
    checkpoints: bool = True


@dataclass
class _Resident:
    """What the engine's big chunk carries: the user's big chunk and the collector serving it."""

    bigchunk: Any
    collector: SmallChunkCollector | None = field(default=None, repr=False)


class _LoaderAdapter(_chunks.BigChunkLoader):
    """Runs the user's :class:`BigChunkLoader` subclass for each big chunk the engine schedules."""

    def __init__(self, plan: _Plan) -> None:
        self.plan = plan

    def extract_bigchunk(
        self, patient: _data.Patient, ctx: _chunks.ChunkContext
    ) -> _chunks.BigChunk | None:
        plan = self.plan
        message = ctx.message if plan.messages else None
        checkpoints = ctx.state if plan.checkpoints else None
        loader = plan.type_bigchunkloader(
            patient=plan.patients[patient.id],
            queue_bigchunk=None,
            const_global_info=plan.const_global_info,
            queue_logs=None,
            old_checkpoint=None if checkpoints is None else checkpoints.get(_CHECKPOINT),
            last_message_from_root=message,
        )
        loader._bind(ctx.rng, checkpoints, plan.fname_logfile)
        result = loader.extract_bigchunk(message)
        if result is None:
            return None
        plan.tracker.loaded(patient.id)
        info = getattr(result, "dict_info_of_bigchunk", None)
        return _chunks.BigChunk(
            _Resident(result), dict(info) if isinstance(info, Mapping) else {}, patient
        )

    def __repr__(self) -> str:
        return f"PyDmedLoader({self.plan.type_bigchunkloader.__name__})"


class _CollectorAdapter(_chunks.SmallChunkCollector):
    """Runs one instance of the user's :class:`SmallChunkCollector` subclass per big chunk."""

    def __init__(self, plan: _Plan) -> None:
        self.plan = plan

    def extract_smallchunk(
        self, call_count: int, bigchunk: _chunks.BigChunk, ctx: _chunks.ChunkContext
    ) -> _chunks.SmallChunk | None:
        plan = self.plan
        held: _Resident = bigchunk.data
        message = ctx.message if plan.messages else None
        patient_id = bigchunk.patient.id
        if held.collector is None:
            checkpoints = ctx.state if plan.checkpoints else None
            held.collector = plan.type_smallchunkcollector(
                patient=plan.patients[patient_id],
                queue_smallchunks=None,
                const_global_info=plan.const_global_info,
                type_bigchunkloader=plan.type_bigchunkloader,
                queue_logs=None,
                old_checkpoint=None if checkpoints is None else checkpoints.get(_CHECKPOINT),
                queue_checkpoint=None,
                last_message_from_root=message,
            )
            held.collector._bind(ctx.rng, checkpoints, plan.fname_logfile)
            plan.tracker.moved(patient_id, +1)
        small = held.collector.extract_smallchunk(call_count, held.bigchunk, message)
        if small is None or call_count + 1 >= plan.smallchunks_per_bigchunk:
            plan.tracker.moved(patient_id, -1)  # the engine retires this big chunk now
        if small is None:
            return None
        if not isinstance(small, SmallChunk):
            raise ExtractorError(
                f"{type(held.collector).__name__}.extract_smallchunk must return a "
                f"bigsmall_torch.compat.pydmed.SmallChunk or None, got {type(small).__name__}"
            )
        return _chunks.SmallChunk(small, {}, bigchunk.info, bigchunk.patient)

    def __repr__(self) -> str:
        return f"PyDmedCollector({self.plan.type_smallchunkcollector.__name__})"


class _LightDLStream(BigSmallDataset):
    """The engine as LightDL uses it: yields the user's :class:`SmallChunk` objects, endlessly,
    with ``tfms`` applied to their data in the worker when the default collate is used.

    Iteration is :meth:`BigSmallDataset.__iter__`'s (epochs, ``state_dict`` / ``load_state_dict``,
    quotas); only :meth:`_emit` differs, handing out the user's small chunks instead of sample
    dicts.
    """

    def __init__(
        self,
        dataset: _data.Dataset,
        plan: _Plan,
        *,
        buffer_size: int,
        seed: int,
        tfms: Callable[[Any], Any] | None,
        scheduler: Scheduler | None,
    ) -> None:
        super().__init__(
            dataset,
            _LoaderAdapter(plan),
            _CollectorAdapter(plan),
            buffer_size=buffer_size,
            smallchunks_per_bigchunk=plan.smallchunks_per_bigchunk,
            seed=seed,
            validate=False,
            rank=0,
            world_size=1,
            scheduler=scheduler,
        )
        self.plan = plan
        self.tfms = tfms
        self._open: weakref.WeakSet[Generator[SmallChunk, None, None]] = weakref.WeakSet()

    def __iter__(self) -> Iterator[Any]:
        stream = cast("Generator[SmallChunk, None, None]", super().__iter__())
        if torch.utils.data.get_worker_info() is None:
            self._open.add(stream)  # closed by close_streams (num_workers=0)
        return stream

    def _emit(self, small: _chunks.SmallChunk) -> Any:
        """The user's small chunk that the engine's small chunk carries, ``tfms`` applied."""
        user_small: SmallChunk = small.data
        if self.tfms is not None:
            user_small.data = self.tfms(user_small.data)
        return user_small

    def close_streams(self) -> None:
        """Close the streams iterated in this process (stops their loading threads); the next
        iteration's position is the start of the current epoch."""
        for stream in list(self._open):
            stream.close()
        self._live = None

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_open"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._open = weakref.WeakSet()


def _as_list(batch: list[SmallChunk]) -> list[SmallChunk]:
    """The DataLoader's collate_fn: keep a batch as the list of small chunks."""
    return batch


def _seed_worker(seed: int, epoch: int, worker: int) -> None:
    """Seed ``np.random`` and ``random`` from (seed, epoch, worker): PyDmed code draws from them,
    forked workers would otherwise all draw the same numbers, and workers restarted after
    ``pause_loading`` (the next epoch) would replay the draws of the first ones."""
    np_state, py_state = derive_seed(_GLOBAL_RNG_STREAM, seed, epoch, worker).generate_state(2)
    np.random.seed(int(np_state))
    random.seed(int(py_state))


def _init_worker(seed: int, worker_id: int) -> None:
    """LightDL's ``worker_init_fn``: :func:`_seed_worker` with the epoch the worker streams."""
    info = torch.utils.data.get_worker_info()
    stream = None if info is None else info.dataset
    epoch = stream.epoch if isinstance(stream, BigSmallDataset) else 0
    _seed_worker(seed, epoch, worker_id)


def _stack(
    list_smallchunks: list[SmallChunk],
) -> tuple[torch.Tensor, list[Patient], list[SmallChunk]]:
    x = torch.stack([torch.as_tensor(smallchunk.data) for smallchunk in list_smallchunks], dim=0)
    list_patients = [smallchunk.patient for smallchunk in list_smallchunks]
    for smallchunk in list_smallchunks:
        smallchunk.data = None  # the batch holds the pixels; do not keep a second reference
    return x, list_patients, list(list_smallchunks)


def _setting(const_global_info: Mapping[str, Any], key: str, minimum: int) -> int:
    value = const_global_info.get(key, get_default_constglobinf()[key])
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ConfigError(f'const_global_info["{key}"] must be an int >= {minimum}, got {value!r}')
    return int(value)


# -- the data loader ------------------------------------------------------------------------------


class LightDL:
    """PyDmed's ``LightDL``: batches of small chunks from big chunks of many patients.

    Args:
        dataset: a :class:`Dataset` of :class:`Patient`.
        type_bigchunkloader: your :class:`BigChunkLoader` subclass (the class, not an instance).
        type_smallchunkcollector: your :class:`SmallChunkCollector` subclass.
        const_global_info: settings, e.g. :func:`get_default_constglobinf` (keys described there);
            your classes see it as ``self.const_global_info``.
        batch_size: small chunks per :meth:`get`.
        tfms: applied to each ``SmallChunk.data`` (e.g. ``torchvision.transforms.ToTensor()``), in
            the workers with the default collate; None keeps the data (stacked as tensors).
        flag_grabqueue_onunsched: accepted for compatibility; no small chunk is ever discarded.
        collate_func: ``collate_func(list_smallchunks, tfms)``, run by :meth:`get` in this process
            on the raw small chunks; default: :meth:`default_collate`.
        fname_logfile: the file ``self.log(str)`` of loaders and collectors appends to.
        flag_enable_sendgetmessage: False: :meth:`send_message` is refused and
            ``last_message_fromroot`` is always None.
        flag_enable_setgetcheckpoint: False: ``set_checkpoint`` is refused and ``get_checkpoint``
            returns None.

    Underneath: a :class:`~bigsmall_torch.BigSmallDataset` (``buffer_size = ceil(num_bigchunkloaders
    / num_workers)`` resident big chunks per worker) read by a ``torch.utils.data.DataLoader`` with
    ``const_global_info["num_workers"]`` workers. The stream is endless, as PyDmed's.
    """

    def __init__(
        self,
        dataset: Dataset,
        type_bigchunkloader: type[BigChunkLoader],
        type_smallchunkcollector: type[SmallChunkCollector],
        const_global_info: Mapping[str, Any],
        batch_size: int,
        tfms: Callable[[Any], Any] | None,
        flag_grabqueue_onunsched: bool = True,
        collate_func: Callable[[list[SmallChunk], Any], Any] | None = None,
        fname_logfile: str | os.PathLike[str] | None = None,
        flag_enable_sendgetmessage: bool = True,
        flag_enable_setgetcheckpoint: bool = True,
    ) -> None:
        self._refuse_scheduling_overrides()
        if not isinstance(dataset, Dataset):
            raise ConfigError(
                "dataset must be a bigsmall_torch.compat.pydmed.Dataset, "
                f"got {type(dataset).__name__}"
            )
        if len(dataset) == 0:
            raise ConfigError(f"dataset {dataset.str_dsname!r} has no patients")
        _require_override(
            type_bigchunkloader, BigChunkLoader, "extract_bigchunk",
            "extract_bigchunk(self, last_message_fromroot)", argument="type_bigchunkloader",
        )  # fmt: skip
        _require_override(
            type_smallchunkcollector, SmallChunkCollector, "extract_smallchunk",
            "extract_smallchunk(self, call_count, bigchunk, last_message_fromroot)",
            argument="type_smallchunkcollector",
        )  # fmt: skip
        if not isinstance(const_global_info, Mapping):
            raise ConfigError(
                f"const_global_info must be a dict (see get_default_constglobinf()), got "
                f"{type(const_global_info).__name__}"
            )
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size must be an int >= 1, got {batch_size!r}")
        if tfms is not None and not callable(tfms):
            raise ConfigError(f"tfms must be callable or None, got {tfms!r}")
        if collate_func is not None and not callable(collate_func):
            raise ConfigError(f"collate_func must be callable or None, got {collate_func!r}")
        num_bigchunkloaders = _setting(const_global_info, "num_bigchunkloaders", 1)
        self.num_workers = _setting(const_global_info, "num_workers", 0)
        smallchunks_per_bigchunk = _setting(const_global_info, "smallchunks_per_bigchunk", 1)
        self.seed = _setting(const_global_info, "seed", 0)
        ignored = [key for key in _IGNORED_KEYS if key in const_global_info]
        if ignored:
            logger.debug(
                "LightDL: const_global_info keys %s have no effect in bigsmall_torch", ignored
            )

        self.dataset = dataset
        self.type_bigchunkloader = type_bigchunkloader
        self.type_smallchunkcollector = type_smallchunkcollector
        self.const_global_info = const_global_info
        self.batch_size = batch_size
        self.tfms = tfms
        self.flag_grabqueue_onunsched = flag_grabqueue_onunsched
        self.collate_func = collate_func
        self.fname_logfile = None if fname_logfile is None else os.fspath(fname_logfile)
        self.flag_enable_sendgetmessage = bool(flag_enable_sendgetmessage)
        self.flag_enable_setgetcheckpoint = bool(flag_enable_setgetcheckpoint)
        #: Data-free copies of every small chunk returned so far (for :meth:`visualize`).
        self.list_smallchunksforvis: list[SmallChunk] = []

        ids = [patient.int_uniqueid for patient in dataset.list_patients]
        self._plan = _Plan(
            type_bigchunkloader=type_bigchunkloader,
            type_smallchunkcollector=type_smallchunkcollector,
            const_global_info=const_global_info,
            patients=dict(zip(ids, dataset.list_patients, strict=True)),
            smallchunks_per_bigchunk=smallchunks_per_bigchunk,
            tracker=_Tracker(ids, max(1, self.num_workers)),
            fname_logfile=self.fname_logfile,
            messages=self.flag_enable_sendgetmessage,
            checkpoints=self.flag_enable_setgetcheckpoint,
        )
        self.buffer_size = math.ceil(num_bigchunkloaders / max(1, self.num_workers))
        labels, scheduler = self._labels_and_scheduler()
        self._stream = _LightDLStream(
            dataset.to_bigsmall(labels),
            self._plan,
            buffer_size=self.buffer_size,
            seed=self.seed,
            tfms=tfms if collate_func is None else None,
            scheduler=scheduler,
        )
        self._loader = DataLoader(
            self._stream,
            batch_size=batch_size,
            num_workers=self.num_workers,
            collate_fn=_as_list,
            worker_init_fn=functools.partial(_init_worker, self.seed) if self.num_workers else None,
        )
        self._iterator: Iterator[list[SmallChunk]] | None = None

    def _refuse_scheduling_overrides(self) -> None:
        for klass in type(self).__mro__:
            if klass is LightDL:
                return
            overridden = sorted({"schedule", "initial_schedule"} & set(vars(klass)))
            if overridden:
                raise ConfigError(
                    f"{type(self).__name__} overrides {overridden}: LightDL's scheduling hooks are "
                    "not used by bigsmall_torch. Write a bigsmall_torch.Scheduler subclass "
                    "(schedule/initial_schedule over Candidates) and pass it to "
                    "bigsmall_torch.BigSmallDataset(..., scheduler=...), or use LabelBalancedDL"
                )

    def _labels_and_scheduler(self) -> tuple[Callable[[Patient], Any] | None, Scheduler | None]:
        """Labels for the engine's patients and the scheduler (default: least visited first)."""
        return None, None

    # -- PyDmed's API ----------------------------------------------------------------------------

    def start(self) -> None:
        """Start the workers, which begin loading big chunks; :meth:`get` calls it when needed."""
        self._started()

    def _started(self) -> Iterator[list[SmallChunk]]:
        if self._iterator is None:
            logger.info(
                "LightDL: %d worker(s), %d resident big chunk(s) each, %d patient(s)",
                self.num_workers, self.buffer_size, len(self.dataset),
            )  # fmt: skip
            self._iterator = iter(self._loader)
        return self._iterator

    def get(self) -> Any:
        """The next batch: ``collate_func(list_smallchunks, tfms)``; by default
        ``(x, list_patients, list_smallchunks)`` (see :meth:`default_collate`). Starts loading
        first if :meth:`start` was not called."""
        batch = next(self._started())
        patients = self._plan.patients
        for smallchunk in batch:
            # Workers send copies: hand back the caller's own Patient objects.
            patient = smallchunk.patient
            if isinstance(patient, Patient):
                smallchunk.patient = patients.get(patient.int_uniqueid, patient)
        self.list_smallchunksforvis.extend(
            SmallChunk(None, s.dict_info_of_smallchunk, s.dict_info_of_bigchunk, s.patient)
            for s in batch
        )
        if self.collate_func is None:
            return _stack(batch)  # tfms already ran in the worker
        return self.collate_func(batch, self.tfms)

    @staticmethod
    def default_collate(
        list_smallchunks: list[SmallChunk], tfms: Callable[[Any], Any] | None
    ) -> tuple[torch.Tensor, list[Patient], list[SmallChunk]]:
        """PyDmed's default collate: ``x = torch.stack([tfms(s.data) ...])`` (the data as
        tensors when ``tfms`` is None), the patients, and the small chunks, whose ``data`` becomes
        None."""
        if tfms is not None:
            for smallchunk in list_smallchunks:
                smallchunk.data = tfms(smallchunk.data)
        return _stack(list_smallchunks)

    def send_message(self, patient: Patient | int | str, message: Any) -> None:
        """Send ``message`` (any picklable object) about ``patient`` to the loaders and collectors.

        ``extract_smallchunk`` receives it as ``last_message_fromroot`` at its next call on that
        patient, ``extract_bigchunk`` at the next big chunk it loads (already prefetched chunks were
        loaded with the message they saw). The last message sent stays until replaced.
        """
        if not self.flag_enable_sendgetmessage:
            raise ConfigError(
                "send_message: messages are disabled "
                "(LightDL(..., flag_enable_sendgetmessage=False)); pass True to use them"
            )
        patient_id = patient.int_uniqueid if isinstance(patient, Patient) else patient
        self._stream.send_message(patient_id, message)

    def pause_loading(self) -> None:
        """Stop loading: the DataLoader's workers shut down (joined, not killed) and the loading
        threads stop. A later :meth:`get` starts again with fresh workers, on the engine's next
        epoch (``set_epoch``): the stream continues rather than replaying its start, as PyDmed's
        did, and (with classes drawing from ``self.rng``) is the same for the same seed and the
        same sequence of calls."""
        iterator, self._iterator = self._iterator, None
        if iterator is not None:
            shutdown = getattr(iterator, "_shutdown_workers", None)
            if callable(shutdown):  # torch's own clean shutdown of the workers it started
                shutdown()
        self._stream.close_streams()
        self._plan.tracker.clear()
        if iterator is not None:
            self._stream.set_epoch(self._stream.epoch + 1)

    def __enter__(self) -> LightDL:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.pause_loading()

    def log(self, str_input: str) -> None:
        """Write ``str_input`` to ``fname_logfile`` (when set) and to this module's logger."""
        logger.info("%s", str(str_input).rstrip("\n"))
        if self.fname_logfile is not None:
            with open(self.fname_logfile, "a", encoding="utf-8") as handle:
                handle.write(str(str_input))

    def visualize(
        self, func_visualize_one_patient: Callable[[Patient, list[SmallChunk]], Any]
    ) -> None:
        """Call ``func_visualize_one_patient(patient, list_smallchunks)`` for every patient of the
        dataset, with the (data-free) small chunks :meth:`get` returned for it so far."""
        by_patient: dict[int | str, list[SmallChunk]] = {
            patient.int_uniqueid: [] for patient in self.dataset.list_patients
        }
        for smallchunk in self.list_smallchunksforvis:
            by_patient.setdefault(smallchunk.patient.int_uniqueid, []).append(smallchunk)
        for patient in self.dataset.list_patients:
            func_visualize_one_patient(patient, by_patient[patient.int_uniqueid])

    def get_list_loadedpatients(self) -> list[Patient]:
        """The patients with a big chunk resident in a worker now (as of its last draw)."""
        resident = self._plan.tracker.resident_ids()
        return [p for p in self.dataset.list_patients if p.int_uniqueid in resident]

    def get_list_waitingpatients(self) -> list[Patient]:
        """The patients without a resident big chunk."""
        resident = self._plan.tracker.resident_ids()
        return [p for p in self.dataset.list_patients if p.int_uniqueid not in resident]

    def get_schedcount_of(self, patient: Patient) -> int:
        """How many big chunks of ``patient`` were loaded so far (in all workers)."""
        if patient.int_uniqueid not in self._plan.tracker.column:
            raise ConfigError(
                f"get_schedcount_of: {patient!r} is not in dataset {self.dataset.str_dsname!r}"
            )
        return self._plan.tracker.load_count(patient.int_uniqueid)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(dataset={self.dataset!r}, "
            f"type_bigchunkloader={self.type_bigchunkloader.__name__}, "
            f"type_smallchunkcollector={self.type_smallchunkcollector.__name__}, "
            f"batch_size={self.batch_size}, num_workers={self.num_workers}, "
            f"buffer_size={self.buffer_size})"
        )


class LabelBalancedDL(LightDL):
    """PyDmed's ``extensions.dl.LabelBalancedDL``: big chunks balanced over the labels that
    ``func_getlabel_of_patient(patient)`` gives (hashable, not None), by
    :class:`~bigsmall_torch.LabelBalancedScheduler`. The other arguments are :class:`LightDL`'s.

    Balance holds per worker: patients are dealt to workers stratified by label, so each worker owns
    every label when there are at least ``num_workers`` patients of each.
    """

    def __init__(
        self, func_getlabel_of_patient: Callable[[Patient], Any], *args: Any, **kwargs: Any
    ) -> None:
        if not callable(func_getlabel_of_patient):
            raise ConfigError(
                f"func_getlabel_of_patient must be callable, got {func_getlabel_of_patient!r}"
            )
        self.func_getlabel_of_patient = func_getlabel_of_patient
        self.dict_label_to_listpatients: dict[Any, list[Patient]] = {}
        self.possible_labels: list[Any] = []
        super().__init__(*args, **kwargs)

    def _labels_and_scheduler(self) -> tuple[Callable[[Patient], Any] | None, Scheduler | None]:
        groups: dict[Any, list[Patient]] = {}
        for patient in self.dataset.list_patients:
            label = self.func_getlabel_of_patient(patient)
            try:
                groups.setdefault(label, []).append(patient)
            except TypeError:
                raise ConfigError(
                    f"LabelBalancedDL: the label of {patient!r} must be hashable, got {label!r}"
                ) from None
            if label is None:
                raise ConfigError(
                    f"LabelBalancedDL: func_getlabel_of_patient({patient!r}) gave None"
                )
        self.dict_label_to_listpatients = groups
        self.possible_labels = list(groups)
        return self.func_getlabel_of_patient, LabelBalancedScheduler()
