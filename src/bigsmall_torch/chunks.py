"""Big chunks, small chunks, and the two extension points users subclass.

A :class:`BigChunkLoader` turns a patient into a :class:`BigChunk` (a large region held in RAM); a
:class:`SmallChunkCollector` cuts :class:`SmallChunk` samples (patches) out of a big chunk. Both
receive a :class:`ChunkContext` carrying a seeded random generator, the per-patient state of the
worker, the shard part of the patient the worker owns, and the worker's open slides.
"""

from __future__ import annotations

import abc
from collections.abc import MutableMapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ._engine.messages import MessageBoard
from .data import Patient
from .errors import ExtractorError
from .io._tiles import TiledRegion
from .io.slide import SlideCache, SlideReader

__all__ = [
    "BigChunk",
    "BigChunkLoader",
    "ChunkContext",
    "SmallChunk",
    "SmallChunkCollector",
    "channel_planar",
]


def channel_planar(image: np.ndarray) -> np.ndarray:
    """``image`` (``H x W x C``) copied into channel-planar memory, returned as an ``H x W x C`` view.

    Values and shape are unchanged; only the memory layout differs (``C x H x W`` underneath). A crop of
    it becomes a CHW tensor whose rows are contiguous, so batching crops is a fast row copy instead of
    a strided per-pixel transpose (about 25x faster for uint8 RGB patches). The copy is paid once per
    big chunk, in the loading thread.
    """
    if image.ndim != 3 or image.transpose(2, 0, 1).flags.c_contiguous:  # already planar
        return image
    return np.ascontiguousarray(image.transpose(2, 0, 1)).transpose(1, 2, 0)


