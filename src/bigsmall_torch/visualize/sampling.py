"""Where the sampled patches came from (PyDmed's visualize).

:class:`SamplingRecorder` is an opt-in, cheap record of the samples a training loop received
(patient, level-0 position, level, size; no pixels), kept as small numpy arrays per patient.
:func:`render_sampling` draws one patient's record over the slide's thumbnail: patches filled
semi-transparent, big chunks outlined in another colour. Big chunks are drawn when the batches say
where they were (``chunk_x``/``chunk_y``, e.g. from :class:`ChunkInfoCollector`). With
``annotations=`` the regions a pathologist drew are outlined first, one colour per class, under the
patches: where the samples came from next to where the classes are.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._validate import renamed, size_pair
from ..chunks import BigChunk, ChunkContext, SmallChunk, SmallChunkCollector
from ..data import Dataset
from ..errors import ConfigError
from ..io.slide import Backend, SlideInfo, SlideReader
from ._draw import (
    AnnotationSource,
    _annotation_layers,
    _draw_outlines,
    safe_names,
    slide_thumbnail,
)

__all__ = [
    "ChunkInfoCollector",
    "SampledPatches",
    "SamplingRecorder",
    "render_sampling",
    "sampling_overlay",
]

logger = logging.getLogger(__name__)

_COLUMNS = ("x", "y", "width", "height", "level", "mpp", "chunk_x", "chunk_y", "chunk_width", "chunk_height")  # fmt: skip


def _column(batch: Mapping[str, Any], key: str, n: int, default: float = math.nan) -> np.ndarray:
    value = batch.get(key)
    if value is None:
        return np.full(n, default)
    array = np.atleast_1d(
        value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
    )
    if array.shape != (n,):
        raise ConfigError(
            f"SamplingRecorder.update: batch[{key!r}] has shape {array.shape}, expected ({n},)"
        )
    return array.astype(np.float64)


@dataclass(frozen=True)
class SampledPatches:
    """The recorded samples of one patient (one entry per sample, in the order received).

    ``x``/``y`` are level-0 top-lefts; ``width``/``height`` (and the big chunks' ``chunk_width``/
    ``chunk_height``) are pixels of the sample's resolution, turned into level-0 pixels by
    :meth:`boxes` from the sample's ``mpp`` (or, without one, its ``level``). Unknown values are NaN.
    """

    x: np.ndarray
    y: np.ndarray
    width: np.ndarray
    height: np.ndarray
    level: np.ndarray
    mpp: np.ndarray
    chunk_x: np.ndarray = field(repr=False)
    chunk_y: np.ndarray = field(repr=False)
    chunk_width: np.ndarray = field(repr=False)
    chunk_height: np.ndarray = field(repr=False)

    def __len__(self) -> int:
        return len(self.x)

    def scale(self, info: SlideInfo) -> np.ndarray:
        """Level-0 pixels per sample pixel, per sample."""
        by_level = np.asarray(info.level_downsamples)[
            self.level.clip(0, info.level_count - 1).astype(np.int64)
        ]
        by_mpp = self.mpp / info.mpp if info.mpp else np.full(len(self), math.nan)
        return np.where(np.isfinite(by_mpp), by_mpp, by_level)

    def boxes(self, info: SlideInfo) -> np.ndarray:
        """``(n, 4)`` level-0 ``(x, y, width, height)`` of the patches."""
        s = self.scale(info)
        return np.stack([self.x, self.y, self.width * s, self.height * s], axis=1)

    def chunk_boxes(self, info: SlideInfo) -> np.ndarray:
        """``(m, 4)`` level-0 ``(x, y, width, height)`` of the distinct big chunks whose place is known."""
        s = self.scale(info)
        boxes = np.stack(
            [self.chunk_x, self.chunk_y, self.chunk_width * s, self.chunk_height * s], axis=1
        )
        boxes = boxes[np.isfinite(boxes).all(axis=1)]
        return np.unique(boxes, axis=0) if len(boxes) else boxes.reshape(0, 4)


class SamplingRecorder:
    """Records where the samples of a training loop came from: ``recorder.update(batch)`` per batch.

    Args:
        bigchunk_size: ``(width, height)`` (or an int) of the big chunks, in pixels of the samples'
            resolution, for batches that carry ``chunk_x``/``chunk_y`` but not ``chunk_width``/``chunk_height``.

    Works with per-sample batches (collated by the DataLoader), batched-mode batches and single
    samples; keeps no pixels, only ten numbers per sample.
    """

    def __init__(self, *, bigchunk_size: int | tuple[int, int] | None = None) -> None:
        self.bigchunk_size = (
            None
            if bigchunk_size is None
            else size_pair("SamplingRecorder: bigchunk_size", bigchunk_size)
        )
        self._parts: dict[Any, list[np.ndarray]] = {}
        self._cache: dict[Any, SampledPatches] = {}

    def update(
        self,
        batch: Mapping[str, Any],
        *,
        patch_size: int | tuple[int, int] | None = None,
        size: int | tuple[int, int] | None = None,
    ) -> None:
        """Record the samples of ``batch`` (``patient_id``, level-0 ``x``/``y``, ``level``, ``mpp``,
        ``image`` or ``patch_size``: the patch's ``(width, height)`` in pixels of its resolution, for
        when a transform changed the image's shape; ``size=`` is its deprecated former name)."""
        if size is not None:
            size = renamed("SamplingRecorder.update", "patch_size", patch_size, "size", size)
        else:
            size = patch_size
        absent = [k for k in ("patient_id", "x", "y") if k not in batch]
        if absent or (size is None and "image" not in batch):
            raise ConfigError(
                f"SamplingRecorder.update: batch lacks {absent or ['image']} (keys: {sorted(batch)})"
            )
        ids = batch["patient_id"]
        ids = ids.tolist() if isinstance(ids, (torch.Tensor, np.ndarray)) else ids
        ids = list(ids) if isinstance(ids, (list, tuple)) else [ids]
        n = len(ids)
        if size is not None:
            pw, ph = size_pair("SamplingRecorder.update: patch_size", size)
            wh = np.tile([float(pw), float(ph)], (n, 1))
        else:
            image = batch["image"]
            shapes = (
                [t.shape[-2:] for t in image]
                if isinstance(image, (list, tuple))
                else ([image.shape[-2:]] * (image.shape[0] if image.ndim == 4 else 1))
            )
            wh = np.array([(s[1], s[0]) for s in shapes], dtype=np.float64).reshape(-1, 2)
        chunk_w, chunk_h = self.bigchunk_size or (math.nan, math.nan)
        if len(wh) != n:
            raise ConfigError(f"SamplingRecorder.update: {len(wh)} images for {n} patient ids")
        given = {"width": wh[:, 0], "height": wh[:, 1]}
        defaults = {"level": 0.0, "chunk_width": chunk_w, "chunk_height": chunk_h}
        columns = [
            given[k] if k in given else _column(batch, k, n, defaults.get(k, math.nan))
            for k in _COLUMNS
        ]
        table = np.stack(columns, axis=1)
        for pid in dict.fromkeys(ids):
            self._parts.setdefault(pid, []).append(
                table[[i for i, p in enumerate(ids) if p == pid]]
            )
            self._cache.pop(pid, None)

    @property
    def patients(self) -> list[Any]:
        """Patient ids recorded, in the order first seen."""
        return list(self._parts)

    def counts(self) -> dict[Any, int]:
        """Samples recorded per patient."""
        return {pid: sum(len(p) for p in parts) for pid, parts in self._parts.items()}

    def __len__(self) -> int:
        return sum(self.counts().values())

    def records(self, patient_id: Any) -> SampledPatches:
        """The samples recorded for ``patient_id``."""
        if patient_id not in self._parts:
            raise ConfigError(
                f"SamplingRecorder: nothing recorded for patient {patient_id!r}; recorded: {self.patients[:5]}"
            )
        if patient_id not in self._cache:
            table = np.concatenate(self._parts[patient_id])
            cols = dict(zip(_COLUMNS, table.T, strict=True))
            ints = {k: cols[k].astype(np.int64) for k in ("x", "y", "level")}
            self._cache[patient_id] = SampledPatches(**{**cols, **ints})
        return self._cache[patient_id]

    def render_all(
        self,
        dataset: Dataset | Any,
        out_dir: str | os.PathLike[str],
        *,
        record_key: str | None = None,
        annotation_key: str | None = None,
        **options: Any,
    ) -> dict[Any, Path]:
        """One PNG per recorded patient (``<out_dir>/<safe id>.png``, see :func:`render_sampling`).

        ``dataset`` is a :class:`~bigsmall_torch.Dataset` or a dataset wrapping one (``.dataset``);
        ``record_key`` defaults to its loader's, else ``"wsi"``. ``annotation_key``: the record key
        of each patient's annotation file (as the loaders' ``annotations=``), outlined under the
        patches (``classes=``, ``annotation_colors=`` and ``annotation_width=`` go to
        :func:`sampling_overlay`).
        """
        data = dataset if isinstance(dataset, Dataset) else getattr(dataset, "dataset", None)
        if not isinstance(data, Dataset):
            raise ConfigError(
                f"render_all: dataset must be a Dataset or wrap one, got {type(dataset).__name__}"
            )
        loader = getattr(dataset, "loader", None)
        key = str(
            record_key
            or getattr(loader, "record_key", None)
            or getattr(dataset, "record_key", None)
            or "wsi"
        )
        patients = {p.id: p for p in data.patients}
        unknown = [pid for pid in self._parts if pid not in patients]
        if unknown:
            raise ConfigError(
                f"render_all: recorded patients {unknown[:5]} are not in dataset {data.name!r}"
            )
        if annotation_key is not None:
            if not isinstance(annotation_key, str):
                raise ConfigError(
                    f"render_all: annotation_key must be a record key (str), got {annotation_key!r}"
                )
            if options.get("annotations") is not None:
                raise ConfigError("render_all: give annotation_key= or annotations=, not both")
        elif options.get("annotations") is not None and len(self._parts) > 1:
            raise ConfigError(
                f"render_all: annotations= would outline the same regions on all {len(self._parts)} "
                "slides; give annotation_key= (the record key of each patient's annotation file)"
            )
        for pid in self.patients:  # a missing record fails before any picture is written
            patients[pid].record(key)
            if annotation_key is not None:
                patients[pid].record(annotation_key)
        folder = Path(out_dir)
        folder.mkdir(parents=True, exist_ok=True)
        names = safe_names(self.patients)
        paths = {}
        for pid in self.patients:
            if annotation_key is not None:
                options["annotations"] = patients[pid].record(annotation_key)
            paths[pid] = render_sampling(
                patients[pid].record(key).path,
                self.records(pid),
                folder / f"{names[pid]}.png",
                **options,
            )
        return paths

    def __repr__(self) -> str:
        return f"SamplingRecorder(patients={len(self._parts)}, samples={len(self)})"


def _rectangles(
    boxes: np.ndarray, scale: tuple[float, float], shape: tuple[int, ...]
) -> np.ndarray:
    """Level-0 boxes as inclusive thumbnail pixel rectangles ``(x0, y0, x1, y1)``, clipped, >= 1 pixel."""
    sx, sy = scale
    x0, y0 = np.floor(boxes[:, 0] * sx), np.floor(boxes[:, 1] * sy)
    x1 = np.maximum(np.ceil((boxes[:, 0] + boxes[:, 2]) * sx) - 1, x0)
    y1 = np.maximum(np.ceil((boxes[:, 1] + boxes[:, 3]) * sy) - 1, y0)
    rects = np.stack([x0, y0, x1, y1], axis=1).astype(np.int64)
    return rects.clip(0, [shape[1] - 1, shape[0] - 1] * 2)


def sampling_overlay(
    thumbnail: np.ndarray,
    info: SlideInfo,
    records: SampledPatches,
    *,
    color: tuple[int, int, int] = (20, 90, 255),
    chunk_color: tuple[int, int, int] = (255, 140, 0),
    alpha: float = 0.4,
    outline: bool = True,
    chunks: bool = True,
    annotations: AnnotationSource | None = None,
    classes: Sequence[str] | None = None,
    annotation_colors: Mapping[str, tuple[int, int, int]] | None = None,
    annotation_width: int = 2,
) -> np.ndarray:
    """``thumbnail`` with the patches filled (``alpha``, outlined a shade darker) and the big chunks outlined.

    Args:
        annotations: regions to outline under the patches: :class:`~bigsmall_torch.Annotations`,
            :class:`~bigsmall_torch.ClassRegions`, an annotation :class:`~bigsmall_torch.Record`
            or the path of an annotation file (read with :func:`~bigsmall_torch.read_annotations`;
            a label mask's ``downsample`` defaults to the slide's size over the mask's). The
            exterior and hole rings of each class's polygons are drawn in its colour.
        classes: the classes to outline (default: all of them).
        annotation_colors: ``{class: (r, g, b)}``; classes not in it take a fixed palette, in the
            order of the annotations' classes.
        annotation_width: the outlines' width in picture pixels.
    """
    from PIL import Image, ImageDraw

    if not 0 <= alpha <= 1:
        raise ConfigError(f"sampling_overlay: alpha must be in [0, 1], got {alpha!r}")
    if annotations is None and (classes is not None or annotation_colors is not None):
        raise ConfigError(
            "sampling_overlay: classes= and annotation_colors= need annotations= (got annotations=None)"
        )
    if (
        isinstance(annotation_width, bool)
        or not isinstance(annotation_width, (int, np.integer))
        or annotation_width < 1
    ):
        raise ConfigError(
            f"sampling_overlay: annotation_width must be an int >= 1 (pixels), got {annotation_width!r}"
        )
    width0, height0 = info.dimensions
    scale = (thumbnail.shape[1] / width0, thumbnail.shape[0] / height0)
    if annotations is not None:
        layers = _annotation_layers(
            annotations,
            info.dimensions,
            classes=classes,
            colors=annotation_colors,
            where="sampling_overlay",
        )
        thumbnail = _draw_outlines(thumbnail, layers, scale, width=int(annotation_width))
    rects = _rectangles(records.boxes(info), scale, thumbnail.shape)
    filled = np.zeros(thumbnail.shape[:2], dtype=bool)
    for x0, y0, x1, y1 in rects:
        filled[y0 : y1 + 1, x0 : x1 + 1] = True
    out = thumbnail.astype(np.float32)
    out[filled] = (1 - alpha) * out[filled] + alpha * np.asarray(color, dtype=np.float32)
    image = Image.fromarray(out.round().astype(np.uint8))
    draw = ImageDraw.Draw(image)
    if outline:
        dark = tuple(int(c * 0.6) for c in color)
        for rect in rects.tolist():
            draw.rectangle(rect, outline=dark)
    if chunks and (np.isfinite(records.chunk_x) & np.isnan(records.chunk_width)).any():
        logger.warning(
            "some big chunks are not drawn: their samples carry chunk_x/chunk_y but no "
            "chunk_width/chunk_height; pass SamplingRecorder(bigchunk_size=...)"
        )
    if chunks:
        for rect in _rectangles(records.chunk_boxes(info), scale, thumbnail.shape).tolist():
            draw.rectangle(rect, outline=chunk_color, width=2)
    return np.asarray(image)


def render_sampling(
    slide: SlideReader | str | os.PathLike[str],
    records: SampledPatches,
    out_png: str | os.PathLike[str],
    *,
    thumbnail_size: int = 1024,
    backend: str | Backend = "auto",
    annotations: AnnotationSource | None = None,
    classes: Sequence[str] | None = None,
    annotation_colors: Mapping[str, tuple[int, int, int]] | None = None,
    **options: Any,
) -> Path:
    """Write a PNG of the slide's thumbnail with ``records`` drawn on it (see :func:`sampling_overlay`),
    over the outlines of ``annotations`` (the ``classes`` asked, in ``annotation_colors``) when given."""
    from PIL import Image

    if not isinstance(records, SampledPatches):
        raise ConfigError(
            f"render_sampling: records must be SampledPatches (recorder.records(id)), got {type(records).__name__}"
        )
    thumbnail, info = slide_thumbnail(slide, size=thumbnail_size, backend=backend)
    path = Path(out_png)
    picture = sampling_overlay(
        thumbnail, info, records, annotations=annotations, classes=classes,
        annotation_colors=annotation_colors, **options,
    )  # fmt: skip
    Image.fromarray(picture).save(path)
    logger.debug("wrote %s (%d patches)", path, len(records))
    return path


class ChunkInfoCollector(SmallChunkCollector):
    """Wraps a collector so that its samples also say where their big chunk was.

    Adds ``chunk_x``/``chunk_y`` (level-0 top-left) and ``chunk_width``/``chunk_height`` (pixels of
    the chunk's resolution) from the big chunk's ``info`` (``x``, ``y``, ``width``, ``height``; the
    data's shape when absent), for :class:`SamplingRecorder` to draw the big chunks.
    """

    def __init__(self, collector: SmallChunkCollector) -> None:
        if not isinstance(collector, SmallChunkCollector):
            raise ConfigError(
                f"ChunkInfoCollector: collector must be a SmallChunkCollector, got {type(collector).__name__}"
            )
        self.collector = collector

    @property
    def patch_size(self) -> tuple[int, int] | None:
        return self.collector.patch_size

    @property
    def needs_labels(self) -> bool:
        """The wrapped collector's (so the dataset's construction check sees it)."""
        return bool(getattr(self.collector, "needs_labels", False))

    def extract_smallchunk(
        self, call_count: int, bigchunk: BigChunk, ctx: ChunkContext
    ) -> SmallChunk | None:
        small = self.collector.extract_smallchunk(call_count, bigchunk, ctx)
        if small is None:
            return None
        info, (height, width) = bigchunk.info, np.shape(bigchunk.data)[:2]
        small.info = {
            **small.info,
            "chunk_x": info.get("x", 0),
            "chunk_y": info.get("y", 0),
            "chunk_width": info.get("width", width),
            "chunk_height": info.get("height", height),
        }
        return small

    def __repr__(self) -> str:
        return f"ChunkInfoCollector({self.collector!r})"
