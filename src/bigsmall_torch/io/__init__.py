"""Slide I/O: opening slides with a backend (``slide``), the tile-direct JPEG fast path
(``_tiles``), plain images as one-level slides (``_image``, the ``"image"`` backend), choosing the
level of a resolution (``resolution``) and tissue detection (``tissue``). The public names are
re-exported by :mod:`bigsmall_torch`."""

from __future__ import annotations

__all__: list[str] = []
