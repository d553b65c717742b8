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

from .errors import AnnotationError, ConfigError, MissingDependencyError

__all__ = [
    "AnnotationKind",
    "Annotations",
    "ClassRegions",
    "Region",
    "read_annotations",
    "write_geojson",
]

logger = logging.getLogger(__name__)

#: ASAP groups read as holes by default (CAMELYON16's ``_2`` and the usual "Exclusion").
DEFAULT_EXCLUDE = ("_2", "Exclusion")
_CACHE_SIZE = 64
#: Up to this many spans a raster is filled span by span (about 1 us each), else by one cumulative
#: sum over its pixels (about 2.5 ns a pixel).
_LOOP_SPANS = 8192


def _shapely() -> Any:
    """shapely (2.1 or later), or a :class:`MissingDependencyError` naming the extra."""
    try:
        import shapely
    except ImportError as exc:
        raise MissingDependencyError(
            "annotations need shapely 2.1 or later: pip install 'bigsmall-torch[annotations]'"
        ) from exc
    if not hasattr(shapely, "constrained_delaunay_triangles"):
        raise MissingDependencyError(
            f"annotations need shapely 2.1 or later (found {shapely.__version__}): "
            "pip install 'bigsmall-torch[annotations]'"
        )
    return shapely


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

    def within(self, width: int, height: int) -> Annotations:
        """These annotations on a ``width x height`` (level-0) slide: regions partly outside are
        clipped to it (one warning per file); a region entirely outside raises
        :class:`~bigsmall_torch.AnnotationError` naming it (wrong slide, or coordinates not level-0?)."""
        shapely = _shapely()
        slide = shapely.box(0, 0, width, height)
        kept, clipped = [], []
        for region in self.regions:
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
        source = self if extent is None else self.within(*extent)
        unions = [source.geometry(name) for name in classes]
        if background is not None:
            name, tissue = background
            k = list(classes).index(name)
            others = shapely.union_all([u for j, u in enumerate(unions) if j != k])
            unions[k] = shapely.union(unions[k], shapely.difference(tissue, others))
        return ClassRegions(classes, unions, source=str(self.path))

    def __repr__(self) -> str:
        return f"Annotations({str(self.path)!r}, kind={self.kind.value!r}, regions={len(self.regions)}, classes={list(self.classes)})"


