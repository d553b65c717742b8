"""Whole-cohort feature extraction: every window of every slide through an encoder, one bag per slide.

:func:`extract_features` reads each slide block by block (:class:`~bigsmall_torch.SlidingWindowDataset`
in batched mode, DataLoader workers), moves each batch to the device (pinned memory, non-blocking),
applies ``preprocess`` there, runs the model under ``torch.inference_mode()`` (and bf16 autocast on
a GPU), copies the features back asynchronously, and hands them to one writer thread per rank, so
reading, the model and writing overlap. Each slide becomes ``<out_dir>/<patient_id>.h5``:

- ``features``: ``[N, D]`` float16 (``dtype="float32"`` for full precision), one row per window;
- ``coords``: ``[N, 2]`` int64, the level-0 ``x, y`` of each window's top-left, row by row;
- ``grid``: ``[N, 2]`` int64, each window's ``row, col`` in the slide's grid;
- attributes: ``patch_size``, ``stride``, ``level``, ``downsample``, ``mpp``, ``tissue_only``,
  ``model``, ``bigsmall_torch_version``, ``patient_id``, ``slide``, ``windows``.

A file is written under a temporary name and renamed when complete, so a file named ``<id>.h5``
is always whole: a re-run skips it (``overwrite=False``) and redoes the rest. Under ``torchrun``
(an initialised process group) the slides are dealt to ranks by window count before any is read,
so each is written by exactly one rank and ranks finish together; ranks meet only at the end, where
rank 0 writes ``summary.csv`` (``id, windows, seconds, status, rank``). Bags are read back with
:class:`~bigsmall_torch.FeatureBagDataset`.
"""

from __future__ import annotations

import csv
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from ._engine.reservoir import OnError
from ._engine.sharding import distributed_rank_and_world
from ._validate import choice, positive_int, size_pair
from ._version import __version__
from .data import Dataset, Patient
from .errors import ConfigError, DatasetError, MissingDependencyError, SlideError
from .inference.sliding import Edge, SlidingWindowDataset, _positions
from .io.resolution import DEFAULT_TOLERANCE, Resolution, extent
from .io.slide import SlideCache
from .io.tissue import TissueDetector

__all__ = [
    "ExtractionSummary",
    "FeatureDtype",
    "SlideExtraction",
    "TimmPreprocess",
    "deal_by_size",
    "extract_features",
    "feature_path",
    "timm_encoder",
]

logger = logging.getLogger(__name__)

SUMMARY = "summary.csv"
_PARTIAL = ".partial"


class FeatureDtype(str, Enum):
    """How features are stored."""

    FLOAT16 = "float16"
    FLOAT32 = "float32"


def _h5py() -> Any:
    try:
        import h5py
    except ImportError as exc:
        raise MissingDependencyError(
            "feature bags need h5py: pip install 'bigsmall-torch[features]'"
        ) from exc
    return h5py


def feature_path(out_dir: str | os.PathLike[str], patient_id: Any) -> Path:
    """Where the bag of ``patient_id`` lives: ``<out_dir>/<patient_id>.h5``. Ids are file names, not
    paths: a path separator in an id (e.g. from ``from_folder(recursive=True)``) becomes ``__``."""
    name = str(patient_id).replace(os.sep, "__")
    if os.altsep:
        name = name.replace(os.altsep, "__")
    return Path(out_dir) / f"{name}.h5"


def is_complete(path: Path) -> bool:
    """Whether ``path`` is a finished bag (it exists under its final name and opens with
    ``features`` and ``coords`` of matching lengths)."""
    if not path.is_file():
        return False
    h5py = _h5py()
    try:
        with h5py.File(path, "r") as f:
            return bool(f["features"].shape[0] == f["coords"].shape[0] == int(f.attrs["windows"]))
    except (OSError, KeyError, ValueError):
        return False


@dataclass
class SlideExtraction:
    """What happened to one slide: ``status`` is ``"written"``, ``"exists"`` (a finished file was
    kept), or ``"failed: <reason>"``."""

    patient_id: Any
    windows: int
    seconds: float
    status: str
    rank: int = 0
    path: Path | None = None


