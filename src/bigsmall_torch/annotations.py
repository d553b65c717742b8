"""Region annotations: QuPath GeoJSON, ASAP XML and label masks, read as level-0 shapely geometry.

An annotation file is a record of a patient (``Record("a.geojson")``). :func:`read_annotations`
reads it into :class:`Annotations`: one :class:`Region` per object of the file, each a polygon (or
multipolygon) in level-0 pixels of the slide with the name of its class. :meth:`Annotations.layers`
turns the regions of the asked classes into :class:`ClassRegions`, what the loaders, collectors,
sliding windows and pictures use: one region per class, made disjoint by the rule that **where
regions overlap, the later class in ``classes`` wins**, and holes are never inside.

Formats:

- **GeoJSON** (``.geojson``, ``.json``) as QuPath exports it: a FeatureCollection, one Feature, a list
  of Features, or bare geometries; Polygon, MultiPolygon and GeometryCollection (holes are interior
  rings). The class is ``properties.classification.name`` (QuPath's ``{"name", "color"}`` and its
  older ``colorRGB`` form); objects without a class have class None and are used by no class.
  Points and lines have no area and are left out (counted in a warning).
- **ASAP XML** (``.xml``, CAMELYON16/17): each ``Annotation``'s ``PartOfGroup`` is its class; the
  groups named in ``exclude`` (default ``("_2", "Exclusion")``: CAMELYON's non-tumour areas drawn
  inside tumour) are holes cut out of every class.
- **Label masks** (``.png``, ``.tif``/``.tiff``, ``.bmp``, or ``kind="mask"``): an image whose pixel
  value ``v`` marks a class, at ``downsample`` level-0 pixels per mask pixel; ``labels`` maps class
  names to values (default: value ``k + 1`` is ``classes[k]``, the encoding of the ``"mask"`` the
  collector outputs).

A region that is not valid geometry (a self-intersecting outline, say) is repaired with
``shapely.make_valid`` and a logged warning; a region partly outside the slide is clipped to it with
a warning; a file that cannot be parsed, a region with bad coordinates, or a region entirely outside
the slide is an :class:`~bigsmall_torch.AnnotationError` naming the file and the object.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import xml.etree.ElementTree as ElementTree
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np

from ._regions import ClassRegions, _polygonal, _shapely, mask_geometry
from .errors import AnnotationError, ConfigError

__all__ = [
    "AnnotationKind",
    "Annotations",
    "ClassRegions",
    "Region",
    "mask_geometry",
    "patient_regions",
    "read_annotations",
    "read_record",
    "write_geojson",
]

logger = logging.getLogger(__name__)

#: ASAP groups read as holes by default (CAMELYON16's ``_2`` and the usual "Exclusion").
DEFAULT_EXCLUDE = ("_2", "Exclusion")
#: Files and class regions kept per process: a worker's whole shard for most cohorts (a miss re-reads
#: the file and rebuilds the regions in the loading thread).
_CACHE_SIZE = 512


class AnnotationKind(str, Enum):
    """The format of an annotation file."""

    GEOJSON = "geojson"
    ASAP = "asap"
    MASK = "mask"


_SUFFIXES = {
    ".geojson": AnnotationKind.GEOJSON,
    ".json": AnnotationKind.GEOJSON,
    ".xml": AnnotationKind.ASAP,
    ".png": AnnotationKind.MASK,
    ".tif": AnnotationKind.MASK,
    ".tiff": AnnotationKind.MASK,
    ".bmp": AnnotationKind.MASK,
}


@dataclass(frozen=True)
class Region:
    """One object of an annotation file.

    Attributes:
        name: its class (None when the object has none).
        geometry: a shapely Polygon or MultiPolygon in level-0 pixels.
        index: its position among the file's objects.
        label: how messages name it, e.g. ``feature 3 (id 'a1', class 'Tumor')``.
    """

    name: str | None
    geometry: Any
    index: int
    label: str


class Annotations:
    """The regions of one annotation file (see :func:`read_annotations`).

    Attributes:
        path: the file.
        kind: its :class:`AnnotationKind`.
        regions: its objects with area, in file order (holes already cut).
    """

    def __init__(self, path: str | os.PathLike[str], kind: AnnotationKind, regions: Sequence[Region]) -> None:
        self.path = Path(path)
        self.kind = AnnotationKind(kind)
        self.regions = tuple(regions)
        self._unions: dict[str | None, Any] = {}

    @property
    def classes(self) -> tuple[str, ...]:
        """The class names of the file, in order of first appearance (None left out)."""
        return tuple(dict.fromkeys(r.name for r in self.regions if r.name is not None))

    def geometry(self, name: str | None) -> Any:
        """The union of the regions of class ``name`` (an empty polygon when there are none)."""
        if name not in self._unions:
            shapely = _shapely()
            parts = [r.geometry for r in self.regions if r.name == name]
            union = shapely.union_all(parts) if parts else shapely.Polygon()
            self._unions[name] = shapely.normalize(union)
        return self._unions[name]

    def area(self, name: str | None) -> float:
        """Area of class ``name`` in level-0 pixels squared."""
        return float(self.geometry(name).area)

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """``(xmin, ymin, xmax, ymax)`` of all regions, level-0 (NaNs when there are none)."""
        if not self.regions:
            return math.nan, math.nan, math.nan, math.nan
        shapely = _shapely()
        b = shapely.total_bounds([r.geometry for r in self.regions])
        return float(b[0]), float(b[1]), float(b[2]), float(b[3])

    def within(self, width: int, height: int, classes: Sequence[str] | None = None) -> Annotations:
        """These annotations on a ``width x height`` (level-0) slide: regions partly outside are
        clipped to it (one warning per file); a region entirely outside raises
        :class:`~bigsmall_torch.AnnotationError` naming it (wrong slide, or coordinates not level-0?).
        With ``classes``, only the regions of those classes are checked and kept."""
        shapely = _shapely()
        slide = shapely.box(0, 0, width, height)
        kept, clipped = [], []
        regions = self.regions if classes is None else [r for r in self.regions if r.name in classes]
        for region in regions:
            if shapely.within(region.geometry, slide):
                kept.append(region)
                continue
            inside = _polygonal(shapely, shapely.intersection(region.geometry, slide))
            if inside.is_empty or inside.area == 0:
                xmin, ymin, xmax, ymax = region.geometry.bounds
                raise AnnotationError(
                    self.path,
                    f"{region.label} lies outside the {width}x{height} slide (its bounds are "
                    f"x {xmin:.0f}..{xmax:.0f}, y {ymin:.0f}..{ymax:.0f}); annotation coordinates "
                    "must be level-0 pixels of the patient's slide",
                )
            clipped.append(region.label)
            kept.append(Region(region.name, inside, region.index, region.label))
        if not clipped:
            return self
        logger.warning(
            "%s: %d region(s) reach outside the %dx%d slide and are clipped to it (%s%s)",
            self.path, len(clipped), width, height, ", ".join(clipped[:3]),
            ", ..." if len(clipped) > 3 else "",
        )  # fmt: skip
        return Annotations(self.path, self.kind, kept)

    def layers(
        self,
        classes: Sequence[str],
        *,
        extent: tuple[int, int] | None = None,
        background: tuple[str, Any] | None = None,
    ) -> ClassRegions:
        """The disjoint region of each class of ``classes`` (see :class:`ClassRegions`).

        Args:
            classes: the class names, in order of precedence (a later class wins where regions
                overlap).
            extent: the slide's level-0 ``(width, height)``: regions are checked and clipped
                against it (:meth:`within`).
            background: ``(name, tissue)``: the class ``name`` (one of ``classes``) also covers the
                ``tissue`` geometry outside every other class's region.
        """
        shapely = _shapely()
        source = self if extent is None else self.within(*extent, classes=classes)
        unions = [source.geometry(name) for name in classes]
        if background is not None:
            name, tissue = background
            k = list(classes).index(name)
            others = shapely.union_all([u for j, u in enumerate(unions) if j != k])
            unions[k] = shapely.union(unions[k], shapely.difference(tissue, others))
        return ClassRegions(classes, unions, source=str(self.path))

    def __repr__(self) -> str:
        return f"Annotations({str(self.path)!r}, kind={self.kind.value!r}, regions={len(self.regions)}, classes={list(self.classes)})"


# -- reading ----------------------------------------------------------------------------------------


def _repair(shapely: Any, path: Path, geometry: Any, label: str) -> Any:
    """``geometry`` made valid (``make_valid``, polygons kept) with a warning, when it is not."""
    if shapely.is_valid(geometry):
        return geometry
    reason = shapely.is_valid_reason(geometry)
    repaired = _polygonal(shapely, shapely.make_valid(geometry))
    logger.warning("%s: %s is not valid geometry (%s); repaired with make_valid", path, label, reason)
    return repaired


def _kind(path: Path, kind: AnnotationKind | str | None) -> AnnotationKind:
    if kind is not None:
        try:
            return AnnotationKind(kind)
        except ValueError:
            allowed = ", ".join(repr(k.value) for k in AnnotationKind)
            raise ConfigError(f"annotation kind={kind!r} is invalid; expected one of {allowed}") from None
    found = _SUFFIXES.get(path.suffix.lower())
    if found is None:
        raise ConfigError(
            f"{path}: cannot tell the annotation format from the suffix {path.suffix!r}; expected "
            f"one of {sorted(_SUFFIXES)}, or give kind= (record info 'kind')"
        )
    return found


def _geojson_objects(data: Any) -> Iterator[tuple[Any, dict[str, Any], Any]]:
    """``(geometry dict, properties, id)`` of each object of a GeoJSON document, in order."""
    if isinstance(data, list):
        for item in data:
            yield from _geojson_objects(item)
        return
    if not isinstance(data, dict):
        yield None, {}, None
        return
    kind = data.get("type")
    if kind == "FeatureCollection":
        yield from _geojson_objects(data.get("features", []))
    elif kind == "Feature":
        yield data.get("geometry"), data.get("properties") or {}, data.get("id")
    else:
        yield data, {}, None


def _geojson_class(properties: Mapping[str, Any]) -> str | None:
    classification = properties.get("classification")
    if isinstance(classification, Mapping):
        name = classification.get("name")
        names = classification.get("names")  # QuPath 0.4+ derived classes: ["Tumor", "Positive"]
        if name is None and isinstance(names, list) and names:
            return ": ".join(map(str, names))  # QuPath's display form, "Tumor: Positive"
        return None if name is None else str(name)
    if isinstance(classification, str):
        return classification
    return None


def _read_geojson(path: Path) -> list[Region]:
    shapely = _shapely()
    from shapely.geometry import shape

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise AnnotationError(path, f"is not valid JSON: {exc}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise AnnotationError(path, f"cannot be read: {exc}") from exc
    regions, no_area = [], 0
    for index, (geometry, properties, oid) in enumerate(_geojson_objects(data)):
        name = _geojson_class(properties)
        bits = [f"id {oid!r}"] if oid is not None else []
        bits.append(f"class {name!r}" if name is not None else "no class")
        label = f"feature {index} ({', '.join(bits)})"
        if not isinstance(geometry, Mapping) or "type" not in geometry:
            raise AnnotationError(path, f"{label} has no geometry object (a GeoJSON geometry with a 'type')")
        try:
            parsed = shape(geometry)
        except Exception as exc:  # shapely raises several types for malformed coordinates
            raise AnnotationError(path, f"{label} has malformed {geometry.get('type')} coordinates: {exc}") from exc
        coords = shapely.get_coordinates(parsed)
        if len(coords) and not np.isfinite(coords).all():
            raise AnnotationError(path, f"{label} has coordinates that are not finite numbers")
        parsed = _repair(shapely, path, parsed, label)
        polygons = _polygonal(shapely, parsed)
        if polygons.is_empty or polygons.area == 0:
            no_area += 1
            continue
        regions.append(Region(name, polygons, index, label))
    if no_area:
        logger.warning("%s: %d object(s) without area (points, lines) are left out", path, no_area)
    return regions


def _read_asap(path: Path, exclude: Sequence[str]) -> list[Region]:
    shapely = _shapely()
    try:
        root = ElementTree.parse(path).getroot()
    except ElementTree.ParseError as exc:
        raise AnnotationError(path, f"is not valid XML: {exc}") from exc
    except OSError as exc:
        raise AnnotationError(path, f"cannot be read: {exc}") from exc
    regions, holes, no_area = [], [], 0
    for index, element in enumerate(root.iter("Annotation")):
        name = element.get("PartOfGroup")
        name = None if name in (None, "", "None") else name
        label = f"annotation {element.get('Name', index)!r} (group {name!r})"
        points: list[tuple[float, tuple[float, float]]] = []
        for coordinate in element.iter("Coordinate"):
            try:
                order = float(coordinate.get("Order", len(points)))
                xy = float(coordinate.get("X", "nan").replace(",", ".")), float(coordinate.get("Y", "nan").replace(",", "."))
            except ValueError as exc:
                raise AnnotationError(path, f"{label} has a coordinate that is not a number: {exc}") from exc
            if not all(map(math.isfinite, xy)):
                raise AnnotationError(path, f"{label} has a coordinate without finite X and Y")
            points.append((order, xy))
        kind = (element.get("Type") or "Polygon").lower()
        if kind in ("dot", "pointset", "point", "measurement") or len(points) < 3:
            no_area += 1
            continue
        ring = [xy for _, xy in sorted(points, key=lambda p: p[0])]
        geometry = _repair(shapely, path, shapely.Polygon(ring), label)
        if geometry.is_empty or geometry.area == 0:
            no_area += 1
            continue
        if name in exclude:
            holes.append(geometry)
        else:
            regions.append(Region(name, geometry, index, label))
    if no_area:
        logger.warning("%s: %d annotation(s) without area (dots, lines) are left out", path, no_area)
    if holes:
        cut = shapely.union_all(holes)
        regions = [
            Region(r.name, _polygonal(shapely, shapely.difference(r.geometry, cut)), r.index, r.label)
            for r in regions
        ]
        regions = [r for r in regions if not r.geometry.is_empty]
    return regions


def _read_mask(path: Path, downsample: float | tuple[float, float], labels: Mapping[str, int] | None) -> list[Region]:
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            array = tifffile.imread(path)
        else:
            from PIL import Image

            with Image.open(path) as image:
                array = np.asarray(image)
    except Exception as exc:  # Pillow and tifffile raise many types for broken files
        raise AnnotationError(path, f"cannot be read as a label mask image: {exc}") from exc
    if array.dtype == bool:  # a 1-bit image: 1 is the (only) class
        array = array.astype(np.uint8)
    if array.ndim == 3 and array.shape[2] in (1, 3, 4):
        if array.shape[2] > 1 and not (array[..., :1] == array[..., 1:3]).all():
            raise AnnotationError(path, "is a colour image; a label mask holds one class value per pixel")
        array = array[..., 0]
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.integer):
        raise AnnotationError(path, f"is a {array.dtype} image of shape {array.shape}; a label mask is 2-D integers")
    pair = (float(downsample), float(downsample)) if np.isscalar(downsample) else tuple(map(float, downsample))  # type: ignore[arg-type]
    mapping = dict(labels) if labels is not None else {str(v): int(v) for v in np.unique(array) if v != 0}
    regions = []
    for index, (name, value) in enumerate(mapping.items()):
        geometry = mask_geometry(array == value, pair)  # type: ignore[arg-type]
        if not geometry.is_empty:
            regions.append(Region(name, geometry, index, f"label {value} (class {name!r})"))
    return regions


_cache: OrderedDict[tuple[Any, ...], Annotations] = OrderedDict()
_cache_lock = threading.Lock()


def _new_lock() -> None:
    """In a forked child: a fresh lock (another thread of the parent may have held it at fork)."""
    global _cache_lock
    _cache_lock = threading.Lock()


os.register_at_fork(after_in_child=_new_lock)


def _local(path: Any) -> Path:
    """``path`` as a local file; an annotation file by URL is refused, naming it."""
    from ._paths import RemotePath, as_path

    file = as_path(path)
    if isinstance(file, RemotePath):
        raise AnnotationError(
            file, "annotation files are read from local disk only: copy it next to the job "
            "(annotations are small), and keep the slide itself in the store",
        )  # fmt: skip
    return file


def read_annotations(
    path: str | os.PathLike[str],
    *,
    kind: AnnotationKind | str | None = None,
    exclude: Sequence[str] = DEFAULT_EXCLUDE,
    downsample: float | tuple[float, float] | None = None,
    labels: Mapping[str, int] | None = None,
) -> Annotations:
    """Read an annotation file (cached per process by path, modification time and options).

    Args:
        path: the file.
        kind: its format (:class:`AnnotationKind`); default from the suffix.
        exclude: ASAP groups read as holes cut out of every class.
        downsample: label masks: level-0 pixels per mask pixel (a number, or ``(x, y)``); required
            for masks.
        labels: label masks: class name -> pixel value (default here: each value ``v`` is class
            ``str(v)``; the loaders, sliding windows and pictures pass ``classes[k] -> k + 1`` when
            the record's info gives none).

    Raises:
        AnnotationError: the file cannot be read or parsed; names the file and the object.
    """
    file = _local(path)
    found = _kind(file, kind)
    if isinstance(exclude, str) or not all(isinstance(e, str) for e in exclude):
        raise ConfigError(f"exclude must be a sequence of group names, got {exclude!r}")
    if found is AnnotationKind.MASK:
        values = list(downsample) if isinstance(downsample, (tuple, list)) else [downsample]
        if downsample is None or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < math.inf for v in values
        ):
            raise ConfigError(
                f"{file}: a label mask needs downsample= (level-0 pixels per mask pixel, > 0; record "
                f"info 'downsample'), got {downsample!r}"
            )
    if labels is not None and (
        not isinstance(labels, Mapping) or not all(isinstance(v, int) and 0 < v < 256 for v in labels.values())
    ):
        raise ConfigError(f"labels must map class names to pixel values in 1..255, got {labels!r}")
    try:
        stat = file.stat()
    except OSError as exc:
        raise AnnotationError(file, f"cannot be read: {exc}") from exc
    frozen_labels = None if labels is None else tuple(sorted((str(k), int(v)) for k, v in labels.items()))
    key = (str(file), stat.st_mtime_ns, stat.st_size, found, tuple(exclude), repr(downsample), frozen_labels)
    with _cache_lock:
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
    if found is AnnotationKind.GEOJSON:
        regions = _read_geojson(file)
    elif found is AnnotationKind.ASAP:
        regions = _read_asap(file, tuple(exclude))
    else:
        assert downsample is not None
        regions = _read_mask(file, downsample, labels)
    result = Annotations(file, found, regions)
    with _cache_lock:
        _cache[key] = result
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    return result


# -- writing ----------------------------------------------------------------------------------------

#: Colours QuPath shows for classes written without one (packed like QuPath's ``colorRGB``).
_PALETTE = [(200, 0, 0), (0, 150, 0), (0, 0, 200), (200, 150, 0), (150, 0, 150), (0, 150, 150)]


def write_geojson(
    path: str | os.PathLike[str],
    regions: Mapping[str, Any],
    *,
    colors: Mapping[str, tuple[int, int, int]] | None = None,
    properties: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``{class name: geometry}`` (level-0 shapely geometry) as a GeoJSON FeatureCollection
    that QuPath imports (File > Import objects): one annotation Feature per polygon, classified as its
    class (``{"name", "color"}``). Returns the path."""
    shapely = _shapely()
    out = Path(path)
    features = []
    for i, (name, geometry) in enumerate(regions.items()):
        color = list((colors or {}).get(name, _PALETTE[i % len(_PALETTE)]))
        for polygon in shapely.get_parts(_polygonal(shapely, geometry)):
            if polygon.is_empty:
                continue
            features.append(
                {
                    "type": "Feature",
                    "geometry": shapely.geometry.mapping(polygon),
                    "properties": {
                        "objectType": "annotation",
                        "classification": {"name": str(name), "color": color},
                        **(properties or {}),
                    },
                }
            )
    document = {"type": "FeatureCollection", "features": features}
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(document, default=_json_number), encoding="utf-8")
    os.replace(tmp, out)
    return out


