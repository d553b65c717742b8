"""bigsmall_torch: feed PyTorch from gigapixel whole-slide images.

Load a big chunk of a slide into RAM once, collect many small chunks (patches) from it, and keep a
reservoir of big chunks from different patients per DataLoader worker while the next ones load in the
background.
"""

from __future__ import annotations

from ._engine.reports import EpochReport, WorkerReport
from ._engine.reservoir import OnError, Reservoir, ReservoirStats
from ._engine.sharding import Topology
from ._paths import RemotePath
from ._version import __version__
from .annotations import AnnotationKind, Annotations, ClassRegions, read_annotations, write_geojson
from .bags import FeatureBagDataset, read_bag
from .chunks import BigChunk, BigChunkLoader, ChunkContext, SmallChunk, SmallChunkCollector
from .collectors import LabelRule, RandomCropCollector
from .data import Dataset, Patient, Record
from .dataset import BigSmallDataset, Sharding
from .errors import (
    AnnotationError,
    BigSmallError,
    ConfigError,
    DatasetError,
    ExtractorError,
    MissingDependencyError,
    MissingWindowsError,
    RemoteError,
    SlideError,
    SlideOpenError,
    SlideReadError,
    StitcherClosedError,
    StitchError,
    StreamError,
    UnusableSlidesError,
)
from .features import (
    ExtractionSummary,
    FeatureDtype,
    SlideExtraction,
    TimmPreprocess,
    extract_features,
    timm_encoder,
)
from .inference.sliding import Edge, Grid, SlidingWindowDataset
from .inference.stitching import Stitcher, StitchMode, StitchResult
from .io.remote import RemoteOptions, remote_stats
from .io.resolution import LevelChoice, Resolution
from .io.slide import Backend, SlideCache, SlideInfo, SlideReader, open_slide, slide_info
from .io.tissue import TissueDetector, TissueMask, render_tissue, tissue_mask
from .loaders import ClassBalance, RandomRegionLoader
from .schedulers import (
    Candidate,
    LabelBalancedScheduler,
    LeastVisitedScheduler,
    Scheduler,
    WeightedScheduler,
)
from .visualize import ChunkInfoCollector, SampledPatches, SamplingRecorder, render_sampling

__all__ = [
    "AnnotationError",
    "AnnotationKind",
    "Annotations",
    "Backend",
    "BigChunk",
    "BigChunkLoader",
    "BigSmallDataset",
    "BigSmallError",
    "Candidate",
    "ChunkContext",
    "ChunkInfoCollector",
    "ClassBalance",
    "ClassRegions",
    "ConfigError",
    "Dataset",
    "DatasetError",
    "Edge",
    "EpochReport",
    "ExtractionSummary",
    "ExtractorError",
    "FeatureBagDataset",
    "FeatureDtype",
    "Grid",
    "LabelBalancedScheduler",
    "LabelRule",
    "LeastVisitedScheduler",
    "LevelChoice",
    "MissingDependencyError",
    "MissingWindowsError",
    "OnError",
    "Patient",
    "RandomCropCollector",
    "RandomRegionLoader",
    "Record",
    "RemoteError",
    "RemoteOptions",
    "RemotePath",
    "Reservoir",
    "ReservoirStats",
    "Resolution",
    "SampledPatches",
    "SamplingRecorder",
    "Scheduler",
    "Sharding",
    "SlideCache",
    "SlideError",
    "SlideExtraction",
    "SlideInfo",
    "SlideOpenError",
    "SlideReader",
    "SlideReadError",
    "SlidingWindowDataset",
    "SmallChunk",
    "SmallChunkCollector",
    "Stitcher",
    "StitcherClosedError",
    "StitchError",
    "StitchMode",
    "StitchResult",
    "StreamError",
    "TimmPreprocess",
    "TissueDetector",
    "TissueMask",
    "Topology",
    "UnusableSlidesError",
    "WeightedScheduler",
    "WorkerReport",
    "open_slide",
    "read_annotations",
    "remote_stats",
    "render_sampling",
    "render_tissue",
    "slide_info",
    "tissue_mask",
    "write_geojson",
    "extract_features",
    "read_bag",
    "timm_encoder",
    "__version__",
]
