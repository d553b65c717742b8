"""Region annotations: readers, labels at patch centres and per pixel, placement, class balance,
bad files, and sliding windows restricted to the regions.

The slide's regions are painted in known colours (tests/_regions.py), so every label is checked
against the pixels themselves, not against the package's own rasteriser.
"""

from __future__ import annotations

import json
import logging
import pickle
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import bigsmall_torch as bst
from bigsmall_torch.annotations import patient_regions

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _regions as rg

shapely = pytest.importorskip("shapely", reason="needs shapely (the [annotations] extra)")

CLASSES = ("Tumor", "Stroma")


@pytest.fixture(scope="module")
def painted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("painted")
    return {
        "slide": rg.write_painted_slide(folder / "slide.tiff"),
        "geojson": rg.write_geojson_file(folder / "slide.geojson"),
        "asap": rg.write_asap_file(folder / "slide.xml"),
        "mask": rg.write_label_mask(folder / "slide_mask.png"),
    }


def cohort(painted: dict[str, Path], kind: str = "geojson", info: dict[str, Any] | None = None) -> bst.Dataset:
    records = {"wsi": bst.Record(painted["slide"]), "annotations": bst.Record(painted[kind], info)}
    return bst.Dataset("painted", [bst.Patient("p", records)])


def stream(
    dataset: bst.Dataset,
    *,
    classes: tuple[str, ...] = CLASSES,
    samples: int = 256,
    workers: int = 0,
    batch: int | None = None,
    chunk: int = 512,
    patch: int = 64,
    per_chunk: int = 16,
    loader_options: dict[str, Any] | None = None,
    collector_options: dict[str, Any] | None = None,
    **options: Any,
) -> list[dict[str, Any]]:
    """The samples of one epoch, as dicts of numpy arrays / ints."""
    loader = bst.RandomRegionLoader(
        chunk, annotations="annotations", classes=list(classes), **(loader_options or {})
    )
    collector = bst.RandomCropCollector(patch, **{"masks": True, **(collector_options or {})})
    ds = bst.BigSmallDataset(
        dataset, loader, collector, samples_per_epoch=samples, smallchunks_per_bigchunk=per_chunk,
        buffer_size=4, seed=7, batch_size=batch, **options,
    )  # fmt: skip
    dl = DataLoader(ds, batch_size=None if batch else 32, num_workers=workers)
    out = []
    for b in dl:
        for i in range(len(b["patient_id"])):
            out.append(
                {
                    "x": int(b["x"][i]),
                    "y": int(b["y"][i]),
                    "target": int(b["target"][i]),
                    "image": b["image"][i].numpy(),
                    "mask": b["mask"][i].numpy() if "mask" in b else None,
                }
            )
    return out


# -- readers --------------------------------------------------------------------------------------