@dataclass
class BigChunk:
    """A large region of a patient's data held in memory.

    ``data`` is usually an ``H x W x 3`` uint8 array; ``info`` describes where it came from (the
    built-in loader stores level-0 ``x``/``y``, ``level``, ``downsample``, ``width``, ``height``,
    ``record_key`` and ``path``). Loaders should store images with :func:`channel_planar`, so that
    patches batch quickly as CHW tensors. ``labels``, when set, is the ``H x W`` uint8 label raster of
    the region, pixel for pixel with ``data`` (0: no class, ``k + 1``: ``info["classes"][k]``; see
    :class:`~bigsmall_torch.RandomRegionLoader`'s ``annotations``).
    """

    data: Any
    info: dict[str, Any]
    patient: Patient
    labels: np.ndarray | None = None
    #: Scratch space for collectors: what they derive from this chunk once (not part of equality).
    cache: dict[Any, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.data is None:
            raise ExtractorError(
                "BigChunk: data is None; a loader with nothing to give returns None instead of a "
                "BigChunk"
            )
        _check_info("BigChunk", self.info)
        if not isinstance(self.patient, Patient):
            raise ExtractorError(
                f"BigChunk: patient must be a bigsmall_torch.Patient, got {type(self.patient).__name__}"
            )
        if self.labels is not None and (
            not isinstance(self.labels, np.ndarray)
            or self.labels.dtype != np.uint8
            or self.labels.shape != np.shape(self.data)[:2]
        ):
            raise ExtractorError(
                "BigChunk: labels must be a uint8 array of the data's height x width "
                f"{np.shape(self.data)[:2]}, got {getattr(self.labels, 'dtype', type(self.labels).__name__)} "
                f"{getattr(self.labels, 'shape', '')}"
            )


#: Sample keys a small chunk's ``info`` may not set: they would overwrite the image and the id.
RESERVED_KEYS = frozenset({"image", "patient_id"})


def image_array(small: SmallChunk) -> np.ndarray:
    """``small.data`` when it is a numpy array (what samples and batches are made of), else an
    :class:`~bigsmall_torch.ExtractorError` saying what a collector must return."""
    data = small.data
    if not isinstance(data, np.ndarray):
        hint = (
            " (a torch tensor: return tensor.numpy() in H x W x C; the dataset makes the CHW tensor)"
            if type(data).__module__.startswith("torch")
            else ""
        )
        raise ExtractorError(
            f"SmallChunk: data must be a numpy array (H x W x C or H x W), got "
            f"{type(data).__name__}{hint}"
        )
    return data


def _check_info(what: str, info: Any) -> None:
    if not isinstance(info, dict):
        raise ExtractorError(f"{what}: info must be a dict, got {type(info).__name__}")


@dataclass
class SmallChunk:
    """A sample cut out of a big chunk.

    ``data`` is an ``H x W x C`` uint8 array (it becomes the ``image`` tensor of a sample); every entry
    of ``info`` becomes an entry of the sample dict (the built-in collector stores level-0 ``x``/``y``
    and ``level``). ``bigchunk_info`` is the info of the big chunk it came from.
    """

    data: Any
    info: dict[str, Any]
    bigchunk_info: dict[str, Any]
    patient: Patient

    def __post_init__(self) -> None:
        _check_info("SmallChunk", self.info)
        clash = RESERVED_KEYS & self.info.keys()
        if clash:
            raise ExtractorError(
                f"SmallChunk: info keys {sorted(clash)} are reserved (the sample's image and patient "
                "id); store them under another name"
            )


@dataclass
class WindowRun:
    """Consecutive samples cut from one array at known places: what a front end that knows its
    windows in advance (the sliding windows of a block) hands the core, so that batched mode copies
    them into the batch in one loop and takes their metadata as columns, with no
    :class:`SmallChunk` or dict per sample. :meth:`small` gives sample ``k`` as the
    :class:`SmallChunk` it stands for (per-sample mode, and the batch's first sample).

    ``info`` holds, per key, either an array with one value per sample or one value for all
    (samples get Python scalars, as a collector would store them); ``labels``, when set, is a label
    raster of ``data``'s height x width, cut into each sample's ``"mask"``.
    """

    data: np.ndarray | TiledRegion  # H x W x C, or kept as its tiles (copy_to/crop cut samples)
    tops: np.ndarray  # [n] each sample's first row in data
    lefts: np.ndarray  # [n] and first column
    size: tuple[int, int]  # (width, height) of every sample
    info: dict[str, Any]
    bigchunk_info: dict[str, Any]
    patient: Patient
    labels: np.ndarray | None = None
    #: The consumer's position before the run's first sample (set by the front end).
    cursor: int = 0

    def __len__(self) -> int:
        return len(self.tops)

    def small(self, k: int, *, pixels: bool = True) -> SmallChunk:
        """Sample ``k`` as a :class:`SmallChunk`; with ``pixels=False`` its image need only have the
        right shape and dtype (for a tiled block, a read-only stand-in instead of a copy), for a caller
        that copies the pixels itself."""
        (width, height), top, left = self.size, int(self.tops[k]), int(self.lefts[k])
        info = {
            key: value[k].item() if isinstance(value, np.ndarray) else value
            for key, value in self.info.items()
        }
        if self.labels is not None:
            import torch

            info["mask"] = torch.from_numpy(self.labels[top : top + height, left : left + width].copy())
        if not pixels and isinstance(self.data, TiledRegion):
            image = np.broadcast_to(np.zeros((), self.data.dtype), (height, width, 3))
        elif isinstance(self.data, TiledRegion):
            image = self.data.crop(top, left, height, width)
        else:
            image = self.data[top : top + height, left : left + width]
        return SmallChunk(image, info, self.bigchunk_info, self.patient)

    def column(self, key: str, lo: int, hi: int) -> list[Any]:
        """Samples ``lo..hi``'s values of ``info[key]``, as :meth:`small` gives them."""
        value = self.info[key]
        return value[lo:hi].tolist() if isinstance(value, np.ndarray) else [value] * (hi - lo)


@dataclass
class ChunkContext:
    """What a loader or collector gets besides the patient.

    Attributes:
        rng: a generator seeded from (seed, epoch, rank, worker); draw all randomness from it.
        state: the per-patient state of this worker; it survives the patient's big chunks being
            retired and loaded again.
        part: ``(index, count)``: when a patient is shared by ``count`` workers (fewer patients than
            workers), this worker owns part ``index``; loaders restrict themselves to that part of the
            slide so workers never sample the same pixels. ``(0, 1)`` for a whole patient.
        slides: the worker's LRU of open slides.
        message: the last message the training loop sent about this patient, or None.
    """

    rng: np.random.Generator
    state: MutableMapping[str, Any]
    slides: SlideCache
    part: tuple[int, int] = (0, 1)
    board: MessageBoard | None = None
    patient_id: Any = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def message(self) -> Any:
        """The last message the training loop sent about this patient (None if none): read at each
        access, so a collector sees a new message at its next call."""
        return None if self.board is None else self.board.message(self.patient_id)

    def slide(self, patient: Patient, record_key: str = "wsi") -> SlideReader:
        """The open reader of ``patient``'s record ``record_key`` (the record's ``info["mpp"]``,
        if any, is the mpp of a file that records none)."""
        record = patient.record(record_key)
        return self.slides.get(record.path, mpp=record.info.get("mpp"))


class BigChunkLoader(abc.ABC):
    """Loads big chunks. Subclass it and implement :meth:`extract_bigchunk`."""

    @abc.abstractmethod
    def extract_bigchunk(self, patient: Patient, ctx: ChunkContext) -> BigChunk | None:
        """Load a big chunk of ``patient``, or return None when the patient has nothing to give."""

    def validate(self, patient: Patient, slides: SlideCache) -> None:  # noqa: B027 - optional hook
        """Check, at dataset construction, that ``patient`` can be loaded; raise if not."""

    @property
    def chunk_size(self) -> tuple[int, int] | None:
        """``(width, height)`` of the largest chunk this loader returns, when known."""
        return None


class SmallChunkCollector(abc.ABC):
    """Collects small chunks from a big chunk. Subclass it and implement :meth:`extract_smallchunk`."""

    @abc.abstractmethod
    def extract_smallchunk(
        self, call_count: int, bigchunk: BigChunk, ctx: ChunkContext
    ) -> SmallChunk | None:
        """The next sample of ``bigchunk``, or None meaning "this big chunk is used up".

        ``call_count`` counts the samples already taken from this big chunk (0 for the first call).
        """

    @property
    def patch_size(self) -> tuple[int, int] | None:
        """``(width, height)`` of the samples, when fixed."""
        return None
