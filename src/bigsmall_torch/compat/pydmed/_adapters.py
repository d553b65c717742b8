"""The engine's extension points calling the user's PyDmed-style classes, and the stream
``LightDL`` reads (private)."""

from __future__ import annotations

import random
import weakref
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ... import chunks as _chunks
from ... import data as _data
from ..._engine.sharding import derive_seed
from ...dataset import BigSmallDataset
from ...errors import ExtractorError
from ...schedulers import Scheduler
from .chunks import BigChunkLoader, SmallChunk, SmallChunkCollector
from .data import Patient

_CHECKPOINT = "pydmed_checkpoint"  # the key of a patient's checkpoint in ctx.state
_GLOBAL_RNG_STREAM = 21  # domain tag of the seeds of np.random / random in workers


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
        stream = super().__iter__()
        if torch.utils.data.get_worker_info() is None and isinstance(stream, Generator):
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