@dataclass
class ExtractionSummary:
    """The slides of one :func:`extract_features` call (all ranks' on rank 0, the rank's own
    elsewhere), and where the summary was written."""

    slides: list[SlideExtraction] = field(default_factory=list)
    csv: Path | None = None

    @property
    def failed(self) -> list[SlideExtraction]:
        return [s for s in self.slides if s.status.startswith("failed")]

    def __str__(self) -> str:
        counts: dict[str, int] = {}
        for s in self.slides:
            key = s.status.split(":")[0]
            counts[key] = counts.get(key, 0) + 1
        windows = sum(s.windows for s in self.slides if s.status == "written")
        return f"{len(self.slides)} slides ({', '.join(f'{v} {k}' for k, v in counts.items())}), {windows} windows written"


# -- dealing slides to ranks ------------------------------------------------------------------------


def deal_by_size(sizes: Sequence[int], world_size: int) -> list[int]:
    """The rank of each slide: largest first, each to the rank with the least work so far (ties to
    the lower rank), so ranks finish together. Pure and deterministic: every rank computes the same."""
    load = [0] * world_size
    owner = [0] * len(sizes)
    for index in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        rank = min(range(world_size), key=lambda r: (load[r], r))
        owner[index] = rank
        load[rank] += max(int(sizes[index]), 1)
    return owner


def _window_count(
    patient: Patient, slides: SlideCache, record_key: str, resolution: Resolution,
    patch: tuple[int, int], stride: tuple[int, int],
) -> int:  # fmt: skip
    """Windows of the slide's full grid (headers only; 0 when it cannot be opened: the rank that
    gets it reports the error)."""
    record = patient.record(record_key)
    try:
        info = slides.get(record.path, mpp=record.info.get("mpp")).info
        width, height = extent(info, resolution.choose(info))
    except SlideError:
        return 0
    cols = len(_positions(width, patch[0], stride[0], Edge.DROP))
    rows = len(_positions(height, patch[1], stride[1], Edge.DROP))
    return rows * cols