def test_geojson_reader_reads_qupath_export(painted: dict[str, Path], caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        ann = bst.read_annotations(painted["geojson"])
    assert ann.kind is bst.AnnotationKind.GEOJSON
    assert ann.classes == ("Tumor", "Stroma", "Necrosis")  # the unclassified one has class None
    assert [r.name for r in ann.regions] == ["Tumor", "Stroma", "Necrosis", None]
    expected = shapely.geometry.shape(rg.GEOMETRIES["Tumor"])
    assert ann.area("Tumor") == pytest.approx(expected.area)
    assert ann.geometry("Tumor").symmetric_difference(expected).area == pytest.approx(0)
    assert "without area" in caplog.text  # the point


@pytest.mark.parametrize(
    "document",
    [
        pytest.param(lambda f: f, id="feature-collection"),
        pytest.param(lambda f: f["features"], id="feature-list"),
        pytest.param(lambda f: [x["geometry"] for x in f["features"][:1]], id="bare-geometries"),
        pytest.param(lambda f: f["features"][0], id="one-feature"),
        pytest.param(
            lambda f: {
                "type": "Feature",
                "properties": {"classification": {"name": "Tumor"}},
                "geometry": {
                    "type": "GeometryCollection",
                    "geometries": [f["features"][0]["geometry"]],
                },
            },
            id="geometry-collection",
        ),
    ],
)
def test_geojson_layouts_give_the_same_tumour(painted: dict[str, Path], tmp_path: Path, document: Any) -> None:
    full = json.loads(painted["geojson"].read_text())
    path = tmp_path / "x.json"
    path.write_text(json.dumps(document(full)))
    ann = bst.read_annotations(path)
    union = shapely.union_all([r.geometry for r in ann.regions[:1]])
    assert union.area == pytest.approx(shapely.geometry.shape(rg.GEOMETRIES["Tumor"]).area)


def test_asap_reader_cuts_the_exclusion_group(painted: dict[str, Path]) -> None:
    geo = bst.read_annotations(painted["geojson"])
    asap = bst.read_annotations(painted["asap"])
    assert asap.kind is bst.AnnotationKind.ASAP
    assert asap.classes == ("Tumor", "Stroma", "Necrosis")  # "_2" is holes, not a class
    for name in asap.classes:
        assert asap.geometry(name).equals_exact(geo.geometry(name), 0)
    # Without the exclusion, the hole is filled.
    filled = bst.read_annotations(painted["asap"], exclude=())
    assert filled.area("Tumor") == pytest.approx(geo.area("Tumor") + 300 * 300)
    assert "_2" in filled.classes


def test_label_mask_reader(painted: dict[str, Path]) -> None:
    geo = bst.read_annotations(painted["geojson"])
    mask = bst.read_annotations(painted["mask"], downsample=4, labels={"Tumor": 1, "Stroma": 2})
    assert mask.kind is bst.AnnotationKind.MASK and mask.classes == ("Tumor", "Stroma")
    painted_regions = geo.layers(["Tumor", "Stroma", "Necrosis"])  # what the mask was drawn from
    for k, name in enumerate(mask.classes):  # a staircase of 4-px cells around the outlines
        truth = painted_regions.geometries[k]
        assert mask.geometry(name).symmetric_difference(truth).area < 0.02 * truth.area
    plain = bst.read_annotations(painted["mask"], downsample=4)  # values as class names
    assert plain.classes == ("1", "2", "3")
    with pytest.raises(bst.ConfigError, match="downsample"):
        bst.read_annotations(painted["mask"])


def test_unknown_suffix_needs_a_kind(tmp_path: Path) -> None:
    path = tmp_path / "regions.txt"
    path.write_text('{"type": "FeatureCollection", "features": []}')
    with pytest.raises(bst.ConfigError, match="suffix"):
        bst.read_annotations(path)
    assert bst.read_annotations(path, kind="geojson").regions == ()


# -- bad files ------------------------------------------------------------------------------------


def _write(tmp_path: Path, name: str, content: Any) -> Path:
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def _feature(coordinates: Any, name: str = "Tumor", kind: str = "Polygon") -> dict[str, Any]:
    return {"type": "Feature", "geometry": {"type": kind, "coordinates": coordinates},
            "properties": {"classification": {"name": name}}}  # fmt: skip


def test_invalid_json_names_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path, "bad.geojson", '{"type": "FeatureCollection", "features": [')
    with pytest.raises(bst.AnnotationError, match="not valid JSON") as info:
        bst.read_annotations(path)
    assert info.value.path == path and isinstance(info.value, bst.SlideError)


def test_invalid_xml_names_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path, "bad.xml", "<ASAP_Annotations><Annotations>")
    with pytest.raises(bst.AnnotationError, match="not valid XML"):
        bst.read_annotations(path)


def test_bad_coordinates_name_the_object(tmp_path: Path) -> None:
    good = _feature([[[0, 0], [10, 0], [10, 10], [0, 0]]])
    path = _write(tmp_path, "a.geojson", [good, _feature([[["a", 0], [1]]], name="Stroma")])
    with pytest.raises(bst.AnnotationError, match=r"feature 1 \(class 'Stroma'\)"):
        bst.read_annotations(path)
    path = _write(tmp_path, "b.geojson", [{"type": "Feature", "id": "x7", "properties": {}}])
    with pytest.raises(bst.AnnotationError, match=r"feature 0 .*'x7'.* no geometry"):
        bst.read_annotations(path)
    path = _write(tmp_path, "c.xml", '<ASAP_Annotations><Annotations><Annotation Name="A" '
                  'PartOfGroup="Tumor"><Coordinates><Coordinate Order="0" X="1" Y="zz"/>'
                  "</Coordinates></Annotation></Annotations></ASAP_Annotations>")  # fmt: skip
    with pytest.raises(bst.AnnotationError, match="annotation 'A'"):
        bst.read_annotations(path)


def test_self_intersecting_polygon_is_repaired_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bowtie = _feature([[[0, 0], [100, 100], [100, 0], [0, 100], [0, 0]]])
    path = _write(tmp_path, "bowtie.geojson", [bowtie])
    with caplog.at_level(logging.WARNING):
        ann = bst.read_annotations(path)
    assert "make_valid" in caplog.text and "feature 0" in caplog.text
    assert ann.regions[0].geometry.is_valid
    assert ann.area("Tumor") == pytest.approx(5000)  # two triangles of 2500 each


