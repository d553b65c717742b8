"""Schedulers: which patient's big chunk a worker loads next.

A scheduler is consulted by each worker's loading thread, over the patients that worker owns this
epoch. Subclass :class:`Scheduler` and override :meth:`~Scheduler.schedule` (and, if the first
chunks need a different rule, :meth:`~Scheduler.initial_schedule`), PyDmed's two hooks. Draw all
randomness from the ``rng`` argument so that streams stay reproducible.
"""

from __future__ import annotations

import abc
from collections import Counter, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .data import Patient
from .errors import ConfigError

__all__ = [
    "Candidate",
    "LabelBalancedScheduler",
    "LeastVisitedScheduler",
    "Scheduler",
    "WeightedScheduler",
]


@dataclass
class Candidate:
    """A patient a worker may load from, with what schedulers look at.

    Attributes:
        patient: the patient.
        visits: big chunks of this patient scheduled so far in this worker and epoch.
        weight: the patient's sampling weight (1.0 unless set with ``set_weights``); 0 excludes it.
        part: the part of the slide this worker owns (see ``ChunkContext.part``).
    """

    patient: Patient
    visits: int = 0
    weight: float = 1.0
    part: tuple[int, int] = (0, 1)


class Scheduler(abc.ABC):
    """Base of the schedulers: subclass it and implement :meth:`schedule` to write your own
    (:class:`LeastVisitedScheduler` is the default).

    ``recent`` holds the patients of the last ``buffer_size`` chunks scheduled (about the resident
    chunks) when the hooks run.
    """

    def __init__(self) -> None:
        self.recent: deque[Patient] = deque()

    def initial_schedule(
        self, candidates: Sequence[Candidate], count: int, rng: np.random.Generator
    ) -> list[Candidate]:
        """The candidates of the first ``count`` big chunks (the initial reservoir).

        The default calls :meth:`schedule` ``count`` times; overrides should call
        :meth:`note` for each pick, as it does, so that visits are counted.
        """
        chosen = []
        for _ in range(count):
            pick = self.schedule(candidates, rng)
            if pick is None:
                break
            self.note(pick, count)
            chosen.append(pick)
        return chosen

    @abc.abstractmethod
    def schedule(self, candidates: Sequence[Candidate], rng: np.random.Generator) -> Candidate | None:
        """The candidate whose big chunk loads next, or None when none may load (all weights 0)."""

    def note(self, chosen: Candidate, window: int) -> None:
        """Record a scheduled candidate (called by the engine after each pick)."""
        chosen.visits += 1
        self.recent.append(chosen.patient)
        while len(self.recent) > window:
            self.recent.popleft()


def _least_visited(candidates: Sequence[Candidate], rng: np.random.Generator) -> Candidate | None:
    if not candidates:
        return None
    fewest = min(c.visits for c in candidates)
    tied = [c for c in candidates if c.visits == fewest]
    return tied[int(rng.integers(len(tied)))]


class LeastVisitedScheduler(Scheduler):
    """The default, like PyDmed's: strongly prefer the patients scheduled least so far (ties at
    random), so every patient is visited early and evenly."""

    def schedule(self, candidates: Sequence[Candidate], rng: np.random.Generator) -> Candidate | None:
        return _least_visited([c for c in candidates if c.weight > 0], rng)


class LabelBalancedScheduler(Scheduler):
    """Balance the big chunks over labels (PyDmed's ``LabelBalancedDL``).

    Labels take turns: the next chunk's label is the one scheduled least so far in this worker and
    epoch (ties at random), and within it the least-visited patient. So the chunks loaded, and the
    resident ones on average, are balanced over labels whatever the label frequencies among
    patients (the counts of any two labels never differ by more than one). Patients are dealt to
    workers stratified by label, so each worker owns every label when there are enough patients.
    """

    def __init__(self) -> None:
        super().__init__()
        self.label_counts: Counter[Any] = Counter()

    def schedule(self, candidates: Sequence[Candidate], rng: np.random.Generator) -> Candidate | None:
        live = [c for c in candidates if c.weight > 0]
        if not live:
            return None
        labels = sorted({c.patient.label for c in live}, key=repr)
        fewest = min(self.label_counts[label] for label in labels)
        tied = [label for label in labels if self.label_counts[label] == fewest]
        label = tied[int(rng.integers(len(tied)))]
        return _least_visited([c for c in live if c.patient.label == label], rng)

    def note(self, chosen: Candidate, window: int) -> None:
        super().note(chosen, window)
        self.label_counts[chosen.patient.label] += 1


class WeightedScheduler(Scheduler):
    """Draw the next patient with probability proportional to its weight.

    Args:
        weights: initial weights by patient id (missing ids weigh 1.0). Weights sent later with
            ``BigSmallDataset.set_weights`` replace them, while the stream runs.
    """

    def __init__(self, weights: Mapping[Any, float] | None = None) -> None:
        super().__init__()
        self.weights = dict(weights or {})
        for key, value in self.weights.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0:
                raise ConfigError(f"WeightedScheduler: weight of {key!r} must be a number >= 0, got {value!r}")

    def schedule(self, candidates: Sequence[Candidate], rng: np.random.Generator) -> Candidate | None:
        weights = np.array([c.weight for c in candidates], dtype=float)
        total = weights.sum()
        if total <= 0:
            return None
        return candidates[int(rng.choice(len(candidates), p=weights / total))]