# -- the pipeline -----------------------------------------------------------------------------------


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class _Writer:
    """The rank's writer thread: collects each slide's rows and writes its file once complete."""

    def __init__(self, out_dir: Path, ds: SlidingWindowDataset, attrs: dict[str, Any], dtype: FeatureDtype, rank: int) -> None:
        self.out_dir, self.ds, self.attrs, self.dtype, self.rank = out_dir, ds, attrs, dtype, rank
        self.expected = {g.patient_id: g.count for g in ds.grids}
        self.grids = {g.patient_id: g for g in ds.grids}
        self.parts: dict[Any, list[tuple[np.ndarray, np.ndarray]]] = {}
        self.received: dict[Any, int] = {}
        self.started: dict[Any, float] = {}
        self.results: dict[Any, SlideExtraction] = {}
        self.queue: queue.Queue[Any] = queue.Queue(maxsize=8)
        self.free: queue.Queue[torch.Tensor] = queue.Queue()  # pinned buffers the writer is done with
        self.error: BaseException | None = None
        self.width: int | None = None  # D, once a batch arrived
        self.thread = threading.Thread(target=self._run, name="bigsmall-feature-writer", daemon=True)
        self.thread.start()

    def pinned(self, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        """A pinned host buffer for one batch's features: one the writer has finished with, else a
        new one (at most as many as batches in flight; pinning memory is slow, so they are reused)."""
        try:
            while True:
                buffer = self.free.get_nowait()
                if buffer.shape == shape and buffer.dtype == dtype:
                    return buffer
        except queue.Empty:
            return torch.empty(shape, dtype=dtype, pin_memory=True)

    def put(self, item: Any) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put(item)

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error
        # Slides without a window (no tissue): an empty bag, as wide as the others when known.
        width = self.width or 0
        for pid, count in self.expected.items():
            if count == 0:
                self.started[pid] = time.perf_counter()
                self.parts[pid] = [(np.zeros((0, 2), np.int64), np.zeros((0, width), np.float32))]
                self._write(pid)

    def _run(self) -> None:
        try:
            while (item := self.queue.get()) is not None:
                self._take(*item)
        except BaseException as exc:  # handed to the main thread at its next put() or close()
            self.error = exc
            while self.queue.get() is not None:  # drain, so the producer never blocks
                pass

    def _take(self, features: torch.Tensor, event: Any, ids: Sequence[Any], rows: np.ndarray, cols: np.ndarray) -> None:
        if event is not None:
            event.synchronize()  # the copy back from the device has landed
        values = features.numpy()
        self.width = values.shape[1]
        ids = list(ids)
        start = 0
        while start < len(ids):  # runs of one patient (a batch may span the end of one slide)
            pid = ids[start]
            stop = start
            while stop < len(ids) and ids[stop] == pid:
                stop += 1
            self.started.setdefault(pid, time.perf_counter())
            cells = np.stack([rows[start:stop], cols[start:stop]], axis=1)
            self.parts.setdefault(pid, []).append((cells, values[start:stop].copy()))
            self.received[pid] = self.received.get(pid, 0) + stop - start
            if self.received[pid] == self.expected[pid]:
                self._write(pid)
            start = stop
        if event is not None:  # its rows are copied: the pinned buffer can take another batch
            self.free.put(features)

    def _write(self, pid: Any) -> None:
        h5py = _h5py()
        grid = self.grids[pid]
        cells = np.concatenate([c for c, _ in self.parts[pid]])
        values = np.concatenate([v for _, v in self.parts.pop(pid)])
        order = np.lexsort((cells[:, 1], cells[:, 0]))  # row by row
        cells, values = cells[order], values[order]
        cells = cells.reshape(-1, 2).astype(np.int64, copy=False)
        coords = np.stack([grid.xs0[cells[:, 1]], grid.ys0[cells[:, 0]]], axis=1)  # as grid.level0
        path = feature_path(self.out_dir, pid)
        partial = path.with_name(path.name + _PARTIAL)
        with h5py.File(partial, "w") as f:
            f.create_dataset("features", data=values.astype(self.dtype.value, copy=False))
            f.create_dataset("coords", data=coords)
            f.create_dataset("grid", data=cells.astype(np.int64))
            for key, value in self.attrs.items():
                f.attrs[key] = value
            f.attrs["patient_id"] = str(pid)
            f.attrs["slide"] = grid.path
            f.attrs["level"] = grid.choice.level
            f.attrs["downsample"] = grid.choice.downsample
            f.attrs["mpp"] = grid.choice.mpp
            f.attrs["windows"] = len(cells)
        os.replace(partial, path)
        seconds = time.perf_counter() - self.started.pop(pid)
        self.results[pid] = SlideExtraction(pid, len(cells), seconds, "written", self.rank, path)
        logger.info("wrote %s (%d windows, %.1f s)", path, len(cells), seconds)


def _apply(model: Callable[[Any], Any], preprocess: Callable[[Any], Any] | None, images: torch.Tensor,
           autocast: torch.dtype | None) -> torch.Tensor:  # fmt: skip
    x = images if preprocess is None else preprocess(images)
    if autocast is not None:
        with torch.autocast(images.device.type, dtype=autocast):
            out = model(x)
    else:
        out = model(x)
    if not isinstance(out, torch.Tensor):
        raise ConfigError(f"extract_features: the model must return a tensor [n, D], got {type(out).__name__}")
    return out.reshape(out.shape[0], -1)


def extract_features(
    dataset: Dataset,
    model: torch.nn.Module | Callable[[Any], Any] | str,
    out_dir: str | os.PathLike[str],
    *,
    patch_size: int | tuple[int, int] = 224,
    level: int | None = None,
    mpp: float | None = None,
    magnification: float | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    stride: int | tuple[int, int] | None = None,
    tissue_only: bool = True,
    min_tissue: float = 0.5,
    tissue_detector: TissueDetector | None = None,
    batch_size: int = 64,
    num_workers: int | None = None,
    device: str | torch.device | None = None,
    preprocess: Callable[[torch.Tensor], torch.Tensor] | None = None,
    dtype: str | FeatureDtype = "float16",
    autocast: bool | None = None,
    on_error: str | OnError = "raise",
    overwrite: bool = False,
    record_key: str = "wsi",
    block_size: int = 2048,
    decode_threads: int | None = None,
    pretrained: bool = True,
    model_name: str | None = None,
    progress: bool = True,
    rank: int | None = None,
    world_size: int | None = None,
    memory_format: torch.memory_format = torch.channels_last,
) -> ExtractionSummary:
    """Run ``model`` over every window of every slide of ``dataset``; one HDF5 bag per slide (see
    the module docstring for the layout).

    Args:
        dataset: the slides (record ``record_key`` of each patient).
        model: a ``torch.nn.Module`` (or any callable) called as ``model(preprocess(images))``
            where ``images`` is the uint8 ``[n, 3, H, W]`` batch already on ``device``, returning
            ``[n, D]`` (or ``[n, ...]``, flattened); or a timm model name (``"resnet18"``,
            ``"hf-hub:..."``; the ``[features]`` extra), built with ``num_classes=0`` and, when
            ``preprocess`` is None, its own resize and normalisation (:func:`timm_encoder`).
        out_dir: where ``<patient_id>.h5`` and ``summary.csv`` go (created).
        patch_size, stride, level, mpp, magnification, tolerance: the grid, as in
            :class:`~bigsmall_torch.SlidingWindowDataset` (``edge="drop"``: windows inside the slide).
        tissue_only, min_tissue, tissue_detector: only windows on tissue (default); with
            ``tissue_only=False`` every window of the grid gets a row.
        batch_size, num_workers, block_size, decode_threads: reading (``num_workers`` default:
            up to 4, fewer on smaller machines; ``decode_threads`` default: the cores per worker,
            1 or 2, so that workers do not oversubscribe the cores).
        device: where the model runs (default: CUDA when available, else the CPU).
        preprocess: applied on the device to each uint8 batch before the model (None: unchanged).
        dtype: ``"float16"`` (default) or ``"float32"``: how features are stored.
        autocast: run the model under bf16 autocast (default: on a GPU, not on the CPU).
        on_error: ``"raise"`` or ``"skip"``: a slide that cannot be opened or read raises, or is
            left out (no file) and listed as ``failed`` in the summary.
        overwrite: redo slides whose file exists (default: keep finished files).
        pretrained: with a timm name, load its pretrained weights (needs network access once).
        model_name: stored in each file's ``model`` attribute (default: the timm name or the model's
            class name).
        progress: tqdm bars: one per slide and one overall (windows/s).
        rank, world_size: the distributed position (default: ``torch.distributed`` when
            initialised, else 0 and 1).
        memory_format: of the image batches: ``torch.channels_last`` (default: the windows are
            copied as the decoder writes them, and convolutional networks run faster so on a
            GPU) or ``torch.contiguous_format`` (for a model that calls ``view`` on its input).

    Returns:
        An :class:`ExtractionSummary`; also written as ``<out_dir>/summary.csv`` (rank 0 gathers
        every rank's rows at the end; without a process group each rank writes its own rows).
    """
    if not isinstance(dataset, Dataset) or len(dataset) == 0:
        raise ConfigError(f"extract_features: dataset must be a non-empty bigsmall_torch.Dataset, got {dataset!r}")
    patch = size_pair("extract_features: patch_size", patch_size)
    steps = patch if stride is None else size_pair("extract_features: stride", stride)
    resolution = Resolution.from_args("extract_features", level=level, mpp=mpp, magnification=magnification,
                                      tolerance=tolerance)  # fmt: skip
    batch_size = positive_int("batch_size", batch_size)
    storage = choice("dtype", dtype, FeatureDtype)
    policy = choice("on_error", on_error, OnError)
    if num_workers is None:
        num_workers = min(4, max(0, (os.cpu_count() or 1) - 1))
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise ConfigError(f"extract_features: num_workers must be an int >= 0, got {num_workers!r}")
    if decode_threads is None:
        decode_threads = min(2, max(1, (os.cpu_count() or 1) // max(1, num_workers)))
    where = _default_device() if device is None else torch.device(device)
    if isinstance(model, str):
        name = model
        model, own = timm_encoder(name, pretrained=pretrained)
        preprocess = own if preprocess is None else preprocess
        model_name = model_name or name
    if not callable(model):
        raise ConfigError(f"extract_features: model must be a torch.nn.Module, a callable or a timm name, got {model!r}")
    if memory_format not in (torch.channels_last, torch.contiguous_format):
        raise ConfigError(
            "extract_features: memory_format must be torch.channels_last or torch.contiguous_format, "
            f"got {memory_format!r}"
        )
    if preprocess is not None and not callable(preprocess):
        raise ConfigError(f"extract_features: preprocess must be callable or None, got {preprocess!r}")
    model_name = model_name or type(model).__name__
    if isinstance(model, torch.nn.Module):
        model = model.to(where).eval()
    if isinstance(preprocess, torch.nn.Module):
        preprocess = preprocess.to(where)
    use_autocast = where.type == "cuda" if autocast is None else bool(autocast)
    amp = torch.bfloat16 if use_autocast else None
    _h5py()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rank, world_size = distributed_rank_and_world(rank, world_size)

    # Deal every slide (finished ones too: every rank must compute the same deal) by window count.
    probe = SlideCache(16, decode_threads=1)
    try:
        sizes = [_window_count(p, probe, record_key, resolution, patch, steps) for p in dataset.patients]
    finally:
        probe.close()
    owners = deal_by_size(sizes, world_size)
    mine = [p for p, r in zip(dataset.patients, owners, strict=True) if r == rank]
    results: dict[Any, SlideExtraction] = {}
    todo = []
    for patient in mine:
        path = feature_path(out, patient.id)
        if not overwrite and is_complete(path):
            results[patient.id] = SlideExtraction(patient.id, _stored_windows(path), 0.0, "exists", rank, path)
        else:
            todo.append(patient)
    attrs = {
        "patch_size": list(patch), "stride": list(steps), "tissue_only": bool(tissue_only),
        "min_tissue": float(min_tissue), "model": model_name, "bigsmall_torch_version": __version__,
        "dtype": storage.value,
    }  # fmt: skip
    if todo:
        _run(Dataset(dataset.name, todo), model, preprocess, out, results, attrs, storage, amp, where,
             patch=patch, steps=steps, resolution=resolution, tissue_only=tissue_only, min_tissue=min_tissue,
             tissue_detector=tissue_detector, batch_size=batch_size, num_workers=num_workers,
             on_error=policy, record_key=record_key, block_size=block_size, decode_threads=decode_threads,
             progress=progress, rank=rank, memory_format=memory_format)  # fmt: skip
    rows = [results[p.id] for p in mine]
    return _summarise(out, rows, rank, world_size)


def _stored_windows(path: Path) -> int:
    with _h5py().File(path, "r") as f:
        return int(f.attrs["windows"])


def _run(
    todo: Dataset, model: Callable[[Any], Any], preprocess: Callable[[Any], Any] | None, out: Path,
    results: dict[Any, SlideExtraction], attrs: dict[str, Any], storage: FeatureDtype,
    amp: torch.dtype | None, device: torch.device, *, patch: tuple[int, int], steps: tuple[int, int],
    resolution: Resolution, tissue_only: bool, min_tissue: float, tissue_detector: TissueDetector | None,
    batch_size: int, num_workers: int, on_error: OnError, record_key: str, block_size: int,
    decode_threads: int, progress: bool, rank: int, memory_format: torch.memory_format,
) -> None:  # fmt: skip
    """Extract the slides of ``todo`` on this rank, filling ``results``."""
    level = resolution.level if resolution.mpp is None and resolution.magnification is None else None
    try:
        ds = SlidingWindowDataset(
            todo, patch, steps, level=level, mpp=resolution.mpp, magnification=resolution.magnification,
            tolerance=resolution.tolerance, tissue_only=tissue_only, min_tissue=min_tissue,
            tissue_detector=tissue_detector, record_key=record_key, block_size=block_size,
            batch_size=batch_size, on_error=on_error, decode_threads=decode_threads, rank=0, world_size=1,
            memory_format=memory_format,
        )  # fmt: skip
    except DatasetError as exc:  # on_error="skip" and none of this rank's slides can be used
        errors = getattr(exc, "errors", None)
        if errors is None:
            raise
        for pid, error in errors.items():
            results[pid] = SlideExtraction(pid, 0, 0.0, f"failed: {error}", rank)
        return
    for pid, reason in ds.skipped.items():
        results[pid] = SlideExtraction(pid, 0, 0.0, f"failed: {reason}", rank)
    writer = _Writer(out, ds, attrs, storage, rank)
    cuda = device.type == "cuda"
    loader = DataLoader(ds, batch_size=None, num_workers=num_workers, pin_memory=cuda,
                        prefetch_factor=4 if num_workers else None, persistent_workers=False)  # fmt: skip
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=ds.total_windows, desc=f"features (rank {rank})", unit="window")
    try:
        with torch.inference_mode():
            for batch in loader:
                images = batch["image"].to(device, non_blocking=True)
                features = _apply(model, preprocess, images, amp).to(getattr(torch, storage.value))
                if cuda:
                    host = writer.pinned(features.shape, features.dtype)
                    host.copy_(features, non_blocking=True)
                    event = torch.cuda.Event()
                    event.record()
                else:
                    host, event = features.detach().clone(), None
                ids = batch["patient_id"]  # a list of str ids, or a tensor of int ids
                ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
                writer.put((host, event, ids, batch["row"].numpy(), batch["col"].numpy()))
                if bar is not None:
                    bar.update(len(images))
    finally:
        if bar is not None:
            bar.close()
        writer.close()
    results.update(writer.results)
    for grid in ds.grids:  # windows lost to unreadable tiles (on_error="skip"): no file
        if grid.patient_id not in results:
            got = writer.received.get(grid.patient_id, 0)
            results[grid.patient_id] = SlideExtraction(
                grid.patient_id, got, 0.0,
                f"failed: {grid.count - got} of {grid.count} windows could not be read", rank,
            )  # fmt: skip


def _summarise(out: Path, rows: list[SlideExtraction], rank: int, world_size: int) -> ExtractionSummary:
    """Gather every rank's rows on rank 0 (the only point where ranks meet) and write summary.csv."""
    everyone = rows
    distributed = world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()
    if distributed:
        gathered: list[Any] = [None] * world_size
        torch.distributed.all_gather_object(gathered, rows)
        everyone = [r for part in gathered for r in part]
        if rank != 0:
            return ExtractionSummary(rows, None)
    path = out / (SUMMARY if distributed or world_size == 1 else f"summary.rank{rank}.csv")
    partial = path.with_name(path.name + _PARTIAL)
    with open(partial, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "windows", "seconds", "status", "rank"])
        for r in everyone:
            w.writerow([r.patient_id, r.windows, f"{r.seconds:.2f}", r.status, r.rank])
    os.replace(partial, path)
    summary = ExtractionSummary(everyone, path)
    logger.info("feature extraction: %s; see %s", summary, path)
    return summary


# -- timm -------------------------------------------------------------------------------------------


class TimmPreprocess(torch.nn.Module):
    """uint8 ``[n, 3, H, W]`` -> float, resized to the model's input size (bilinear, antialiased)
    when it differs, normalised by the model's mean and std."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, size: tuple[int, int], mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.size = (int(size[0]), int(size[1]))
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float().div_(255)
        if tuple(x.shape[-2:]) != self.size:
            x = torch.nn.functional.interpolate(x, size=self.size, mode="bilinear", antialias=True, align_corners=False)
        return (x - self.mean) / self.std


def timm_encoder(name: str, *, pretrained: bool = True, **options: Any) -> tuple[torch.nn.Module, TimmPreprocess]:
    """A timm model without its classifier (``num_classes=0``: pooled features) and the
    :class:`TimmPreprocess` of its data config. ``name`` may be an ``hf-hub:`` name (downloads its
    weights when ``pretrained``; needs network access once). ``options`` go to ``timm.create_model``."""
    try:
        import timm
        import timm.data
    except ImportError as exc:
        raise MissingDependencyError("timm models need timm: pip install 'bigsmall-torch[features]'") from exc
    if not isinstance(name, str) or not name:
        raise ConfigError(f"timm_encoder: name must be a timm model name, got {name!r}")
    try:
        model = timm.create_model(name, pretrained=pretrained, num_classes=0, **options)
    except RuntimeError as exc:  # timm's "Unknown model"
        raise ConfigError(f"timm_encoder: {exc}") from exc
    config = timm.data.resolve_data_config({}, model=model)
    _, height, width = config["input_size"]
    return model.eval(), TimmPreprocess((height, width), config["mean"], config["std"])

