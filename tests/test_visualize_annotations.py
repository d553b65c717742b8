"""Annotation outlines under the sampled patches: where the pathologist drew, where patches came from."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

import bigsmall_torch as bst
from bigsmall_torch.synthetic import SyntheticSlideInfo, write_synthetic_slide
from bigsmall_torch.visualize import (
    SampledPatches,
    SamplingRecorder,
    render_sampling,
    sampling_overlay,
    slide_thumbnail,
)

shapely = pytest.importorskip("shapely", minversion="2.1")

TUMOR = {
    "type": "Polygon",
    "coordinates": [
        [[400, 400], [1400, 450], [1300, 1400], [450, 1300], [400, 400]],
        [[800, 800], [1000, 800], [1000, 1000], [800, 1000], [800, 800]],  # a hole
    ],
}
STROMA = {"type": "Polygon", "coordinates": [[[1500, 200], [1900, 300], [1800, 900], [1550, 700], [1500, 200]]]}  # fmt: skip
PAINT = (255, 215, 230)
COLORS = {"Tumor": (250, 0, 0), "Stroma": (0, 200, 0)}
PATCH = (20, 90, 255)  # sampling_overlay's default patch colour
SCALE = 0.5  # 2048 level-0 pixels on a 1024 pixel thumbnail
# Level-0 top-lefts of 64 px patches: one across the tumour's left edge, the others clear of outlines.
PATCHES = [(380, 800), (1100, 1500), (100, 1800), (600, 600)]


@pytest.fixture(scope="module")
def slide(tmp_path_factory: pytest.TempPathFactory) -> SyntheticSlideInfo:
    return write_synthetic_slide(tmp_path_factory.mktemp("annotated") / "slide.tiff", width=2048,
                                 height=2048, tissue="blobs", seed=3, paint=[(TUMOR, PAINT)])  # fmt: skip


@pytest.fixture(scope="module")
def geojson(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A QuPath export: two classified annotations."""
    features = [
        {"type": "Feature", "geometry": geometry,
         "properties": {"objectType": "annotation", "classification": {"name": name, "color": [0, 0, 0]}}}
        for name, geometry in (("Tumor", TUMOR), ("Stroma", STROMA))
    ]  # fmt: skip
    path = tmp_path_factory.mktemp("geojson") / "slide.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return path


@pytest.fixture(scope="module")
def thumbnail(slide: SyntheticSlideInfo) -> tuple[np.ndarray, bst.SlideInfo]:
    return slide_thumbnail(slide.path)


def patches(points: list[tuple[int, int]] = PATCHES) -> SampledPatches:
    if not points:  # no patches: the outlines alone
        return SampledPatches(
            *(np.zeros(0, np.int64 if k in (0, 1, 4) else np.float64) for k in range(10))
        )
    recorder = SamplingRecorder()
    recorder.update({"patient_id": ["p"] * len(points), "x": [x for x, _ in points],
                     "y": [y for _, y in points], "image": torch.zeros(len(points), 3, 64, 64)})  # fmt: skip
    return recorder.records("p")


def ring_pixels(geometry: dict[str, Any], n: int = 40) -> list[tuple[int, int]]:
    """Thumbnail pixels ``(row, col)`` under ``n`` points spread along each ring of ``geometry``."""
    polygon = shapely.geometry.shape(geometry)
    pixels = []
    for ring in [polygon.exterior, *polygon.interiors]:
        for t in np.linspace(0.01, 0.99, n):
            point = ring.interpolate(t, normalized=True)
            pixels.append((int(point.y * SCALE), int(point.x * SCALE)))
    return pixels


def in_patch(row: int, col: int, margin: int = 1) -> bool:
    return any(
        x * SCALE - margin <= col < (x + 64) * SCALE + margin
        and y * SCALE - margin <= row < (y + 64) * SCALE + margin
        for x, y in PATCHES
    )


