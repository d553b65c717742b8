"""A painted slide and the same regions as QuPath GeoJSON, ASAP XML and a label mask (tests only).

The slide is 2048 x 2048 (levels 1x, 2x); its regions are filled with solid colours over the
texture, so the class of a pixel can be read back from the image itself (:func:`painted_class`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from bigsmall_torch.synthetic import write_synthetic_slide

SIDE = 2048
# Level-0 outlines. Tumor: a polygon with a hole plus a square (a MultiPolygon); Stroma overlaps the
# tumour's lower-right corner (as the later class it wins there); Necrosis is a third class.
TUMOR = [
    [[[300, 300], [1300, 350], [1250, 1300], [350, 1250], [300, 300]],
     [[600, 600], [900, 600], [900, 900], [600, 900], [600, 600]]],
    [[[1500, 200], [1900, 200], [1900, 500], [1500, 500], [1500, 200]]],
]  # fmt: skip
STROMA = [[[1100, 1000], [1800, 1000], [1800, 1800], [1100, 1800], [1100, 1000]]]
NECROSIS = [[[200, 1500], [700, 1500], [700, 1900], [200, 1900], [200, 1500]]]
COLORS = {"Tumor": (220, 30, 30), "Stroma": (30, 200, 30), "Necrosis": (30, 30, 220)}
GEOMETRIES: dict[str, dict[str, Any]] = {
    "Tumor": {"type": "MultiPolygon", "coordinates": TUMOR},
    "Stroma": {"type": "Polygon", "coordinates": STROMA},
    "Necrosis": {"type": "Polygon", "coordinates": NECROSIS},
}


def write_painted_slide(path: Path) -> Path:
    write_synthetic_slide(
        path, width=SIDE, height=SIDE, quality=95, tissue="full", seed=3,
        paint=[(GEOMETRIES[name], COLORS[name]) for name in ("Tumor", "Stroma", "Necrosis")],
    )  # fmt: skip
    return path


def write_geojson_file(path: Path) -> Path:
    """QuPath's export: a FeatureCollection; Stroma in QuPath's older ``colorRGB`` form, plus an
    unclassified annotation and a point (no area)."""
    features = [
        {"type": "Feature", "id": "t1", "geometry": GEOMETRIES["Tumor"],
         "properties": {"objectType": "annotation",
                        "classification": {"name": "Tumor", "color": [220, 30, 30]}}},
        {"type": "Feature", "geometry": GEOMETRIES["Stroma"],
         "properties": {"objectType": "annotation",
                        "classification": {"name": "Stroma", "colorRGB": -16711936}}},
        {"type": "Feature", "geometry": GEOMETRIES["Necrosis"],
         "properties": {"classification": {"name": "Necrosis"}}},
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [
            [[1900, 1900], [2000, 1900], [2000, 2000], [1900, 1900]]]},
         "properties": {"objectType": "annotation"}},
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": [10, 10]},
         "properties": {"classification": {"name": "Tumor"}}},
    ]  # fmt: skip
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return path


def _asap_annotation(name: str, group: str, ring: list[list[float]], shuffle: bool) -> str:
    points = list(enumerate(ring[:-1]))  # ASAP lists each vertex once
    if shuffle:  # the Order attribute, not the document order, gives the ring
        points = points[1::2] + points[0::2]
    coords = "".join(f'<Coordinate Order="{i}" X="{x}" Y="{y}" />' for i, (x, y) in points)
    return (
        f'<Annotation Name="{name}" Type="Polygon" PartOfGroup="{group}" Color="#F4FA58">'
        f"<Coordinates>{coords}</Coordinates></Annotation>"
    )


def write_asap_file(path: Path, *, hole_group: str = "_2") -> Path:
    """CAMELYON-style ASAP XML: the tumour's hole drawn as an annotation of the exclusion group."""
    annotations = [
        _asap_annotation("Annotation 0", "Tumor", TUMOR[0][0], shuffle=True),
        _asap_annotation("Annotation 1", hole_group, TUMOR[0][1], shuffle=False),
        _asap_annotation("Annotation 2", "Tumor", TUMOR[1][0], shuffle=False),
        _asap_annotation("Annotation 3", "Stroma", STROMA[0], shuffle=False),
        _asap_annotation("Annotation 4", "Necrosis", NECROSIS[0], shuffle=False),
        '<Annotation Name="Dot" Type="Dot" PartOfGroup="Tumor"><Coordinates>'
        '<Coordinate Order="0" X="5" Y="5" /></Coordinates></Annotation>',
    ]
    groups = "".join(
        f'<Group Name="{g}" PartOfGroup="None" Color="#64FE2E"><Attributes /></Group>'
        for g in ("Tumor", hole_group, "Stroma", "Necrosis")
    )
    path.write_text(
        '<?xml version="1.0"?><ASAP_Annotations><Annotations>'
        + "".join(annotations)
        + f"</Annotations><AnnotationGroups>{groups}</AnnotationGroups></ASAP_Annotations>"
    )
    return path


def write_label_mask(path: Path, downsample: int = 4) -> Path:
    """A PNG label mask at ``downsample``: 1 Tumor, 2 Stroma, 3 Necrosis (rasterised from the
    GeoJSON by the package itself, pixel centres)."""
    from PIL import Image
    from shapely.geometry import shape

    from bigsmall_torch.annotations import ClassRegions

    names = ("Tumor", "Stroma", "Necrosis")
    regions = ClassRegions(names, [shape(GEOMETRIES[n]) for n in names])
    side = SIDE // downsample
    Image.fromarray(regions.rasterize(0, 0, side, side, downsample)).save(path)
    return path


def painted_class(image: np.ndarray, classes: tuple[str, ...]) -> np.ndarray:
    """Per pixel of a CHW (or HWC) uint8 image: ``k + 1`` where it has the colour of ``classes[k]``,
    else 0 (the texture, or a painted class not in ``classes``)."""
    rgb = np.asarray(image)
    if rgb.shape[0] == 3 and rgb.shape[-1] != 3:
        rgb = rgb.transpose(1, 2, 0)
    rgb = rgb.astype(np.int16)
    out = np.zeros(rgb.shape[:2], dtype=np.uint8)
    for k, name in enumerate(classes):
        close = np.abs(rgb - np.array(COLORS[name], dtype=np.int16)).max(axis=-1) < 50
        out[close] = k + 1
    return out


def distance_to_outlines(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Level-0 distance of each point to the nearest outline of any region."""
    import shapely
    from shapely.geometry import shape

    lines = shapely.union_all([shape(g).boundary for g in GEOMETRIES.values()])
    return np.asarray(shapely.distance(lines, shapely.points(x, y)))
