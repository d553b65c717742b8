"""Recording where samples came from and drawing them on the thumbnail; the heatmap colour map."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

import bigsmall_torch as bst
from bigsmall_torch.synthetic import SyntheticSlideInfo, write_synthetic_slide
from bigsmall_torch.visualize import (
    ChunkInfoCollector,
    SamplingRecorder,
    blend,
    colormap,
    render_sampling,
    safe_names,
    sampling_overlay,
    slide_thumbnail,
)

CHUNK_COLOR = (255, 140, 0)


@pytest.fixture(scope="module")
def blobs(tmp_path_factory: pytest.TempPathFactory) -> SyntheticSlideInfo:
    """A 2048x2048 slide (levels 1x, 2x) with a few blobs of tissue on glass."""
    return write_synthetic_slide(tmp_path_factory.mktemp("visualize") / "blobs.tiff", width=2048, height=2048,
                                 tissue="blobs", seed=5)  # fmt: skip


def stream(info: SyntheticSlideInfo, **kwargs: Any) -> bst.BigSmallDataset:
    data = bst.Dataset("v", [bst.Patient("blob slide", {"wsi": bst.Record(info.path)})])
    collector = ChunkInfoCollector(bst.RandomCropCollector(64, tissue_only=True, min_tissue=0.5))
    return bst.BigSmallDataset(data, bst.RandomRegionLoader(512, tissue_only=True), collector, buffer_size=2,
                               smallchunks_per_bigchunk=8, samples_per_epoch=128, seed=1, **kwargs)  # fmt: skip


def truth_on_thumbnail(info: SyntheticSlideInfo, shape: tuple[int, ...]) -> np.ndarray:
    """The slide's known tissue mask at the thumbnail's size."""
    mask = Image.fromarray(info.tissue_mask).resize((shape[1], shape[0]), Image.Resampling.NEAREST)
    return np.asarray(mask)


@pytest.mark.parametrize("batched", [False, True])
def test_records_equal_the_stream(blobs: SyntheticSlideInfo, batched: bool) -> None:
    ds = stream(blobs, batch_size=16 if batched else None)
    recorder = SamplingRecorder()
    seen = []
    for batch in DataLoader(ds, batch_size=None if batched else 16):
        recorder.update(batch)
        seen += list(
            zip(batch["x"].tolist(), batch["y"].tolist(), batch["chunk_x"].tolist(), strict=True)
        )
    assert (
        recorder.patients == ["blob slide"]
        and recorder.counts() == {"blob slide": 128}
        and len(recorder) == 128
    )
    records = recorder.records("blob slide")
    assert (
        list(
            zip(
                records.x.tolist(),
                records.y.tolist(),
                records.chunk_x.astype(int).tolist(),
                strict=True,
            )
        )
        == seen
    )
    assert (
        (records.width == 64).all() and (records.height == 64).all() and (records.level == 0).all()
    )
    assert (records.chunk_width == 512).all()
    info = bst.slide_info(blobs.path)
    boxes = records.boxes(info)
    assert np.array_equal(
        boxes, np.stack([records.x, records.y, np.full(128, 64), np.full(128, 64)], axis=1)
    )
    chunks = records.chunk_boxes(info)
    assert (
        len(chunks)
        == len({(x, y) for x, y in zip(records.chunk_x, records.chunk_y, strict=True)})
        > 1
    )
    assert (chunks[:, 2:] == 512).all()
    # every patch lies inside its big chunk
    assert ((records.x >= records.chunk_x) & (records.x + 64 <= records.chunk_x + 512)).all()


def test_single_samples_explicit_size_and_resolution(
    blobs: SyntheticSlideInfo, caplog: pytest.LogCaptureFixture
) -> None:
    recorder = SamplingRecorder(bigchunk_size=256)
    sample = {
        "image": torch.zeros(3, 32, 48),
        "patient_id": "p",
        "x": 100,
        "y": 200,
        "level": 1,
        "chunk_x": 0,
        "chunk_y": 0,
    }
    recorder.update(sample)  # one sample, not collated: level 1 of a 2x pyramid, no mpp
    recorder.update(
        {**sample, "x": 300, "mpp": 2.0}, patch_size=(10, 20)
    )  # 2 um/px on a 0.5 um/px slide: 4x
    info = bst.slide_info(blobs.path)
    records = recorder.records("p")
    assert records.boxes(info).tolist() == [[100, 200, 96, 64], [300, 200, 40, 80]]
    assert records.chunk_boxes(info).tolist() == [[0, 0, 512, 512], [0, 0, 1024, 1024]]  # sorted
    unsized = SamplingRecorder()  # chunk places but no chunk sizes: not drawn, and said so
    unsized.update(sample)
    assert len(unsized.records("p").chunk_boxes(info)) == 0
    sampling_overlay(np.zeros((64, 64, 3), np.uint8), info, unsized.records("p"))
    assert "pass SamplingRecorder(bigchunk_size=...)" in caplog.text
    with pytest.raises(bst.ConfigError, match="lacks"):
        recorder.update({"patient_id": ["p"], "x": [1]})
    with pytest.raises(bst.ConfigError, match=r"batch\['y'\] has shape \(1,\), expected \(2,\)"):
        recorder.update(
            {"patient_id": ["p", "p"], "x": [1, 2], "y": [1], "image": torch.zeros(2, 3, 4, 4)}
        )
    with pytest.raises(bst.ConfigError, match="nothing recorded for patient 'q'"):
        recorder.records("q")


def test_rendered_patches_fall_on_tissue(blobs: SyntheticSlideInfo, tmp_path: Path) -> None:
    ds = stream(blobs)
    recorder = SamplingRecorder()
    for batch in DataLoader(ds, batch_size=32):
        recorder.update(batch)
    records = recorder.records("blob slide")
    path = render_sampling(blobs.path, records, tmp_path / "patches.png", chunks=False)
    thumbnail, info = slide_thumbnail(blobs.path)
    with Image.open(path) as png:
        drawn = np.asarray(png.convert("RGB"))
    assert drawn.shape == thumbnail.shape == (1024, 1024, 3)
    changed = (drawn != thumbnail).any(axis=2)
    truth = truth_on_thumbnail(blobs, thumbnail.shape)
    assert (
        changed.sum() > 128 * 16
    )  # every 64 px patch is 32x32 thumbnail pixels; they overlap a little
    assert (changed & truth).sum() / changed.sum() > 0.8  # drawn where the tissue is
    assert truth.mean() < 0.5  # ... which is not most of the slide
    inside = np.zeros_like(changed)  # nothing is drawn outside the recorded patches
    for x, y, w, h in records.boxes(info) / 2:
        inside[int(y) : int(np.ceil(y + h)), int(x) : int(np.ceil(x + w))] = True
    assert not (changed & ~inside).any()
    with_chunks = sampling_overlay(thumbnail, info, records)
    assert (with_chunks == CHUNK_COLOR).all(
        axis=2
    ).sum() > 100  # big chunks outlined in their own colour


def test_render_all_writes_one_png_per_slide(blobs: SyntheticSlideInfo, tmp_path: Path) -> None:
    ds = stream(blobs)
    recorder = SamplingRecorder()
    for batch in DataLoader(ds, batch_size=64):
        recorder.update(batch)
    paths = recorder.render_all(ds, tmp_path, thumbnail_size=256)
    assert paths == {"blob slide": tmp_path / "blob_slide.png"}
    with Image.open(paths["blob slide"]) as png:
        assert png.size == (256, 256)
    other = bst.Dataset("o", [bst.Patient("x", {"wsi": bst.Record(blobs.path)})])
    with pytest.raises(bst.ConfigError, match="not in dataset 'o'"):
        recorder.render_all(other, tmp_path)
    with pytest.raises(bst.ConfigError, match="records must be SampledPatches"):
        render_sampling(blobs.path, "nope", tmp_path / "x.png")  # type: ignore[arg-type]


def test_colormap_blend_and_names() -> None:
    rgb = colormap(np.array([0.0, 0.5, 1.0, np.nan]), vmin=0, vmax=1)
    assert rgb.tolist() == [[68, 1, 84], [33, 145, 140], [253, 231, 37], [68, 1, 84]]
    image = np.full((2, 2, 3), 200, np.uint8)
    covered = np.array([[True, False], [True, False]])
    out, vmin, vmax = blend(image, np.array([[1.0, 9.0], [3.0, 9.0]]), covered, alpha=1.0)
    assert (
        (vmin, vmax) == (1.0, 3.0)
        and out[0, 0].tolist() == [68, 1, 84]
        and out[1, 0].tolist() == [253, 231, 37]
    )
    assert (out[:, 1] == 200).all()
    assert safe_names(["a b", "a_b", "A_B", "../x", 3]) == {
        "a b": "a_b",
        "a_b": "a_b_2",
        "A_B": "A_B_3",
        "../x": "x",
        3: "3",
    }
