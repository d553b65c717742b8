"""Compatibility layers: the APIs of the systems bigsmall_torch replaces, on top of its engine.

- :mod:`bigsmall_torch.compat.pydmed`: PyDmed's ``BigChunkLoader`` / ``SmallChunkCollector`` /
  ``LightDL`` names and signatures, so PyDmed code runs with only its imports changed.

Nothing is imported here: ``import bigsmall_torch.compat.pydmed`` loads the layer it names.
"""

from __future__ import annotations

__all__: list[str] = []
