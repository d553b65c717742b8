"""The streams of the contract suite: small synthetic slides, one factory per stream, and what a
test records of each sample.

Imported by the contract tests (``tests/contract`` is on ``sys.path`` there) and by the helper
scripts ``tests/scripts/contract_*.py`` that resume a stream in a fresh process; spawned DataLoader
workers find it through the ``sys.path`` their parent hands them. Everything here is module level
and picklable (a :class:`Spec` describes a stream; :func:`build` makes it).
"""

from __future__ import annotations

import functools
import json
import shutil
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

import bigsmall_torch as bst
from bigsmall_torch.compat import pydmed
from bigsmall_torch.compat.pydmed._adapters import _as_list, _init_worker
from bigsmall_torch.synthetic import synthesize_slides

SIDE = 1024  # slides are SIDE x SIDE at level 0, JPEG tiles of TILE
TILE = 256
N_SLIDES = 4
#: Level-0 tiles (col, row) whose bytes are zeroed in the broken slide: the four central ones, so
#: that every tile-aligned 512 x 512 region and every 512 x 512 block touches one.
BAD_TILES = ((1, 1), (2, 1), (1, 2), (2, 2))
BROKEN_ID = "broken"

# BigSmallDataset: 48 samples an epoch, 8 per batch (every worker's share a whole number of batches)
SAMPLES = 48
BATCH = 8
# SlidingWindowDataset: 128-px windows at level 0 (8 x 8 per slide), blocks of 4 x 4 windows
WINDOW = 128
WINDOW_BATCH = 16
# LightDL: its stream is endless; an "epoch" of the contract is this many batches of BATCH
LIGHT_BATCHES = 6

CASES = ("bigsmall", "bigsmall-batched", "sliding", "sliding-batched", "lightdl")
TRAINING = ("bigsmall", "bigsmall-batched", "lightdl")  # seeded streams
SLIDING = ("sliding", "sliding-batched")
BATCHED = ("bigsmall-batched", "sliding-batched")


@dataclass(frozen=True)
class Spec:
    """One stream of the contract: which front end, over which slides, with which options."""

    case: str
    folder: str  # holds clean/*.tiff and broken.tiff (see write_slides)
    on_error: str = "raise"
    seed: int = 0
    broken: bool = False  # the slide with damaged tiles is the first patient
    annotated: bool = False  # region annotations: samples carry "target" and "mask"

    def but(self, **changes: Any) -> Spec:
        return replace(self, **changes)

    @property
    def batched(self) -> bool:
        return self.case in BATCHED

    @property
    def sliding(self) -> bool:
        return self.case in SLIDING

    @property
    def endless(self) -> bool:
        return self.case == "lightdl"


# -- slides ----------------------------------------------------------------------------------------


def write_slides(folder: Path) -> Path:
    """``folder/clean``: N_SLIDES synthetic slides; ``folder/broken.tiff``: a copy of the first
    whose level-0 tiles BAD_TILES do not decode (it opens; reading those tiles fails)."""
    import tifffile

    infos = synthesize_slides(folder / "clean", n=N_SLIDES, width=SIDE, height=SIDE,
                              tile_size=TILE, mpp=0.5, tissue="full")  # fmt: skip
    broken = folder / "broken.tiff"
    shutil.copyfile(infos[0].path, broken)
    with tifffile.TiffFile(broken) as tif:
        page = tif.series[0].levels[0].keyframe
        per_row = page.shape[1] // page.tilewidth
        spans = []
        for col, row in BAD_TILES:
            index = row * per_row + col
            spans.append((int(page.dataoffsets[index]), int(page.databytecounts[index])))
    with open(broken, "r+b") as f:  # no SOI marker: the decoder raises
        for offset, count in spans:
            f.seek(offset)
            f.write(b"\x00" * count)
    for path in clean_paths(folder):
        (path.with_suffix(".geojson")).write_text(json.dumps(GEOJSON))
    return folder


# Region annotations of every slide (level-0 pixels; QuPath GeoJSON): a tumour with a hole and a
# stroma rectangle over its corner (the later class wins there).
CLASSES = ("Tumor", "Stroma")
TUMOR = [[[100, 100], [700, 120], [680, 700], [110, 660], [100, 100]],
         [[300, 300], [400, 300], [400, 400], [300, 400], [300, 300]]]  # fmt: skip