def outline_distance(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Distance of thumbnail pixel centres to the nearest scaled ring of either class."""
    rings = shapely.union(
        shapely.geometry.shape(TUMOR).boundary, shapely.geometry.shape(STROMA).boundary
    )
    scaled = shapely.affinity.scale(rings, SCALE, SCALE, origin=(0, 0))
    return np.asarray(shapely.distance(scaled, shapely.points(cols + 0.5, rows + 0.5)))


def test_outlines_drawn_in_class_colours_on_the_rings_only(
    slide: SyntheticSlideInfo, geojson: Path, thumbnail: tuple[np.ndarray, bst.SlideInfo]
) -> None:
    image, info = thumbnail
    records = patches()
    plain = sampling_overlay(image, info, records)
    drawn = sampling_overlay(image, info, records, annotations=geojson, annotation_colors=COLORS)
    assert drawn.shape == plain.shape == (1024, 1024, 3)
    for name, geometry in (("Tumor", TUMOR), ("Stroma", STROMA)):
        on_ring = [p for p in ring_pixels(geometry) if not in_patch(*p)]
        assert len(on_ring) > (60 if name == "Tumor" else 35)  # the tumour: its exterior and hole
        assert all(drawn[p].tolist() == list(COLORS[name]) for p in on_ring), name
    # Everything else is the picture without annotations: nothing drawn far from the outlines.
    rows, cols = np.nonzero((drawn != plain).any(axis=2))
    perimeter = sum(shapely.geometry.shape(g).length for g in (TUMOR, STROMA)) * SCALE
    assert 1.8 * perimeter < len(rows) < 2.2 * perimeter  # two pixels wide along every ring
    assert outline_distance(rows, cols).max() <= 2.0
    # The tumour's inside (and its hole) keeps the slide's pixels: the painted colour, untouched.
    for x, y in ((1150, 900), (900, 900)):
        row, col = int(y * SCALE), int(x * SCALE)
        assert (
            drawn[row - 3 : row + 4, col - 3 : col + 4]
            == image[row - 3 : row + 4, col - 3 : col + 4]
        ).all()
    assert np.abs(drawn[450, 575].astype(int) - PAINT).max() < 12


def test_patches_are_drawn_over_the_outlines(
    geojson: Path, thumbnail: tuple[np.ndarray, bst.SlideInfo]
) -> None:
    image, info = thumbnail
    drawn = sampling_overlay(image, info, patches(), annotations=geojson, annotation_colors=COLORS)
    # The first patch (thumbnail columns 190..221, rows 400..431) crosses the tumour's left edge,
    # which runs from level-0 (400, 400) to (450, 1300): at row 416 it is near column 212.
    row = 416
    hits = [c for c in range(200, 222) if (drawn[row, c] == (158, 36, 102)).all()]
    # Red under 40 % blue: round(.6 * 250 + .4 * 20), ...; no bare outline left inside the patch.
    assert hits and abs(np.mean(hits) - 212) <= 1.5
    assert not (drawn[400:432, 190:222] == COLORS["Tumor"]).all(axis=2).any()
    dark = [int(c * 0.6) for c in PATCH]
    assert (drawn[400, 190:222] == dark).all() and (drawn[431, 190:222] == dark).all()
    assert (drawn[400:432, 190] == dark).all() and (drawn[400:432, 221] == dark).all()


def test_classes_pick_what_is_drawn_and_colours_follow_class_order(
    geojson: Path, thumbnail: tuple[np.ndarray, bst.SlideInfo]
) -> None:
    image, info = thumbnail
    records = patches([])
    only = sampling_overlay(image, info, records, annotations=geojson, classes=["Stroma"])
    both = sampling_overlay(image, info, records, annotations=str(geojson))
    tumor, stroma = ring_pixels(TUMOR), ring_pixels(STROMA)
    assert all((only[p] == image[p]).all() for p in tumor)  # the tumour is not drawn
    colour = {
        name: {tuple(both[p].tolist()) for p in pixels}
        for name, pixels in (("Tumor", tumor), ("Stroma", stroma))
    }
    assert (
        len(colour["Tumor"]) == len(colour["Stroma"]) == 1 and colour["Tumor"] != colour["Stroma"]
    )
    # Stroma keeps its colour (its place among all the classes) when drawn alone.
    assert {tuple(only[p].tolist()) for p in stroma} == colour["Stroma"]
    # Read annotations, disjoint class regions and a path draw the same picture.
    annotations = bst.read_annotations(geojson)
    assert np.array_equal(sampling_overlay(image, info, records, annotations=annotations), both)
    regions = annotations.layers(["Tumor", "Stroma"])
    assert np.array_equal(sampling_overlay(image, info, records, annotations=regions), both)
    wide = sampling_overlay(image, info, records, annotations=geojson, annotation_width=5)
    assert (wide != image).any(axis=2).sum() > 2 * (both != image).any(axis=2).sum()


def test_label_mask_outlines_at_the_slide_scale(
    tmp_path: Path, thumbnail: tuple[np.ndarray, bst.SlideInfo]
) -> None:
    image, info = thumbnail
    mask = np.zeros((256, 256), np.uint8)  # 8 level-0 pixels a mask pixel, told by the sizes
    mask[50:150, 100:200] = 1  # level-0 x 800..1600, y 400..1200
    Image.fromarray(mask).save(tmp_path / "labels.png")
    drawn = sampling_overlay(image, info, patches([]), annotations=tmp_path / "labels.png",
                             annotation_colors={"1": (0, 0, 250)})  # fmt: skip
    for row, col in ((200, 500), (600, 700), (400, 400), (300, 799)):  # on the square's four sides
        assert (drawn[row - 1 : row + 2, col - 1 : col + 2] == (0, 0, 250)).all(axis=2).any()
    assert (drawn[400, 600] == image[400, 600]).all()  # its middle


def test_render_sampling_and_render_all_draw_the_annotations(
    slide: SyntheticSlideInfo, geojson: Path, tmp_path: Path
) -> None:
    path = render_sampling(slide.path, patches(), tmp_path / "one.png", annotations=geojson,
                           classes=["Tumor"], annotation_colors=COLORS)  # fmt: skip
    with Image.open(path) as png:
        picture = np.asarray(png.convert("RGB"))
    assert all(
        (picture[p] == COLORS["Tumor"]).all() for p in ring_pixels(TUMOR) if not in_patch(*p)
    )
    assert not (picture == COLORS["Stroma"]).all(axis=2).any()
    data = bst.Dataset("a", [bst.Patient("p", {"wsi": bst.Record(slide.path), "ann": bst.Record(geojson)}),
                             bst.Patient("q", {"wsi": bst.Record(slide.path)})])  # fmt: skip
    recorder = SamplingRecorder()
    recorder.update(
        {"patient_id": ["p"], "x": [100], "y": [1800], "image": torch.zeros(1, 3, 64, 64)}
    )
    paths = recorder.render_all(
        data, tmp_path / "all", annotation_key="ann", annotation_colors=COLORS
    )
    with Image.open(paths["p"]) as png:
        picture = np.asarray(png.convert("RGB"))
    for name, geometry in (("Tumor", TUMOR), ("Stroma", STROMA)):
        assert all((picture[p] == COLORS[name]).all() for p in ring_pixels(geometry))
    with pytest.raises(bst.ConfigError, match="annotation_key= or annotations="):
        recorder.render_all(data, tmp_path / "x", annotation_key="ann", annotations=geojson)
    with pytest.raises(bst.ConfigError, match="has no record 'labels'"):
        recorder.render_all(data, tmp_path / "y", annotation_key="labels")
    recorder.update({"patient_id": ["q"], "x": [0], "y": [0], "image": torch.zeros(1, 3, 8, 8)})
    with pytest.raises(bst.ConfigError, match="same regions on all 2 slides"):
        recorder.render_all(data, tmp_path / "z", annotations=geojson)
    assert not (tmp_path / "y").exists()


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"annotations": 42}, "annotations must be Annotations, ClassRegions, a Record or the path"),
        ({"classes": "Tumor"}, "classes must be a sequence of class names, got 'Tumor'"),
        ({"classes": ["Tumor", "Necrosis"]}, r"classes \['Necrosis'\] are not in the annotations; their classes are \['Tumor', 'Stroma'\]"),
        ({"annotation_colors": {"Tumor": (300, 0, 0)}}, r"annotation_colors must be \(r, g, b\) ints in 0..255, got \{'Tumor': \(300, 0, 0\)\}"),
        ({"annotation_colors": {"Tumor": "red"}}, "annotation_colors must be"),
        ({"annotation_colors": [(1, 2, 3)]}, "annotation_colors must map class names"),
        ({"annotation_width": 0}, "annotation_width must be an int >= 1"),
        ({"annotation_width": 1.5}, "annotation_width must be an int >= 1"),
        ({"annotations": None, "classes": ["Tumor"]}, "need annotations="),
        ({"annotations": "regions.txt"}, "cannot tell the annotation format"),
    ],
    ids=["annotations", "classes-str", "classes-unknown", "colour-range", "colour-name",
         "colours-list", "width-0", "width-float", "classes-alone", "suffix"],
)  # fmt: skip
def test_bad_arguments_name_themselves(
    geojson: Path, thumbnail: tuple[np.ndarray, bst.SlideInfo], options: dict[str, Any], match: str
) -> None:
    image, info = thumbnail
    with pytest.raises(bst.ConfigError, match=match):
        sampling_overlay(image, info, patches(), **{"annotations": geojson, **options})


def test_annotations_off_the_slide_warn(
    tmp_path: Path, thumbnail: tuple[np.ndarray, bst.SlideInfo], caplog: pytest.LogCaptureFixture
) -> None:
    image, info = thumbnail
    far = {
        "type": "Polygon",
        "coordinates": [[[5000, 5000], [6000, 5000], [6000, 6000], [5000, 5000]]],
    }
    path = tmp_path / "far.geojson"
    path.write_text(
        json.dumps(
            {"type": "Feature", "geometry": far, "properties": {"classification": {"name": "T"}}}
        )
    )
    drawn = sampling_overlay(image, info, patches([]), annotations=path)
    assert np.array_equal(drawn, image)
    assert "no region of the classes ['T'] lies on the 2048x2048 slide" in caplog.text