def test_regions_outside_the_slide(painted: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    outside = _feature([[[5000, 5000], [6000, 5000], [6000, 6000], [5000, 5000]]])
    partly = _feature([[[1900, 1900], [2500, 1900], [2500, 2500], [1900, 1900]]], name="Stroma")
    reader = bst.open_slide(painted["slide"])
    try:
        path = _write(tmp_path, "partly.geojson", [partly])
        with caplog.at_level(logging.WARNING):
            regions = patient_regions(bst.Record(path), ["Stroma"], reader)
        assert "clipped" in caplog.text
        assert regions.geometries[0].bounds[2] <= rg.SIDE
        path = _write(tmp_path, "outside.geojson", [partly, outside])
        with pytest.raises(bst.AnnotationError, match=r"feature 1 .* lies outside the 2048x2048"):
            patient_regions(bst.Record(path), ["Tumor"], reader)
    finally:
        reader.close()


def test_file_without_the_classes_is_refused_or_skipped(painted: dict[str, Path], tmp_path: Path) -> None:
    other = _write(tmp_path, "other.geojson", [_feature([[[0, 0], [500, 0], [500, 500], [0, 0]]], name="Tumour")])
    patients = [
        bst.Patient("good", {"wsi": bst.Record(painted["slide"]), "annotations": bst.Record(painted["geojson"])}),
        bst.Patient("typo", {"wsi": bst.Record(painted["slide"]), "annotations": bst.Record(other)}),
    ]
    ds = bst.Dataset("mixed", patients)
    loader = bst.RandomRegionLoader(512, annotations="annotations", classes=["Tumor"])
    with pytest.raises(bst.AnnotationError, match=r"other.geojson.*no region of the classes \['Tumor'\].*'Tumour'"):
        bst.BigSmallDataset(ds, loader, bst.RandomCropCollector(64), buffer_size=2, samples_per_epoch=8,
                            smallchunks_per_bigchunk=4)  # fmt: skip
    kept = bst.BigSmallDataset(ds, loader, bst.RandomCropCollector(64), buffer_size=2, samples_per_epoch=8,
                               smallchunks_per_bigchunk=4, on_error="skip")  # fmt: skip
    assert "typo" in kept.skipped and "no region" in kept.skipped["typo"]
    assert [s["patient_id"] for s in kept] == ["good"] * 8


def test_config_errors() -> None:
    with pytest.raises(bst.ConfigError, match="classes"):
        bst.RandomRegionLoader(512, annotations="annotations")
    with pytest.raises(bst.ConfigError, match="classes"):
        bst.RandomRegionLoader(512, annotations="annotations", classes=["A", "A"])
    with pytest.raises(bst.ConfigError, match="needs annotations"):
        bst.RandomRegionLoader(512, classes=["A"])
    with pytest.raises(bst.ConfigError, match="background"):
        bst.RandomRegionLoader(512, annotations="annotations", classes=["A"], background="B")
    with pytest.raises(bst.ConfigError, match="exclusive"):
        bst.RandomRegionLoader(512, annotations="annotations", classes=["A"], tissue_only=True)
    with pytest.raises(bst.ConfigError, match="balance"):
        bst.RandomRegionLoader(512, annotations="annotations", classes=["A"], balance="rare")
    with pytest.raises(bst.ConfigError, match="target"):
        bst.RandomCropCollector(64, target="middle")
    with pytest.raises(bst.ConfigError, match="min_coverage"):
        bst.RandomCropCollector(64, min_coverage=1.5)
    with pytest.raises(bst.ConfigError, match="True needs annotations"):
        bst.SlidingWindowDataset(bst.Dataset("d", [bst.Patient("p", {"wsi": bst.Record("x.tiff")})]), 64, masks=True)


def test_masks_need_a_loader_with_labels(painted: dict[str, Path]) -> None:
    with pytest.raises(bst.ConfigError, match="needs big chunks with labels"):
        bst.BigSmallDataset(cohort(painted), bst.RandomRegionLoader(512), bst.RandomCropCollector(64, masks=True),
                            buffer_size=2, samples_per_epoch=8, smallchunks_per_bigchunk=4)  # fmt: skip


def test_missing_shapely_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "shapely", None)
    with pytest.raises(bst.MissingDependencyError, match=r"bigsmall-torch\[annotations\]"):
        bst.RandomRegionLoader(512, annotations="annotations", classes=["A"])


# -- labels against the paint ---------------------------------------------------------------------


def _check_against_paint(samples: list[dict[str, Any]], patch: int, classes: tuple[str, ...] = CLASSES,
                         *, downsample: float = 1.0, agree: float = 0.99) -> None:  # fmt: skip
    """Targets equal the painted class at every patch centre away from outlines; masks agree with
    the paint on at least ``agree`` of the pixels."""
    centre = patch // 2
    xs = np.array([s["x"] + (centre + 0.5) * downsample for s in samples])
    ys = np.array([s["y"] + (centre + 0.5) * downsample for s in samples])
    away = rg.distance_to_outlines(xs, ys) > 4 * downsample
    assert away.sum() > 0.5 * len(samples)
    matched = total = 0
    for s, far in zip(samples, away, strict=True):
        paint = rg.painted_class(s["image"], classes)
        if far:
            assert s["target"] == int(paint[centre, centre]) - 1, (s["x"], s["y"])
        if s["mask"] is not None:
            matched += int((paint == s["mask"]).sum())
            total += paint.size
    if total:
        assert matched / total >= agree


