"""PyDmed's ``pydmed.extensions.dl``: ``LabelBalancedDL``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ...errors import ConfigError
from ...schedulers import LabelBalancedScheduler, Scheduler
from .data import Patient
from .lightdl import LightDL

__all__ = ["LabelBalancedDL"]


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