def _json_number(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


# -- a patient's regions ----------------------------------------------------------------------------

_regions_cache: OrderedDict[tuple[Any, ...], ClassRegions] = OrderedDict()


def _mask_size(path: Path) -> tuple[int, int]:
    """``(width, height)`` of a label mask image, from its header."""
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            with tifffile.TiffFile(path) as tif:
                shape = tif.pages[0].shape
                return int(shape[1]), int(shape[0])
        from PIL import Image

        with Image.open(path) as image:
            return image.size
    except Exception as exc:  # Pillow and tifffile raise many types for broken files
        raise AnnotationError(path, f"cannot be read as a label mask image: {exc}") from exc


def read_record(
    record: Any, dimensions: tuple[int, int], *, labels: Mapping[str, int] | None = None
) -> Annotations:
    """Read an annotation :class:`~bigsmall_torch.Record` (or a path) of a slide of level-0 size
    ``dimensions``. The record's ``info`` may give ``kind``, ``exclude`` (ASAP), ``downsample`` and
    ``labels`` (label masks; default ``downsample``: the slide's size over the mask's, default
    ``labels``: ``labels``, else each value is the class ``str(value)``)."""
    path = _local(record.path if hasattr(record, "path") else record)
    info = dict(getattr(record, "info", {}))
    kind = _kind(path, info.get("kind"))
    options: dict[str, Any] = {"kind": kind, "exclude": info.get("exclude", DEFAULT_EXCLUDE)}
    if kind is AnnotationKind.MASK:
        downsample = info.get("downsample")
        if downsample is None:
            mw, mh = _mask_size(path)
            downsample = (dimensions[0] / mw, dimensions[1] / mh)
        options["downsample"] = downsample
        options["labels"] = info.get("labels") or labels
    return read_annotations(path, **options)


def patient_regions(
    record: Any,
    classes: Sequence[str],
    reader: Any,
    *,
    background: str | None = None,
    tissue_detector: Any = None,
) -> ClassRegions:
    """The :class:`ClassRegions` of an annotation ``record`` on the slide of ``reader`` (cached per
    process).

    The record's ``info`` may give ``kind``, ``exclude`` (ASAP), ``downsample`` and ``labels`` (label
    masks: default ``downsample`` is the slide's size over the mask's, default ``labels`` maps
    ``classes[k]`` to ``k + 1``). With ``background``, that class also covers the tissue (the slide's
    tissue mask) outside every other class.

    Raises:
        AnnotationError: the file cannot be used, or it has no area of any of ``classes``.
    """
    width, height = reader.info.dimensions
    annotations = read_record(
        record, (width, height), labels={name: k + 1 for k, name in enumerate(classes)}
    )
    detector_key = None if background is None else tissue_detector
    key = (annotations, str(reader.info.path), (width, height), tuple(classes), background, detector_key)
    with _cache_lock:
        if key in _regions_cache:
            _regions_cache.move_to_end(key)
            return _regions_cache[key]
    tissue = None
    if background is not None:
        from .io.tissue import tissue_mask

        mask = tissue_mask(reader, detector=tissue_detector)
        tissue = (background, mask_geometry(mask.mask, mask.downsample))
    regions = annotations.layers(classes, extent=(width, height), background=tissue)
    if regions.union.is_empty:
        raise AnnotationError(
            annotations.path,
            f"has no region of the classes {list(classes)} (its classes: {list(annotations.classes)}); "
            "check the class names, or leave this patient out",
        )
    with _cache_lock:
        _regions_cache[key] = regions
        while len(_regions_cache) > _CACHE_SIZE:
            _regions_cache.popitem(last=False)
    return regions