@pytest.mark.parametrize("batch", [None, 32], ids=["per-sample", "batched"])
def test_targets_and_masks_match_the_paint(painted: dict[str, Path], batch: int | None) -> None:
    samples = stream(cohort(painted), batch=batch, workers=2)
    assert len(samples) == 256
    _check_against_paint(samples, 64)
    assert {s["target"] for s in samples} == {-1, 0, 1}
    for s in samples:  # the centre rule on the mask itself
        assert s["target"] == int(s["mask"][32, 32]) - 1


def test_geojson_and_asap_give_the_same_stream(painted: dict[str, Path]) -> None:
    a = stream(cohort(painted, "geojson"), samples=128)
    b = stream(cohort(painted, "asap"), samples=128)
    assert [(s["x"], s["y"], s["target"]) for s in a] == [(s["x"], s["y"], s["target"]) for s in b]
    assert all((p["mask"] == q["mask"]).all() and (p["image"] == q["image"]).all() for p, q in zip(a, b, strict=True))


def test_label_mask_records(painted: dict[str, Path]) -> None:
    # Default: value k + 1 is classes[k]; downsample from the slide's size over the mask's.
    samples = stream(cohort(painted, "mask"), samples=128)
    _check_against_paint(samples, 64, agree=0.97)
    named = stream(cohort(painted, "mask", {"downsample": 4, "labels": {"Tumor": 1, "Stroma": 2}}), samples=128)
    assert [(s["x"], s["y"], s["target"]) for s in named] == [(s["x"], s["y"], s["target"]) for s in samples]


def test_overlap_goes_to_the_later_class_and_holes_are_outside(painted: dict[str, Path]) -> None:
    reader = bst.open_slide(painted["slide"])
    try:
        record = bst.Record(painted["geojson"])
        forward = patient_regions(record, ["Tumor", "Stroma"], reader)
        backward = patient_regions(record, ["Stroma", "Tumor"], reader)
    finally:
        reader.close()
    corner = np.array([1200.5]), np.array([1100.5])  # inside both outlines
    hole = np.array([750.5]), np.array([750.5])
    assert forward.labels_at(*corner)[0] == 1 and backward.labels_at(*corner)[0] == 1  # "Tumor" last
    assert forward.labels_at(*hole)[0] == -1
    raster = forward.rasterize(1100, 1000, 300, 300)
    assert raster[0, 0] == 2 and (raster[:, :100] == 2).all()  # Stroma over the tumour's corner


@pytest.mark.parametrize(
    "resolution", [{"level": 1}, {"mpp": 1.0}, {"mpp": 0.8}], ids=["level-1", "mpp-1.0", "mpp-0.8-resampled"]
)
def test_coarser_resolutions(painted: dict[str, Path], tmp_path: Path, resolution: dict[str, Any]) -> None:
    samples = stream(cohort(painted), samples=96, chunk=384, patch=48, loader_options=resolution)
    level = resolution.get("level")
    downsample = 2.0 if level == 1 else resolution["mpp"] / 0.5
    _check_against_paint(samples, 48, downsample=downsample, agree=0.98)


# -- placement and balance ------------------------------------------------------------------------


def test_chunks_are_placed_on_the_regions(painted: dict[str, Path]) -> None:
    samples = stream(cohort(painted), samples=512, chunk=256, patch=32)
    inside = np.mean([s["target"] >= 0 for s in samples])
    reader = bst.open_slide(painted["slide"])
    try:
        union = patient_regions(bst.Record(painted["geojson"]), list(CLASSES), reader).union
    finally:
        reader.close()
    assert union.area / rg.SIDE**2 < 0.45  # the regions cover less than half of the slide ...
    assert inside > 0.8  # ... but most patches fall inside them


def test_class_balanced_sampling_gives_equal_shares(painted: dict[str, Path]) -> None:
    classes = ("Tumor", "Stroma", "Necrosis")

    def shares(balance: str, samples: int) -> np.ndarray:
        drawn = stream(cohort(painted), classes=classes, samples=samples, chunk=256, patch=32, per_chunk=4,
                       batch=500, collector_options={"masks": False},
                       loader_options={"balance": balance})  # fmt: skip
        counts = np.bincount([s["target"] + 1 for s in drawn], minlength=4)
        assert counts.sum() == samples
        return counts[1:] / counts.sum()

    equal = shares("equal", 10_000)
    assert np.abs(equal - 1 / 3).max() < 0.03, equal  # every patch centred on its chunk's class
    by_area = shares("area", 3_000)
    # In proportion to area (crops anywhere in the chunk): tumour, then stroma, then necrosis.
    assert by_area[0] > by_area[1] > by_area[2] and by_area[2] < 0.15, by_area


