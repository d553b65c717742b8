"""The disjoint region of each class on one slide, and the label rasters made from it.

:class:`ClassRegions` is what sampling and labels are made of: one region per class (level-0
shapely geometry), made disjoint by the rule that the later class wins where regions overlap. It
rasterises labels for a window (a scan-line fill of the outlines, the same pixel for the same
level-0 point whatever the window), says the class at points, tests boxes for overlap and draws
uniform points from a class. :func:`mask_geometry` turns a boolean raster (a tissue mask, a label
mask) into such geometry. shapely 2.1 is imported lazily (:func:`_shapely`: the ``[annotations]``
extra).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np

from .errors import ConfigError, MissingDependencyError

__all__ = ["ClassRegions", "mask_geometry"]

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


def _polygonal(shapely: Any, geometry: Any) -> Any:
    """The polygons of ``geometry`` (a Polygon or MultiPolygon; empty when it has none)."""
    if geometry is None or geometry.is_empty:
        return shapely.Polygon()
    if geometry.geom_type in ("Polygon", "MultiPolygon"):
        return geometry
    parts = [p for p in shapely.get_parts(geometry) if p.geom_type in ("Polygon", "MultiPolygon")]
    return shapely.union_all(parts) if parts else shapely.Polygon()



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
        self._areas: dict[tuple[Any, ...], float] = {}
        self._cuts: dict[tuple[int, int, float], list[float]] = {}

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

    def cuts(self, count: int, axis: int, length: float) -> list[float]:
        """Level-0 positions ``0 = c_0 < ... < c_count = length`` along ``axis`` (0: x, 1: y) that
        cut the regions of all classes into ``count`` strips of equal area (cached)."""
        key = (count, axis, length)
        if key not in self._cuts:
            shapely = _shapely()
            union, total = self._union, self._union.area
            big = 1e18  # the other axis: everything

            def area_before(c: float) -> float:
                box = (0, -big, c, big) if axis == 0 else (-big, 0, big, c)
                return float(shapely.clip_by_rect(union, *box).area)

            cuts = [0.0]
            for k in range(1, count):
                lo, hi = cuts[-1], float(length)
                for _ in range(48):  # bisection to well under a pixel
                    mid = (lo + hi) / 2
                    lo, hi = (mid, hi) if area_before(mid) < total * k / count else (lo, mid)
                cuts.append(hi)
            cuts.append(float(length))
            self._cuts[key] = cuts
        return self._cuts[key]

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
        grows with the vertices of the regions the window meets and with its rows, plus one write
        of its pixels."""
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
        # Spans are disjoint (the parts are), so in raster order they and the gaps between them are
        # runs of one value each: one np.repeat writes the whole raster.
        first = row * width + start
        order = np.argsort(first, kind="stable")
        bounds = np.empty(2 * len(order) + 2, dtype=np.int64)
        bounds[0], bounds[-1] = 0, height * width
        bounds[1:-1:2], bounds[2:-1:2] = first[order], (row * width + stop)[order]
        runs = np.zeros(2 * len(order) + 1, dtype=np.uint8)
        runs[1::2] = value[order]
        return np.repeat(runs, np.diff(bounds)).reshape(height, width)

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
