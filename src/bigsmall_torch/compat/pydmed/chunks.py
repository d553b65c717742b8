"""PyDmed's chunks and the two classes users subclass (from ``pydmed.lightdl``): ``BigChunk``,
``SmallChunk``, ``BigChunkLoader``, ``SmallChunkCollector``."""

from __future__ import annotations

import logging
from collections.abc import MutableMapping
from typing import Any

import numpy as np

from ...errors import ConfigError, ExtractorError
from .data import Patient

__all__ = ["BigChunk", "BigChunkLoader", "SmallChunk", "SmallChunkCollector"]

logger = logging.getLogger(__name__)

_CHECKPOINT = "pydmed_checkpoint"  # the key of a patient's checkpoint in ctx.state


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
