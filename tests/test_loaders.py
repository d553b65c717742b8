"""RandomRegionLoader placement: chunk origins on the slide's tile grid, every pixel reachable."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import bigsmall_torch as bst
from bigsmall_torch.chunks import ChunkContext
from bigsmall_torch.loaders import _origins
from bigsmall_torch.synthetic import write_synthetic_slide


def test_origins_are_the_grid_plus_both_ends() -> None:
    assert _origins(0, 1000, 256).tolist() == [0, 256, 512, 768, 1000]
    assert _origins(100, 900, 256).tolist() == [100, 256, 512, 768, 900]
    assert _origins(0, 512, 256).tolist() == [0, 256, 512]
    assert _origins(5, 9, None).tolist() == [5, 6, 7, 8, 9]
    assert _origins(7, 7, 256).tolist() == [7]


@pytest.fixture(scope="module")
def odd_slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A slide whose sides are not multiples of its tile size."""
    path = tmp_path_factory.mktemp("odd") / "odd.tiff"
    write_synthetic_slide(path, width=2000, height=1496, tile_size=256, levels=1, tissue="full")
    return path


def chunk_origins(
    path: Path, loader: bst.RandomRegionLoader, n: int = 200
) -> list[tuple[int, int]]:
    width, height = loader.size
    patient = bst.Patient("p", {"wsi": bst.Record(path)})
    slides = bst.SlideCache()
    ctx = ChunkContext(rng=np.random.default_rng(0), state={}, slides=slides)
    origins = []
    for _ in range(n):
        chunk = loader.extract_bigchunk(patient, ctx)
        assert chunk is not None
        x, y = chunk.info["x"], chunk.info["y"]
        reader = slides.get(path)
        expected = reader.read(x, y, chunk.info["level"], width, height, planar=True)
        assert np.array_equal(chunk.data, expected)  # the pixels at the reported coordinates
        origins.append((x, y))
    slides.close()
    return origins


def test_chunks_sit_on_the_tile_grid_and_reach_the_far_edges(odd_slide: Path) -> None:
    origins = chunk_origins(odd_slide, bst.RandomRegionLoader(512), n=300)
    xs, ys = {x for x, _ in origins}, {y for _, y in origins}
    assert xs == {0, 256, 512, 768, 1024, 1280, 2000 - 512}
    assert ys == {0, 256, 512, 768, 1496 - 512}


def test_chunks_shorter_than_a_tile_are_placed_anywhere(odd_slide: Path) -> None:
    """A grid step longer than the chunk would leave the pixels between grid chunks unreachable."""
    origins = chunk_origins(odd_slide, bst.RandomRegionLoader((128, 512)), n=100)
    assert len({x for x, _ in origins}) > 50  # x: free (128 < 256)
    assert {y for _, y in origins} <= {0, 256, 512, 768, 1496 - 512}  # y: on the grid (512 >= 256)


def test_unaligned_placement_is_still_available(odd_slide: Path) -> None:
    origins = chunk_origins(odd_slide, bst.RandomRegionLoader(512, tile_aligned=False), n=50)
    assert any(x % 256 for x, _ in origins)
    assert all(0 <= x <= 2000 - 512 and 0 <= y <= 1496 - 512 for x, y in origins)


def test_alignment_at_a_coarser_level_uses_that_level_s_grid(slide_folder: Path) -> None:
    origins = chunk_origins(
        slide_folder / "synthetic_000.tiff", bst.RandomRegionLoader(512, level=1), n=60
    )
    # level-0 pixels of 256-tiles at 2x
    assert all(x % 512 == 0 and y % 512 == 0 for x, y in origins)


def test_alignment_on_a_real_slide(shared_slides: Path) -> None:
    path = shared_slides / "cmu-1-small-region.svs"
    info = bst.open_slide(path).info
    tw, th = info.tile_size
    width, height = info.dimensions
    origins = chunk_origins(path, bst.RandomRegionLoader(512), n=100)
    assert all(x % tw == 0 or x == width - 512 for x, _ in origins)
    assert all(y % th == 0 or y == height - 512 for _, y in origins)
