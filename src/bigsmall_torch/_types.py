"""Small typed shapes shared by the package (documentation as much as checking)."""

from __future__ import annotations

from typing import Any, TypedDict

import torch

__all__ = ["Sample"]


class Sample(TypedDict, total=False):
    """One sample as :class:`~bigsmall_torch.BigSmallDataset` yields it (``default_collate`` batches it).

    ``image`` is a CHW uint8 tensor (unless a transform changes it); ``x``/``y`` are level-0 pixels of
    the patch's top-left; ``level`` is the pyramid level it was read at. Custom collectors add their
    own keys through ``SmallChunk.info``.
    """

    image: torch.Tensor
    patient_id: int | str
    label: Any
    x: int
    y: int
    level: int