class ClassRegions:
    """One region per class, disjoint, in level-0 pixels: what sampling and labels are made of.

    Class ``k`` covers its own union minus the unions of the classes after it (the later class wins).
    Raster labels are ``0`` outside every region and ``k + 1`` inside class ``k``; a pixel is inside
    when its centre is (half-open on the right and bottom edges).

    Args:
        classes: the class names.
        unions: per class, a shapely geometry (its region before overlaps are resolved).
        source: names the file in messages.
    """

    def __init__(self, classes: Sequence[str], unions: Sequence[Any], *, source: str = "") -> None:
        shapely = _shapely()
        if len(classes) > 254:
            raise ConfigError(f"classes: at most 254 classes fit a uint8 mask, got {len(classes)}")
        self.classes = tuple(classes)
        self.source = source
        regions, later = [], shapely.Polygon()
        for union in reversed(list(unions)):
            regions.append(shapely.normalize(_polygonal(shapely, shapely.difference(union, later))))
            later = shapely.union(later, union)
        self.geometries = tuple(reversed(regions))
        parts, owners = [], []
        for k, geometry in enumerate(self.geometries):
            pieces = shapely.get_parts(geometry)
            parts.extend(pieces)
            owners.extend([k] * len(pieces))
        self._parts = np.array(parts, dtype=object)
        self._values = np.array(owners, dtype=np.int64) + 1
        self._tree = shapely.STRtree(self._parts)
        self._union = shapely.union_all(self.geometries)
        shapely.prepare(self._union)
        for part in self._parts:
            shapely.prepare(part)
        self._triangles: OrderedDict[tuple[Any, ...], tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._edge_arrays: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None
        self._areas: dict[tuple[int, tuple[float, float, float, float]], float] = {}

    def __getstate__(self) -> dict[str, Any]:  # the tree and the caches are rebuilt
        return {"classes": self.classes, "geometries": self.geometries, "source": self.source}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["classes"], state["geometries"], source=state["source"])  # type: ignore[misc]

    @property
    def union(self) -> Any:
        """The area of any class."""
        return self._union

    def area(self, k: int, box: tuple[float, float, float, float] | None = None) -> float:
        """Area of class ``k`` (inside the level-0 ``box = (x, y, width, height)`` when given)."""
        geometry = self.geometries[k]
        if box is None:
            return float(geometry.area)
        if (k, box) not in self._areas:  # asked once per big chunk: cached per band
            x, y, w, h = box
            self._areas[(k, box)] = float(_shapely().clip_by_rect(geometry, x, y, x + w, y + h).area)
        return self._areas[(k, box)]

    def sample(
        self, k: int, rng: np.random.Generator, box: tuple[float, float, float, float] | None = None
    ) -> tuple[float, float] | None:
        """A level-0 point drawn uniformly from class ``k``'s region (inside ``box`` when given), or
        None when that is empty."""
        key = (k, box)
        if key not in self._triangles:
            self._triangles[key] = self._triangulate(k, box)
            while len(self._triangles) > 64:
                self._triangles.popitem(last=False)
        triangles, cumulative = self._triangles[key]
        if len(triangles) == 0:
            return None
        i = min(int(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right")), len(triangles) - 1)
        a, b, c = triangles[i]
        r1, r2 = rng.random(), rng.random()
        if r1 + r2 > 1:
            r1, r2 = 1 - r1, 1 - r2
        point = a + r1 * (b - a) + r2 * (c - a)
        return float(point[0]), float(point[1])

    def _triangulate(self, k: int, box: tuple[float, float, float, float] | None) -> tuple[np.ndarray, np.ndarray]:
        shapely = _shapely()
        geometry = self.geometries[k]
        if box is not None:
            x, y, w, h = box
            geometry = _polygonal(shapely, shapely.clip_by_rect(geometry, x, y, x + w, y + h))
        pieces = [p for p in shapely.get_parts(geometry) if p.area > 0]
        if not pieces:
            return np.zeros((0, 3, 2)), np.zeros(0)
        triangles = shapely.get_parts(shapely.constrained_delaunay_triangles(np.array(pieces, dtype=object)))
        coords = shapely.get_coordinates(triangles).reshape(-1, 4, 2)[:, :3]
        a, b, c = coords[:, 0], coords[:, 1], coords[:, 2]
        areas = 0.5 * np.abs((b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (c[:, 0] - a[:, 0]) * (b[:, 1] - a[:, 1]))
        keep = areas > 0
        return coords[keep], np.cumsum(areas[keep])

    def labels_at(self, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
        """The class index at each level-0 point (-1 outside every region); a point on an outline
        follows :meth:`rasterize`'s rule, so it agrees with the pixel whose centre it is."""
        shapely = _shapely()
        xs, ys = np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64)
        out = np.full(xs.shape, -1, dtype=np.int64)
        edge = np.zeros(xs.shape, dtype=bool)
        for k, geometry in enumerate(self.geometries):
            if not geometry.is_empty:
                out[shapely.contains_xy(geometry, xs, ys)] = k
                edge |= shapely.intersects_xy(geometry.boundary, xs, ys)
        for i in zip(*np.nonzero(edge), strict=True):  # on an outline: the raster's rule decides
            out[i] = int(self.rasterize(xs[i] - 0.5, ys[i] - 0.5, 1, 1)[0, 0]) - 1
        return out

    def overlaps(self, x: np.ndarray, y: np.ndarray, width: float, height: float) -> np.ndarray:
        """Whether each level-0 box ``(x, y, width, height)`` shares area with any class."""
        shapely = _shapely()
        x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
        if self._union.is_empty:
            return np.zeros(x.shape, dtype=bool)
        # Shrunk a little, so that boxes merely touching a region's edge do not count.
        eps = 1e-6 * max(width, height)
        boxes = shapely.box(x + eps, y + eps, x + width - eps, y + height - eps)
        return np.asarray(shapely.intersects(self._union, boxes), dtype=bool)

    def rasterize(self, x: float, y: float, width: int, height: int, downsample: float = 1.0) -> np.ndarray:
        """The ``height x width`` uint8 labels of the region whose top-left is level-0 ``(x, y)``,
        one per pixel of ``downsample`` level-0 pixels (0: no class; ``k + 1``: class ``k``), decided
        at each pixel's centre: a centre on a left or top edge is inside, on a right or bottom edge
        outside.

        A scan-line fill of the regions' outlines in level-0 coordinates: the crossing of an edge with
        a row of centres does not depend on where the window starts, so a patch cut from a chunk's
        raster equals the patch's own raster even where a centre lies exactly on an edge. Its cost
        grows with the vertices of the regions the window meets and with its rows, plus (only past
        a few thousand spans) one pass over its pixels."""
        _shapely()
        out = np.zeros((height, width), dtype=np.uint8)
        if len(self._parts) == 0 or width <= 0 or height <= 0:
            return out
        ds = float(downsample)
        x1, y1 = x + width * ds, y + height * ds
        hits = self._tree.query(_shapely().box(x, y, x1, y1))
        if len(hits) == 0:
            return out
        if len(hits) == 1 and _shapely().contains_properly(self._parts[hits[0]], _shapely().box(x, y, x1, y1)):
            out.fill(self._values[hits[0]])
            return out
        edges = self._edges()
        ax, ay, bx, by, part = (a[np.isin(edges[4], hits)] for a in edges)
        low, high = np.minimum(ay, by), np.maximum(ay, by)
        near = (high > y) & (low < y1)
        ax, ay, bx, by, part, low, high = (a[near] for a in (ax, ay, bx, by, part, low, high))
        # Rows whose centre y + (j + 0.5) * ds lies in [low, high): each such edge crosses them once.
        lo = _first_centre_at_or_after(low, y, ds, height)
        hi = _first_centre_at_or_after(high, y, ds, height)
        n = hi - lo
        if n.sum() == 0:
            return out
        edge = np.repeat(np.arange(len(n)), n)
        rows = lo[edge] + np.arange(len(edge)) - np.repeat(np.cumsum(n) - n, n)
        centre = y + (rows + 0.5) * ds
        cross = ax[edge] + (centre - ay[edge]) * (bx[edge] - ax[edge]) / (by[edge] - ay[edge])
        order = np.lexsort((cross, rows, part[edge]))
        cross, rows, value = cross[order], rows[order], self._values[part[edge][order]]
        # Each (part, row) has an even number of crossings: consecutive pairs are inside spans, and
        # the pixels of a span are those whose centre x + (i + 0.5) * ds is in [left, right).
        start = _first_centre_at_or_after(cross[0::2], x, ds, width)
        stop = _first_centre_at_or_after(cross[1::2], x, ds, width)
        row, value = rows[0::2], value[0::2].astype(np.uint8)
        keep = stop > start
        row, start, stop, value = row[keep], start[keep], stop[keep], value[keep]
        if len(row) <= _LOOP_SPANS:  # a slice fill per span: cheaper than a pass over the pixels
            for r, a, b, v in zip(row.tolist(), start.tolist(), stop.tolist(), value.tolist(), strict=True):
                out[r, a:b] = v
            return out
        # Spans are disjoint, so starts (and stops) never repeat: a difference array, summed per
        # row in uint8 (wrapping arithmetic is exact because every true sum is a label).
        diff = np.zeros((height, width + 1), dtype=np.uint8)
        diff[row, start] += value
        diff[row, stop] -= value
        np.cumsum(diff[:, :width], axis=1, dtype=np.uint8, out=out)
        return out

    def _edges(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Every edge of every part's rings, level-0: ``(ax, ay, bx, by, part index)`` (built once)."""
        if self._edge_arrays is None:
            shapely = _shapely()
            rings, ring_part = shapely.get_rings(self._parts, return_index=True)
            coords, ring = shapely.get_coordinates(rings, return_index=True)
            same = ring[:-1] == ring[1:]  # consecutive vertices of one ring make an edge
            a, b = coords[:-1][same], coords[1:][same]
            flat = a[:, 1] != b[:, 1]  # horizontal edges cross no row
            self._edge_arrays = (
                a[flat, 0], a[flat, 1], b[flat, 0], b[flat, 1], ring_part[ring[:-1][same]][flat]
            )
        return self._edge_arrays

    def __repr__(self) -> str:
        areas = ", ".join(f"{c!r}: {g.area:.0f}" for c, g in zip(self.classes, self.geometries, strict=True))
        return f"ClassRegions({{{areas}}})"


def _first_centre_at_or_after(value: np.ndarray, origin: float, step: float, count: int) -> np.ndarray:
    """For each ``value``, the first index ``i`` in ``[0, count]`` with ``origin + (i + 0.5) * step
    >= value``, decided by that exact comparison (an estimate, then corrected by one step either
    way), so that equal level-0 values give the same pixel whatever the origin."""
    i = np.clip(np.ceil((value - origin) / step - 0.5), 0, count).astype(np.int64)
    i += (i < count) & (origin + (i + 0.5) * step < value)
    i -= (i > 0) & (origin + (i - 0.5) * step >= value)
    return i


# -- reading ----------------------------------------------------------------------------------------


def _polygonal(shapely: Any, geometry: Any) -> Any:
    """The polygons of ``geometry`` (a Polygon or MultiPolygon; empty when it has none)."""
    if geometry is None or geometry.is_empty:
        return shapely.Polygon()
    if geometry.geom_type in ("Polygon", "MultiPolygon"):
        return geometry
    parts = [p for p in shapely.get_parts(geometry) if p.geom_type in ("Polygon", "MultiPolygon")]
    return shapely.union_all(parts) if parts else shapely.Polygon()


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


def mask_geometry(mask: np.ndarray, downsample: tuple[float, float] = (1.0, 1.0)) -> Any:
    """The area where the boolean ``mask`` is set, as level-0 geometry: each cell ``(r, c)`` covers
    ``[c * dx, (c + 1) * dx) x [r * dy, (r + 1) * dy)``."""
    shapely = _shapely()
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return shapely.Polygon()
    padded = np.zeros((mask.shape[0], mask.shape[1] + 2), dtype=np.int8)
    padded[:, 1:-1] = mask
    rows, cols = np.nonzero(np.diff(padded, axis=1))  # run starts and stops, row by row
    start, stop, row = cols[0::2], cols[1::2], rows[0::2]
    dx, dy = downsample
    boxes = shapely.box(start * dx, row * dy, stop * dx, (row + 1) * dy)
    return shapely.normalize(shapely.union_all(boxes))


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
        labels: label masks: class name -> pixel value (default: each value ``v`` is class ``str(v)``).

    Raises:
        AnnotationError: the file cannot be read or parsed; names the file and the object.
    """
    file = Path(path)
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
    info = dict(record.info)
    path = Path(record.path)
    kind = _kind(path, info.get("kind"))
    width, height = reader.info.dimensions
    options: dict[str, Any] = {"kind": kind, "exclude": tuple(info.get("exclude", DEFAULT_EXCLUDE))}
    if kind is AnnotationKind.MASK:
        downsample = info.get("downsample")
        if downsample is None:
            mw, mh = _mask_size(path)
            downsample = (width / mw, height / mh)
        options["downsample"] = downsample
        options["labels"] = info.get("labels") or {name: k + 1 for k, name in enumerate(classes)}
    annotations = read_annotations(path, **options)
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
            path,
            f"has no region of the classes {list(classes)} (its classes: {list(annotations.classes)}); "
            "check the class names, or leave this patient out",
        )
    with _cache_lock:
        _regions_cache[key] = regions
        while len(_regions_cache) > _CACHE_SIZE:
            _regions_cache.popitem(last=False)
    return regions