STROMA = [[[600, 500], [1000, 500], [1000, 900], [600, 900], [600, 500]]]
GEOJSON = {
    "type": "FeatureCollection",
    "features": [
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": TUMOR},
         "properties": {"objectType": "annotation", "classification": {"name": "Tumor"}}},
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": STROMA},
         "properties": {"objectType": "annotation", "classification": {"name": "Stroma"}}},
    ],
}  # fmt: skip


def class_at(x: float, y: float) -> int | None:
    """The class index at a level-0 point, straight from the polygons (-1: none; None: on an
    outline, where the package's half-open pixel rule decides)."""
    from shapely.geometry import Point, Polygon

    point, stroma, tumor = Point(x, y), Polygon(STROMA[0]), Polygon(TUMOR[0], TUMOR[1:])
    if stroma.boundary.intersects(point) or (tumor.boundary.intersects(point) and not stroma.contains(point)):
        return None
    if stroma.contains(point):
        return 1
    return 0 if tumor.contains(point) else -1


def clean_paths(folder: str | Path) -> list[Path]:
    return sorted((Path(folder) / "clean").glob("*.tiff"))


def slide_path(spec: Spec, patient_id: Any) -> Path:
    """The file of a patient of ``spec``'s stream (ids: file stems, or indices for LightDL)."""
    if patient_id == BROKEN_ID:
        return Path(spec.folder) / "broken.tiff"
    paths = clean_paths(spec.folder)
    if isinstance(patient_id, int):
        return paths[patient_id]
    return Path(spec.folder) / "clean" / f"{patient_id}.tiff"


def _records(spec: Spec, slide: Path, regions: Path) -> dict[str, bst.Record]:
    records = {"wsi": bst.Record(slide)}
    if spec.annotated:
        records["annotations"] = bst.Record(regions)
    return records


def dataset(spec: Spec) -> bst.Dataset:
    patients = [
        bst.Patient(p.stem, _records(spec, p, p.with_suffix(".geojson")))
        for p in clean_paths(spec.folder)
    ]
    if spec.broken:
        regions = clean_paths(spec.folder)[0].with_suffix(".geojson")
        broken = bst.Patient(
            BROKEN_ID, _records(spec, Path(spec.folder) / "broken.tiff", regions)
        )
        patients.insert(0, broken)
    return bst.Dataset("contract", patients)


# -- the PyDmed classes of the LightDL stream ------------------------------------------------------