def test_target_by_area_and_min_coverage(painted: dict[str, Path]) -> None:
    samples = stream(cohort(painted), samples=256, patch=64, collector_options={"target": "area", "min_coverage": 0.6})
    for s in samples:
        counts = np.bincount(s["mask"].ravel(), minlength=3)
        assert counts[1:].sum() >= 0.6 * s["mask"].size  # mostly inside a region
        assert s["target"] + 1 == len(counts) - 1 - int(np.argmax(counts[::-1]))  # the largest, ties later


def test_background_class_is_tissue_outside_the_regions(painted: dict[str, Path]) -> None:
    pytest.importorskip("skimage", reason="background needs the [tissue] extra")
    classes = ("Normal", "Tumor", "Stroma")
    samples = stream(cohort(painted), classes=classes, samples=256, chunk=256, patch=32,
                     loader_options={"background": "Normal", "balance": "equal"})  # fmt: skip
    targets = np.array([s["target"] for s in samples])
    assert np.abs(np.bincount(targets + 1, minlength=4)[1:] / len(targets) - 1 / 3).max() < 0.1
    for s in samples:  # background pixels are texture (not painted in a class colour)
        paint = rg.painted_class(s["image"], ("Tumor", "Stroma", "Necrosis"))
        normal = s["mask"] == 1
        assert (paint[normal] == 0).mean() > 0.95 if normal.any() else True


def test_bands_when_workers_outnumber_patients(painted: dict[str, Path]) -> None:
    samples = stream(cohort(painted), samples=256, workers=2, chunk=256, patch=32)
    assert len(samples) == 256
    _check_against_paint(samples, 32)
    # Each worker's samples stay in its band: the slide cut along x where each side holds half of
    # the annotated area.
    reader = bst.open_slide(painted["slide"])
    try:
        cut = patient_regions(bst.Record(painted["geojson"]), list(CLASSES), reader).cuts(2, 0, rg.SIDE)[1]
    finally:
        reader.close()
    left = [s for s in samples if s["x"] + 32 <= round(cut)]
    right = [s for s in samples if s["x"] >= round(cut)]
    assert len(left) + len(right) == len(samples) and left and right


def test_equal_seeds_equal_streams_and_a_scheduler(painted: dict[str, Path]) -> None:
    two = [painted, painted]
    patients = [
        bst.Patient(f"p{i}", {"wsi": bst.Record(p["slide"]), "annotations": bst.Record(p["geojson"])}, label=i)
        for i, p in enumerate(two)
    ]
    ds = bst.Dataset("two", patients)
    a = stream(ds, samples=64, workers=2, scheduler=bst.LabelBalancedScheduler())
    b = stream(ds, samples=64, workers=2, scheduler=bst.LabelBalancedScheduler())
    assert [(s["x"], s["y"], s["target"]) for s in a] == [(s["x"], s["y"], s["target"]) for s in b]


def test_dataset_with_annotations_pickles(painted: dict[str, Path]) -> None:
    loader = bst.RandomRegionLoader(512, annotations="annotations", classes=list(CLASSES))
    ds = bst.BigSmallDataset(cohort(painted), loader, bst.RandomCropCollector(64, masks=True),
                             buffer_size=2, samples_per_epoch=8, smallchunks_per_bigchunk=4, seed=1)  # fmt: skip
    copy = pickle.loads(pickle.dumps(ds))
    first = [(int(s["x"]), int(s["y"]), int(s["target"])) for s in ds]
    assert first == [(int(s["x"]), int(s["y"]), int(s["target"])) for s in copy]


