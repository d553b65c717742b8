"""PyDmed's ``pydmed.lightdl.LightDL``: batches of small chunks from big chunks of many patients."""

from __future__ import annotations

import functools
import logging
import math
import numbers
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch.utils.data import DataLoader

from ...errors import ConfigError
from ...schedulers import Scheduler
from ._adapters import _as_list, _init_worker, _LightDLStream, _Plan, _stack, _Tracker
from .chunks import BigChunkLoader, SmallChunk, SmallChunkCollector, _require_override
from .data import Dataset, Patient

__all__ = ["LightDL", "get_default_constglobinf"]

logger = logging.getLogger(__name__)

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