class ContractLoader(pydmed.BigChunkLoader):
    """Tile-aligned ``side`` x ``side`` regions drawn from ``self.rng``, read with the package's
    reader (so an unreadable slide raises the package's errors)."""

    def extract_bigchunk(self, last_message_fromroot: Any) -> pydmed.BigChunk:
        record = self.patient.dict_records["H&E"]
        side = self.const_global_info["side"]
        reader = bst.open_slide(record.rootdir + record.relativedir)
        try:
            width, height = reader.info.dimensions
            x = int(self.rng.integers(0, (width - side) // TILE + 1)) * TILE
            y = int(self.rng.integers(0, (height - side) // TILE + 1)) * TILE
            data = np.ascontiguousarray(reader.read(x, y, 0, side, side))
        finally:
            reader.close()
        return pydmed.BigChunk(
            data=data, dict_info_of_bigchunk={"x": x, "y": y}, patient=self.patient
        )


class ContractCollector(pydmed.SmallChunkCollector):
    """Square crops of side ``const_global_info["patch"]`` drawn from ``self.rng``."""

    def extract_smallchunk(self, call_count: int, bigchunk: Any, last_message_fromroot: Any) -> Any:
        side = self.const_global_info["patch"]
        height, width = bigchunk.data.shape[:2]
        x = int(self.rng.integers(0, width - side + 1))
        y = int(self.rng.integers(0, height - side + 1))
        return pydmed.SmallChunk(
            data=bigchunk.data[y : y + side, x : x + side, :],
            dict_info_of_smallchunk={"x": x, "y": y},
            dict_info_of_bigchunk=bigchunk.dict_info_of_bigchunk,
            patient=bigchunk.patient,
        )


class WrongTypeCollector(pydmed.SmallChunkCollector):
    """Breaks the collector's contract: returns a dict instead of a SmallChunk."""

    def extract_smallchunk(self, call_count: int, bigchunk: Any, last_message_fromroot: Any) -> Any:
        return {"data": bigchunk.data[:8, :8]}


class WrongTypeCrops(bst.RandomCropCollector):
    """Breaks the engine collector's contract: returns an array instead of a SmallChunk."""

    def extract_smallchunk(self, call_count: int, bigchunk: Any, ctx: Any) -> Any:
        return np.zeros((8, 8, 3), np.uint8)


def lightdl(spec: Spec, num_workers: int, collector: type = ContractCollector) -> pydmed.LightDL:
    rootdir = str(Path(spec.folder) / "clean") + "/"
    patients = [
        pydmed.Patient(i, {"H&E": pydmed.Record(rootdir, p.name)})
        for i, p in enumerate(clean_paths(spec.folder))
    ]
    settings = pydmed.get_default_constglobinf()
    settings.update(num_bigchunkloaders=4, num_workers=num_workers, smallchunks_per_bigchunk=8,
                    seed=spec.seed, side=512, patch=64)  # fmt: skip
    return pydmed.LightDL(
        dataset=pydmed.Dataset("contract", patients),
        type_bigchunkloader=ContractLoader,
        type_smallchunkcollector=collector,
        const_global_info=settings,
        batch_size=BATCH,
        tfms=None,
    )


# -- factories -------------------------------------------------------------------------------------


def build(spec: Spec, num_workers: int = 0, **overrides: Any) -> Any:
    """The IterableDataset of ``spec`` (for LightDL: its stream ``dl._stream``, built for
    ``num_workers``, which sets the resident chunks per worker)."""
    if spec.case == "lightdl":
        return lightdl(spec, num_workers, **overrides)._stream
    if spec.case in ("bigsmall", "bigsmall-batched"):
        options: dict[str, Any] = dict(
            buffer_size=2, smallchunks_per_bigchunk=8, samples_per_epoch=SAMPLES, seed=spec.seed,
            on_error=spec.on_error, validate=not spec.broken,
            batch_size=BATCH if spec.batched else None,
        )  # fmt: skip
        options.update(overrides)
        regions: dict[str, Any] = (
            {"annotations": "annotations", "classes": CLASSES} if spec.annotated else {}
        )
        collector = options.pop("collector", bst.RandomCropCollector(64, masks=spec.annotated))
        loader = bst.RandomRegionLoader(512, **regions)
        return bst.BigSmallDataset(dataset(spec), loader, collector, **options)
    if spec.sliding:
        if spec.annotated:
            overrides = {"annotations": "annotations", "classes": CLASSES, "masks": True, **overrides}
        return bst.SlidingWindowDataset(
            dataset(spec), WINDOW, level=0, block_size=512, on_error=spec.on_error,
            batch_size=WINDOW_BATCH if spec.batched else None, **overrides,
        )  # fmt: skip
    raise ValueError(f"unknown case {spec.case!r}")


def loader_options(spec: Spec, num_workers: int, context: str | None = None) -> dict[str, Any]:
    options: dict[str, Any] = {"num_workers": num_workers}
    if num_workers and context is not None:
        options["multiprocessing_context"] = context
    if spec.batched:
        options["batch_size"] = None
    elif spec.sliding:
        options["batch_size"] = WINDOW_BATCH
    else:
        options["batch_size"] = BATCH
    if spec.case == "lightdl":
        options["collate_fn"] = _as_list
        if num_workers:
            options["worker_init_fn"] = functools.partial(_init_worker, spec.seed)
    return options


def make_loader(
    spec: Spec,
    ds: Any,
    num_workers: int,
    context: str | None = None,
    *,
    stateful: bool = False,
    **extra: Any,
) -> DataLoader[Any]:
    options = loader_options(spec, num_workers, context)
    options.update(extra)
    if stateful:
        from torchdata.stateful_dataloader import StatefulDataLoader

        return StatefulDataLoader(ds, **options)
    return DataLoader(ds, **options)


def batches(spec: Spec, loader: Any) -> Iterator[Any]:
    """The batches of one epoch (LightDL: its first LIGHT_BATCHES)."""
    for index, batch in enumerate(loader):
        if spec.endless and index >= LIGHT_BATCHES:
            return
        yield batch


# -- what is recorded of each sample ---------------------------------------------------------------


def _crc(image: Any) -> int:
    array = image.numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    return zlib.crc32(np.ascontiguousarray(array).tobytes())


def records(spec: Spec, batch: Any) -> list[tuple[Any, ...]]:
    """One tuple per sample of a batch: its identity and position, and a checksum of its pixels
    (bigsmall: patient, x, y; sliding: patient, row, col, x, y; LightDL: patient, big chunk x, y,
    small chunk x, y)."""
    if spec.case == "lightdl":
        return [
            (s.patient.int_uniqueid, s.dict_info_of_bigchunk["x"], s.dict_info_of_bigchunk["y"],
             s.dict_info_of_smallchunk["x"], s.dict_info_of_smallchunk["y"], _crc(s.data))
            for s in batch
        ]  # fmt: skip
    keys = ("row", "col", "x", "y") if spec.sliding else ("x", "y")
    columns = [batch[k] for k in keys]
    out = [
        (str(pid), *(int(c[i]) for c in columns), _crc(batch["image"][i]))
        for i, pid in enumerate(batch["patient_id"])
    ]
    if spec.annotated:  # the labels go after the pixels' checksum: (..., crc, target, mask crc)
        out = [
            (*r, int(batch["target"][i]), _crc(batch["mask"][i])) for i, r in enumerate(out)
        ]
    return out


def labels_of(spec: Spec, record: tuple[Any, ...]) -> tuple[int, int]:
    """The target (from the polygons themselves) and the mask checksum (rasterised by the package)
    of a sample of an annotated stream at the coordinates ``record`` reports."""
    from bigsmall_torch.annotations import read_annotations

    x, y = (record[3], record[4]) if spec.sliding else (record[1], record[2])
    size = WINDOW if spec.sliding else 64
    regions = read_annotations(clean_paths(spec.folder)[0].with_suffix(".geojson")).layers(CLASSES)
    mask = regions.rasterize(x, y, size, size)
    target = class_at(x + size // 2 + 0.5, y + size // 2 + 0.5)
    if target is None:  # the centre lies on an outline: the raster's half-open rule decides
        target = int(mask[size // 2, size // 2]) - 1
    return target, _crc(mask)


def batch_size_of(spec: Spec, batch: Any) -> int:
    return len(batch) if spec.case == "lightdl" else len(batch["patient_id"])


def pixel_crc(spec: Spec, record: tuple[Any, ...]) -> int:
    """The pixels' checksum a record carries."""
    return int(record[-3] if spec.annotated else record[-1])


def pixels_of(spec: Spec, record: tuple[Any, ...]) -> int:
    """The checksum of what the slide holds where ``record`` says its sample comes from."""
    reader = bst.open_slide(slide_path(spec, record[0]))
    try:
        if spec.case == "lightdl":
            _, bx, by, sx, sy, _ = record
            x, y, size = bx + sx, by + sy, 64
        elif spec.sliding:
            x, y, size = record[3], record[4], WINDOW
        else:
            x, y, size = record[1], record[2], 64
        image = reader.read(x, y, 0, size, size)
    finally:
        reader.close()
    if spec.case == "lightdl":
        return _crc(image)
    return _crc(np.ascontiguousarray(image.transpose(2, 0, 1)))


def all_windows(spec: Spec) -> set[tuple[Any, int, int]]:
    """Every window of the grid; annotated: those sharing area with a region (from the polygons)."""
    ids = ([BROKEN_ID] if spec.broken else []) + [p.stem for p in clean_paths(spec.folder)]
    n = SIDE // WINDOW
    cells = {(r, c) for r in range(n) for c in range(n)}
    if spec.annotated:
        from shapely.geometry import Polygon, box

        regions = Polygon(TUMOR[0], TUMOR[1:]).union(Polygon(STROMA[0]))
        cells = {
            (r, c)
            for r, c in cells
            if regions.intersection(box(c * WINDOW, r * WINDOW, (c + 1) * WINDOW, (r + 1) * WINDOW)).area > 0
        }
    return {(pid, r, c) for pid in ids for r, c in cells}


def lost_windows(spec: Spec) -> set[tuple[Any, int, int]]:
    """The windows whose pixels touch a damaged tile (those ``on_error="skip"`` must lose)."""
    if not spec.broken:
        return set()
    per_tile = TILE // WINDOW
    return {
        (BROKEN_ID, row * per_tile + dr, col * per_tile + dc)
        for col, row in BAD_TILES
        for dr in range(per_tile)
        for dc in range(per_tile)
    }
