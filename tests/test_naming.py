"""One vocabulary across the API: ``patch_size`` for patches, ``tissue_only``/``min_tissue`` for tissue
filtering, the types public methods return exported, and error classes that say what failed."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

import bigsmall_torch as bst
from bigsmall_torch.synthetic import write_synthetic_slide


def test_patch_size_is_the_keyword_everywhere() -> None:
    assert bst.RandomCropCollector(patch_size=64).patch_size == (64, 64)
    assert bst.RandomCropCollector((64, 32)).patch_size == (64, 32)
    recorder = bst.SamplingRecorder()
    recorder.update({"patient_id": ["a"], "x": [0], "y": [0]}, patch_size=(8, 4))
    assert (recorder.records("a").width[0], recorder.records("a").height[0]) == (8.0, 4.0)


def test_former_names_still_work_with_a_deprecation_warning() -> None:
    with pytest.warns(DeprecationWarning, match=r"size=\.\.\.\) is deprecated; use patch_size"):
        collector = bst.RandomCropCollector(size=48)
    assert collector.patch_size == (48, 48) == collector.size
    with pytest.raises(bst.ConfigError, match="pass patch_size only"):
        bst.RandomCropCollector(48, size=48)
    with pytest.raises(bst.ConfigError, match="patch_size is required"):
        bst.RandomCropCollector()
    recorder = bst.SamplingRecorder()
    with pytest.warns(DeprecationWarning, match="use patch_size"):
        recorder.update({"patient_id": ["a"], "x": [0], "y": [0]}, size=8)


def test_min_tissue_alone_still_filters_but_asks_for_tissue_only() -> None:
    with pytest.warns(DeprecationWarning, match="without tissue_only=True is deprecated"):
        legacy = bst.RandomCropCollector(64, min_tissue=0.3)
    assert legacy.tissue_only and legacy.min_tissue == 0.3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plain = bst.RandomCropCollector(64)
        assert not plain.tissue_only and plain.min_tissue == 0.5  # same default as sliding windows
    with pytest.raises(bst.ConfigError, match="tissue_only must be True or False"):
        bst.RandomCropCollector(64, tissue_only="yes")  # type: ignore[arg-type]


def test_scheduler_is_an_abstract_base() -> None:
    with pytest.raises(TypeError, match="abstract"):
        bst.Scheduler()  # type: ignore[abstract]
    assert isinstance(bst.LeastVisitedScheduler(), bst.Scheduler)


def test_types_public_methods_return_are_exported(tmp_path: Path) -> None:
    path = tmp_path / "s.tiff"
    write_synthetic_slide(path, width=512, height=512, tile_size=256)
    dataset = bst.BigSmallDataset(
        bst.Dataset("d", [bst.Patient("p", {"wsi": bst.Record(path)})]), bst.RandomRegionLoader(size=256),
        bst.RandomCropCollector(patch_size=64), buffer_size=1, smallchunks_per_bigchunk=2, samples_per_epoch=4,
    )  # fmt: skip
    topo = dataset.topology()
    assert isinstance(topo, bst.Topology)
    reservoir = dataset.make_reservoir(topo)
    assert isinstance(reservoir, bst.Reservoir)
    reservoir.close()
    assert isinstance(dataset.last_stats, bst.ReservoirStats)
    assert len(list(dataset)) == 4


def test_stitch_error_is_about_data_not_arguments() -> None:
    assert issubclass(bst.StitchError, bst.BigSmallError)
    assert issubclass(bst.StitchError, ValueError)
    assert not issubclass(bst.StitchError, bst.ConfigError)


def test_synthetic_writer_raises_the_package_errors(tmp_path: Path) -> None:
    with pytest.raises(bst.ConfigError, match="mpp"):
        write_synthetic_slide(tmp_path / "a.tiff", width=256, height=256, mpp=-1.0)
    write_synthetic_slide(tmp_path / "b.tiff", width=256, height=256, tile_size=256)
    with pytest.raises(bst.ConfigError, match="exists"):
        write_synthetic_slide(tmp_path / "b.tiff", width=256, height=256, tile_size=256)
    assert np.isfinite(bst.slide_info(tmp_path / "b.tiff").dimensions[0])
