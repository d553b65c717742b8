"""Reports from the workers back to the main process: per-patient sample counts, skipped slides,
and how busy each worker's loading thread was.

DataLoader workers are separate processes; what they skip under ``on_error="skip"`` and how many
samples each patient gave would otherwise stay in them. Each worker writes its
:class:`WorkerReport` (a small pickled file, replaced atomically) when it skips something and when
its stream ends; the main process reads them back on demand (``ds.skipped``, ``ds.epoch_report()``).
The files sit beside the message board's (``/dev/shm``, else the temporary folder), are named for
the process that created the dataset (``bigsmall-report-<pid>-<start>-<hex>.<key>.pkl``), and are
removed when it garbage-collects the dataset or exits; later boards remove those of processes that
no longer run (see :mod:`bigsmall_torch._engine.messages`).

Each rank of a distributed job has its own dataset object, so a report covers that rank's workers.
"""

from __future__ import annotations

import logging
import os
import pickle
import tempfile
import uuid
import weakref
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .messages import _board_folder, _start_time

__all__ = ["EpochReport", "ReportBox", "WorkerReport"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerReport:
    """What one worker (one shard) did in one iteration.

    ``samples`` counts the samples it yielded per patient id; ``skipped`` maps what it skipped (a
    slide's path, or sliding windows) to a one-line reason; ``busy`` is the fraction of the stream's
    wall time its loading thread spent reading and decoding big chunks (near 1: the worker is
    decode-bound; low: it waits on the DataLoader), None where there is no loading thread;
    ``finished``: it served its whole quota. ``iteration`` tells the DataLoader iterations apart
    (the workers' base seed), ``started`` orders them.
    """

    rank: int
    worker: int
    num_workers: int
    epoch: int
    iteration: int | None
    started: int
    samples: dict[Any, int] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    busy: float | None = None
    finished: bool = False

    @property
    def key(self) -> str:
        return f"r{self.rank}w{self.worker}"


@dataclass(frozen=True)
class EpochReport:
    """The reports of the workers of the latest iteration of one epoch, merged.

    ``samples``: samples per patient id over every worker that reported; ``skipped``: what was
    skipped while streaming, with the reason; ``workers``: each worker's own report;
    ``complete``: every worker of that iteration reported the end of its quota.
    """

    epoch: int
    samples: dict[Any, int]
    skipped: dict[str, str]
    workers: tuple[WorkerReport, ...]

    @property
    def complete(self) -> bool:
        if not self.workers:
            return False
        expected = self.workers[0].num_workers
        return len(self.workers) == max(1, expected) and all(w.finished for w in self.workers)

    def summary(self) -> str:
        """One paragraph: totals, the most and least sampled patients, the skips, busy fractions."""
        total = sum(self.samples.values())
        parts = [f"epoch {self.epoch}: {total} samples from {len(self.samples)} patients"]
        if self.samples:
            ranked = sorted(self.samples.items(), key=lambda item: (-item[1], repr(item[0])))
            (top, most), (bottom, least) = ranked[0], ranked[-1]
            parts.append(f"most {top!r} ({most}), least {bottom!r} ({least})")
        if self.skipped:
            names = ", ".join(list(self.skipped)[:5])
            parts.append(f"skipped {len(self.skipped)} ({names}{', ...' if len(self.skipped) > 5 else ''})")
        busy = [f"{w.key} {w.busy:.0%}" for w in self.workers if w.busy is not None]
        if busy:
            parts.append("loading threads busy: " + ", ".join(busy))
        if not self.complete:
            parts.append("not every worker has finished")
        return "; ".join(parts)


def _remove_reports(folder: Path, stem: str, owner: int) -> None:
    if os.getpid() != owner:  # a forked worker inherits the finalizer: only the owner cleans up
        return
    (folder / f"{stem}.pkl").unlink(missing_ok=True)  # the anchor first: workers stop writing
    for path in folder.glob(f"{stem}.*"):
        path.unlink(missing_ok=True)


class ReportBox:
    """Where the workers of one dataset leave their :class:`WorkerReport` (see the module docstring)."""

    def __init__(self) -> None:
        self.folder = _board_folder()
        owner = os.getpid()
        self.stem = f"bigsmall-report-{owner}-{_start_time(owner)}-{uuid.uuid4().hex}"
        self._warned = False
        # The anchor: workers write only while it exists, so none outlives the dataset's cleanup.
        self._anchor.touch()
        weakref.finalize(self, _remove_reports, self.folder, self.stem, owner)

    @property
    def _anchor(self) -> Path:
        return self.folder / f"{self.stem}.pkl"

    def write(self, report: WorkerReport) -> None:
        """Replace this worker's report. A failure to write (a full disk) is logged once, never
        raised: reporting must not stop a stream."""
        path = self.folder / f"{self.stem}.{report.key}.pkl"
        if not self._anchor.exists():  # the dataset that reads it is gone
            return
        try:
            data = pickle.dumps(report, protocol=pickle.HIGHEST_PROTOCOL)
            fd, name = tempfile.mkstemp(dir=self.folder, prefix=f"{path.stem}.", suffix=".tmp")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                os.replace(name, path)
            except BaseException:
                Path(name).unlink(missing_ok=True)
                raise
            if not self._anchor.exists():  # removed meanwhile: its cleanup may have missed this one
                path.unlink(missing_ok=True)
        except Exception as exc:
            if not self._warned:
                self._warned = True
                logger.warning("cannot write the worker report %s (%s); ds.skipped and "
                               "ds.epoch_report() will miss this worker", path, exc)

    def read(self) -> list[WorkerReport]:
        """Every report present (any epoch or iteration), unordered."""
        reports = []
        for path in self.folder.glob(f"{self.stem}.*.pkl"):
            try:
                with open(path, "rb") as f:
                    report = pickle.load(f)  # written by our own workers
            except (FileNotFoundError, EOFError, pickle.UnpicklingError):
                continue  # replaced or removed meanwhile
            if isinstance(report, WorkerReport):
                reports.append(report)
        return reports

    def epoch_report(self, epoch: int) -> EpochReport:
        """The merged reports of the latest iteration (by start time) of ``epoch``."""
        reports = [r for r in self.read() if r.epoch == epoch]
        if reports:
            latest = max(reports, key=lambda r: r.started)
            reports = [r for r in reports if r.iteration == latest.iteration]
        reports.sort(key=lambda r: (r.rank, r.worker))
        samples: Counter[Any] = Counter()
        skipped: dict[str, str] = {}
        for report in reports:
            samples.update(report.samples)
            skipped.update(report.skipped)
        return EpochReport(epoch, dict(samples), skipped, tuple(reports))

    def __getstate__(self) -> dict[str, Any]:
        return {"folder": self.folder, "stem": self.stem, "_warned": False}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)  # a copy in a worker: writes there, never removes
