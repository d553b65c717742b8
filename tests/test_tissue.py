"""Tissue masks on slides with known tissue, tissue-only sampling, the rendered picture."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import bigsmall_torch as bst
from bigsmall_torch.io.tissue import TissueDetector, render_tissue, tissue_mask
from bigsmall_torch.synthetic import SyntheticSlideInfo, write_synthetic_slide


@pytest.fixture(scope="module")
def tissue_slides(tmp_path_factory: pytest.TempPathFactory) -> dict[str, SyntheticSlideInfo]:
    folder = tmp_path_factory.mktemp("tissue")
    return {
        mode: write_synthetic_slide(folder / f"{mode}.tiff", width=4096, height=3072, tissue=mode, seed=11)
        for mode in ("blobs", "full", "none")
    }


def truth_fraction(info: SyntheticSlideInfo, x: float, y: float, w: float, h: float) -> float:
    d = info.mask_downsample
    return float(info.tissue_mask[int(y // d) : int(np.ceil((y + h) / d)), int(x // d) : int(np.ceil((x + w) / d))].mean())


@pytest.mark.parametrize("mode", ["blobs", "full", "none"])
def test_mask_matches_the_painted_tissue(tissue_slides: dict[str, SyntheticSlideInfo], mode: str) -> None:
    info = tissue_slides[mode]
    mask = tissue_mask(info.path)
    assert mask.fraction == pytest.approx(info.tissue_fraction, abs=0.03)
    truth = np.asarray(Image.fromarray(info.tissue_mask).resize(mask.mask.shape[::-1], Image.NEAREST))
    if mode == "blobs":
        iou = (truth & mask.mask).sum() / (truth | mask.mask).sum()
        assert iou > 0.9
    assert mask.downsample == pytest.approx((4096 / mask.mask.shape[1], 3072 / mask.mask.shape[0]))
    assert tissue_mask(info.path) is mask  # cached


def test_real_slide_mask(cmu1: Path) -> None:
    mask = tissue_mask(cmu1)
    assert 0.2 < mask.fraction < 0.5  # CMU-1-Small-Region: a strip of tissue on glass
    assert mask.fraction_in(0, 0, 300, 300) < 0.05  # the top-left corner is glass


def _tissue_ds(info: SyntheticSlideInfo, **kwargs: object) -> bst.BigSmallDataset:
    ds = bst.Dataset("t", [bst.Patient("p", {"wsi": bst.Record(info.path)})])
    return bst.BigSmallDataset(ds, kwargs.pop("loader"), kwargs.pop("collector"),  # type: ignore[arg-type]
                               buffer_size=2, smallchunks_per_bigchunk=8, samples_per_epoch=160, seed=2)


def test_tissue_only_chunks_and_min_tissue_crops(tissue_slides: dict[str, SyntheticSlideInfo]) -> None:
    info = tissue_slides["blobs"]
    loader = bst.RandomRegionLoader(512, tissue_only=True)
    collector = bst.RandomCropCollector(128, tissue_only=True, min_tissue=0.5)
    samples = list(_tissue_ds(info, loader=loader, collector=collector))
    assert len(samples) == 160
    fractions = [truth_fraction(info, s["x"], s["y"], 128, 128) for s in samples]
    assert min(fractions) >= 0.35 and np.mean(fractions) > 0.8
    # Without the tissue options, a good share of crops is glass (the contrast the options buy).
    plain = list(_tissue_ds(info, loader=bst.RandomRegionLoader(512), collector=bst.RandomCropCollector(128)))
    plain_fractions = [truth_fraction(info, s["x"], s["y"], 128, 128) for s in plain]
    assert np.mean(plain_fractions) < np.mean(fractions) - 0.2


def test_chunk_placement_is_weighted_by_tissue_area(tissue_slides: dict[str, SyntheticSlideInfo]) -> None:
    info = tissue_slides["blobs"]
    loader = bst.RandomRegionLoader(64, tissue_only=True, tile_aligned=False)
    samples = list(_tissue_ds(info, loader=loader, collector=bst.RandomCropCollector(64)))
    # 64x64 chunks centred on tissue cells: their centres are on tissue.
    on_tissue = [truth_fraction(info, s["x"] + 30, s["y"] + 30, 4, 4) > 0 for s in samples]
    assert np.mean(on_tissue) > 0.95


def test_aligned_tissue_chunks_still_hold_their_tissue_point(tissue_slides: dict[str, SyntheticSlideInfo]) -> None:
    info = tissue_slides["blobs"]
    for size in (64, 512):  # shorter than a tile (centred, off the grid) and longer (on the grid)
        loader = bst.RandomRegionLoader(size, tissue_only=True)
        samples = list(_tissue_ds(info, loader=loader, collector=bst.RandomCropCollector(size)))
        assert np.mean([truth_fraction(info, s["x"], s["y"], size, size) > 0 for s in samples]) > 0.95
        aligned = [s["x"] % 256 == 0 and s["y"] % 256 == 0 for s in samples]
        assert np.mean(aligned) > 0.5 if size == 512 else np.mean(aligned) < 0.2


def test_slide_without_tissue_stops_the_stream_clearly(tissue_slides: dict[str, SyntheticSlideInfo]) -> None:
    ds = _tissue_ds(tissue_slides["none"], loader=bst.RandomRegionLoader(512, tissue_only=True),
                    collector=bst.RandomCropCollector(64))
    with pytest.raises(bst.StreamError, match="returned no big chunk"):
        list(ds)


def test_render_tissue_draws_the_outline(tissue_slides: dict[str, SyntheticSlideInfo], tmp_path: Path) -> None:
    out = render_tissue(tissue_slides["blobs"].path, tmp_path / "mask.png")
    image = np.asarray(Image.open(out))
    assert image.shape[1] == 1024 and image.shape[2] == 3
    outline = np.all(image == (0, 200, 0), axis=2)
    assert 0.001 < outline.mean() < 0.2
    plain = render_tissue(tissue_slides["none"].path, tmp_path / "none.png")
    assert not np.all(np.asarray(Image.open(plain)) == (0, 200, 0), axis=2).any()


def test_bad_options_and_missing_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(bst.ConfigError, match=r"min_tissue must be a number in \[0, 1\]"):
        bst.RandomCropCollector(64, min_tissue=1.5)
    with pytest.raises(bst.ConfigError, match="thumbnail_size must be an int >= 16"):
        TissueDetector(thumbnail_size=4)
    with pytest.raises(bst.ConfigError, match="threshold must be in"):
        TissueDetector(threshold=2)
    monkeypatch.setitem(sys.modules, "skimage", None)
    with pytest.raises(bst.MissingDependencyError, match=r"pip install 'bigsmall-torch\[tissue\]'"):
        bst.RandomRegionLoader(512, tissue_only=True)
