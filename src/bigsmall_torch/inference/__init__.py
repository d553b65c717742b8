"""Whole-slide inference: the window grid and ``SlidingWindowDataset`` (``sliding``), and the
``Stitcher`` that assembles per-window outputs into heatmaps (``stitching``). The public names are
re-exported by :mod:`bigsmall_torch`."""

from __future__ import annotations

__all__: list[str] = []
