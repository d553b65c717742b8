"""Pictures on slide thumbnails: where the sampled patches came from (``sampling``), and the colour
map, blending and thumbnails that the sampling pictures and the stitched heatmaps use (``_draw``)."""

from __future__ import annotations

from ._draw import blend, colormap, heatmap_overlay, safe_names, slide_thumbnail
from .sampling import (
    ChunkInfoCollector,
    SampledPatches,
    SamplingRecorder,
    render_sampling,
    sampling_overlay,
)

__all__ = [
    "ChunkInfoCollector", "SampledPatches", "SamplingRecorder", "blend", "colormap", "heatmap_overlay",
    "render_sampling", "safe_names", "sampling_overlay", "slide_thumbnail",
]  # fmt: skip