# -- sliding windows ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["geojson", "asap"])
def test_sliding_windows_on_the_regions(painted: dict[str, Path], kind: str) -> None:
    ds = bst.SlidingWindowDataset(cohort(painted, kind), 128, annotations="annotations", classes=list(CLASSES),
                                  masks=True, batch_size=16)  # fmt: skip
    grid = ds.grid("p")
    union = shapely.union_all([shapely.geometry.shape(rg.GEOMETRIES[c]) for c in CLASSES])
    expected = {
        (r, c)
        for r in range(grid.rows)
        for c in range(grid.cols)
        if union.intersection(shapely.box(c * 128, r * 128, (c + 1) * 128, (r + 1) * 128)).area > 0
    }
    assert {tuple(rc) for rc in np.argwhere(grid.include)} == expected
    assert len(expected) < grid.rows * grid.cols
    samples = []
    for b in DataLoader(ds, batch_size=None, num_workers=2):
        for i in range(len(b["patient_id"])):
            samples.append({"x": int(b["x"][i]), "y": int(b["y"][i]), "target": int(b["target"][i]),
                            "image": b["image"][i].numpy(), "mask": b["mask"][i].numpy()})  # fmt: skip
    assert sorted((s["y"] // 128, s["x"] // 128) for s in samples) == sorted(expected)
    _check_against_paint(samples, 128)
    for s in samples:
        assert s["target"] == int(s["mask"][64, 64]) - 1
        assert s["target"] == int(grid.targets[s["y"] // 128, s["x"] // 128])


def test_sliding_windows_without_masks_carry_targets(painted: dict[str, Path]) -> None:
    ds = bst.SlidingWindowDataset(cohort(painted), 256, annotations="annotations", classes=["Necrosis"])
    samples = list(ds)
    assert samples and all("mask" not in s for s in samples)
    assert {s["target"] for s in samples} == {-1, 0}


def _to_float(images: Any) -> Any:
    return images.float()


@pytest.mark.parametrize("transform", [None, _to_float], ids=["kept-batches", "transform"])
def test_batched_masks_travel_in_the_batch_slot(painted: dict[str, Path], transform: Any) -> None:
    """Masks share the images' shared-memory slot; keeping every batch (more batches than slots)
    or replacing the image in a transform must never let a reused slot change a delivered mask."""
    loader = bst.RandomRegionLoader(256, annotations="annotations", classes=list(CLASSES))
    ds = bst.BigSmallDataset(cohort(painted), loader, bst.RandomCropCollector(32, masks=True), buffer_size=2,
                             smallchunks_per_bigchunk=8, samples_per_epoch=8 * 40, batch_size=8, seed=3,
                             transform=transform)  # fmt: skip
    kept = list(DataLoader(ds, batch_size=None, num_workers=2))
    assert len(kept) == 40  # more than a worker's 16 slots: kept batches force one-off buffers
    for b in kept:
        assert b["mask"].shape == (8, 32, 32) and b["mask"].dtype == torch.uint8
        image = b["image"].to(torch.uint8).numpy()
        for i in range(8):
            paint = rg.painted_class(image[i], CLASSES)
            assert (paint == b["mask"][i].numpy()).mean() > 0.9
            assert int(b["target"][i]) == int(b["mask"][i, 16, 16]) - 1


def test_per_sample_masks_travel_in_the_workers_slots(painted: dict[str, Path]) -> None:
    """Per-sample mode: default_collate stacks images and masks into the worker's slots; batches
    kept past the slots' number keep their masks, equal to torch's own collate and to the paint."""
    def dataset() -> bst.BigSmallDataset:
        loader = bst.RandomRegionLoader(256, annotations="annotations", classes=list(CLASSES))
        return bst.BigSmallDataset(cohort(painted), loader, bst.RandomCropCollector(32, masks=True),
                                   buffer_size=2, smallchunks_per_bigchunk=8, samples_per_epoch=8 * 40,
                                   seed=3)  # fmt: skip

    def plain_collate(batch: list[dict[str, Any]]) -> Any:
        return torch.utils.data.default_collate([dict(sample) for sample in batch])

    kept = list(DataLoader(dataset(), batch_size=8, num_workers=2))
    reference = list(DataLoader(dataset(), batch_size=8, num_workers=2, collate_fn=plain_collate))
    assert len(kept) == len(reference) == 40  # more than a worker's 16 slots
    for b, r in zip(kept, reference, strict=True):
        assert b["mask"].shape == (8, 32, 32) and b["mask"].dtype == torch.uint8
        assert torch.equal(b["mask"], r["mask"]) and torch.equal(b["image"], r["image"])
        assert torch.equal(b["target"], r["target"]) and torch.equal(b["x"], r["x"])
        for i in range(8):
            paint = rg.painted_class(b["image"][i].numpy(), CLASSES)
            assert (paint == b["mask"][i].numpy()).mean() > 0.9


# -- a real slide ---------------------------------------------------------------------------------


def test_real_slide_patches_masks_and_windows(cmu1: Path, tmp_path: Path) -> None:
    """A QuPath-style outline on the real Aperio slide: pixels equal the reader at the reported
    coordinates, masks equal an independent point-in-polygon test at every 7th pixel centre (off
    the outline itself), and the windows kept are exactly those sharing area with the outline."""
    outline = [[[300, 250], [1700, 300], [1850, 1300], [900, 1900], [350, 1400], [300, 250]],
               [[900, 800], [1200, 800], [1100, 1100], [900, 800]]]  # fmt: skip
    path = _write(tmp_path, "cmu1.geojson", {"type": "FeatureCollection", "features": [_feature(outline)]})
    polygon = shapely.geometry.Polygon(outline[0], outline[1:])
    ds = bst.Dataset("real", [bst.Patient("cmu1", {"wsi": bst.Record(cmu1), "annotations": bst.Record(path)})])
    samples = stream(ds, classes=("Tumor",), samples=64, chunk=768, patch=96, workers=2, batch=16)
    reader = bst.open_slide(cmu1)
    try:
        for s in samples:
            assert (reader.read(s["x"], s["y"], 0, 96, 96).transpose(2, 0, 1) == s["image"]).all()
            j, i = np.mgrid[0:96:7, 0:96:7]
            cx, cy = s["x"] + i + 0.5, s["y"] + j + 0.5
            inside = shapely.contains_xy(polygon, cx, cy)
            on_edge = shapely.intersects_xy(polygon.boundary, cx, cy)  # the half-open rule decides
            assert ((s["mask"][j, i] == inside) | on_edge).all()
    finally:
        reader.close()
    share = polygon.area / (2220 * 2967)  # of the slide (about a quarter)
    assert np.mean([s["target"] == 0 for s in samples]) > 1.5 * share  # chunks sit on the outline
    windows = bst.SlidingWindowDataset(ds, 256, annotations="annotations", classes=["Tumor"])
    grid = windows.grid("cmu1")
    expected = {
        (r, c)
        for r in range(grid.rows)
        for c in range(grid.cols)
        if polygon.intersection(shapely.box(c * 256, r * 256, (c + 1) * 256, (r + 1) * 256)).area > 0
    }
    assert {tuple(rc) for rc in np.argwhere(grid.include)} == expected
    assert len(windows) == len(expected)


# -- review regressions ---------------------------------------------------------------------------


class _PickledInWorker(torch.utils.data.IterableDataset):  # type: ignore[type-arg]
    """Pickles every batch inside the worker (a log, a cache) before handing the original on."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __iter__(self) -> Any:
        for batch in self.inner:
            pickle.loads(pickle.dumps(batch))
            yield batch


def test_a_batch_pickled_twice_keeps_its_masks(painted: dict[str, Path]) -> None:
    """The second pickling of a batch copies everything that views the slot, masks included, so
    slot reuse never changes a batch the main process holds."""
    loader = bst.RandomRegionLoader(256, annotations="annotations", classes=list(CLASSES))
    ds = bst.BigSmallDataset(cohort(painted), loader, bst.RandomCropCollector(128, masks=True), buffer_size=2,
                             smallchunks_per_bigchunk=8, samples_per_epoch=8 * 40, batch_size=8, seed=3)  # fmt: skip
    kept = []
    for n, b in enumerate(DataLoader(_PickledInWorker(ds), batch_size=None, num_workers=1)):
        if n < 3:  # keep only the masks of the first batches; the slots go back meanwhile
            kept.append((b["mask"], b["mask"].clone()))
        del b
    assert all(torch.equal(mask, copy) for mask, copy in kept)


def test_bands_are_cut_by_annotated_area(painted: dict[str, Path]) -> None:
    """With one region in the left quarter and two workers, each worker's band still holds half of
    the annotated area (cut by area, not by slide width), so neither runs dry."""
    samples = stream(cohort(painted), classes=("Necrosis",), samples=128, workers=2, chunk=256, patch=32)
    assert len(samples) == 128
    xs = [s["x"] + 16 for s in samples]  # patch centres
    assert max(xs) < 800 and min(xs) >= 200 - 128  # on and around the necrosis (x 200-700)
    assert min(xs) < 450 < max(xs)  # both halves of it: both workers sampled
    assert np.mean([s["target"] == 0 for s in samples]) > 0.6


def test_qupath_derived_classes_strings_and_stray_objects(painted: dict[str, Path], tmp_path: Path) -> None:
    derived = {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [50, 0], [50, 50], [0, 0]]]},
               "properties": {"classification": {"names": ["Tumor", "Positive"], "color": [1, 2, 3]}}}  # fmt: skip
    assert bst.read_annotations(_write(tmp_path, "d.geojson", [derived])).classes == ("Tumor: Positive",)
    with pytest.raises(bst.ConfigError, match="exclude"):
        patient_regions(bst.Record(painted["asap"], {"exclude": "_2"}), ["Tumor"], bst.open_slide(painted["slide"]))
    # An unclassified object off the slide does not refuse a patient that asks only for Tumor.
    stray = _feature([[[5000, 5000], [6000, 5000], [6000, 6000], [5000, 5000]]], name="Other")
    path = _write(tmp_path, "s.geojson", [_feature([[[0, 0], [500, 0], [500, 500], [0, 0]]]), stray])
    regions = patient_regions(bst.Record(path), ["Tumor"], bst.open_slide(painted["slide"]))
    assert regions.area(0) == pytest.approx(125_000)


def test_one_bit_mask_and_mask_pictures_with_classes(painted: dict[str, Path], tmp_path: Path) -> None:
    from PIL import Image

    bits = np.zeros((512, 512), dtype=bool)
    bits[100:200, 50:150] = True
    Image.fromarray(bits).save(tmp_path / "bits.png")  # mode "1"
    ann = bst.read_annotations(tmp_path / "bits.png", downsample=4)
    assert ann.classes == ("1",) and ann.area("1") == pytest.approx(100 * 100 * 16)
    # Pictures read a label mask record as the loaders do: value k + 1 is classes[k].
    recorder = bst.SamplingRecorder()
    plain = bst.BigSmallDataset(cohort(painted), bst.RandomRegionLoader(256), bst.RandomCropCollector(32),
                                buffer_size=2, smallchunks_per_bigchunk=4, samples_per_epoch=8)  # fmt: skip
    recorder.update(next(iter(DataLoader(plain, batch_size=8))))
    out = bst.render_sampling(painted["slide"], recorder.records("p"), tmp_path / "m.png",
                              annotations=bst.Record(painted["mask"]), classes=["Tumor", "Stroma"])  # fmt: skip
    assert out.exists()


def test_more_construction_checks(painted: dict[str, Path]) -> None:
    with pytest.raises(bst.ConfigError, match="balance"):
        bst.RandomRegionLoader(512, balance="equal")
    with pytest.raises(bst.ConfigError, match="needs big chunks with labels"):
        bst.BigSmallDataset(cohort(painted), bst.RandomRegionLoader(512),
                            bst.ChunkInfoCollector(bst.RandomCropCollector(64, masks=True)),
                            buffer_size=2, samples_per_epoch=8, smallchunks_per_bigchunk=4)  # fmt: skip


class _BFloatInfo(bst.RandomCropCollector):
    """Adds a bfloat16 vector to each sample: numpy cannot hold it, so it is collated, not slotted."""

    def extract_smallchunk(self, call_count: int, bigchunk: Any, ctx: Any) -> Any:
        small = super().extract_smallchunk(call_count, bigchunk, ctx)
        if small is not None:
            small.info["embedding"] = torch.ones(4, dtype=torch.bfloat16)
        return small


def test_info_tensors_numpy_cannot_hold_are_collated(painted: dict[str, Path]) -> None:
    ds = bst.BigSmallDataset(cohort(painted), bst.RandomRegionLoader(256), _BFloatInfo(32), buffer_size=2,
                             smallchunks_per_bigchunk=4, samples_per_epoch=16, batch_size=8)  # fmt: skip
    batches = list(DataLoader(ds, batch_size=None, num_workers=1))
    assert [b["embedding"].shape for b in batches] == [(8, 4), (8, 4)]
    assert all(b["embedding"].dtype == torch.bfloat16 for b in batches)


@pytest.mark.parametrize("share", ["common", "rare"])
def test_focus_centres_are_uniform_over_the_class(share: str) -> None:
    """A patch centred on a class: every centre of the class that fits is drawn equally often,
    whether the draw is kept by rejection (a common class) or taken from the chunk's list of the
    class's centres (a rare class, after the rejection draws miss), and the same random numbers are
    drawn with and without that list cached (a resumed chunk comes back without it)."""
    labels = np.zeros((40, 40), dtype=np.uint8)
    if share == "common":
        labels[:, :20] = 1  # half the chunk
    else:
        labels[[10, 20, 31], [12, 25, 8]] = 1
    patient = bst.Patient("p", {"wsi": bst.Record("p.svs")})
    chunk = bst.BigChunk(np.zeros((40, 40, 3), np.uint8), {"focus": 0, "classes": ["T"]}, patient, labels)
    collector = bst.RandomCropCollector(8, masks=True)
    draws = 20000
    ctx = bst.ChunkContext(rng=np.random.default_rng(0), state={}, slides=None)  # type: ignore[arg-type]
    counts: dict[tuple[int, int], int] = {}
    for _ in range(draws):
        small = collector.extract_smallchunk(0, chunk, ctx)
        assert small is not None and small.info["target"] == 0
        key = (small.info["x"], small.info["y"])
        counts[key] = counts.get(key, 0) + 1
    centres = np.argwhere(labels[4:37, 4:37] == 1)  # (row, col) of centres of patches that fit
    assert set(counts) == {(int(c), int(r)) for r, c in centres}
    expected = draws / len(centres)
    assert max(abs(n - expected) for n in counts.values()) < 5 * expected**0.5 + 1
    # The cache does not change the random numbers drawn.
    fresh = bst.BigChunk(chunk.data, chunk.info, patient, labels)
    a, b = np.random.default_rng(1), np.random.default_rng(1)
    for _ in range(50):
        got = [
            collector.extract_smallchunk(0, c, bst.ChunkContext(rng=r, state={}, slides=None))  # type: ignore[arg-type]
            for c, r in ((chunk, a), (fresh, b))
        ]
        assert (got[0].info["x"], got[0].info["y"]) == (got[1].info["x"], got[1].info["y"])  # type: ignore[union-attr]
        fresh.cache.clear()
