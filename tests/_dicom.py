"""A small DICOM whole-slide writer for tests: a tiled pyramid of JPEG baseline frames, one
instance (file) per level, as OpenSlide 4 reads it (VL Whole Slide Microscopy Image Storage,
``TILED_FULL`` organisation).

The level-0 pixels are given; every further level halves the previous one by 2x2 box averaging
(floor-halved sizes, as scanners write them). Frames are ``tile_size`` squares; the edge frames are
padded by repeating the last row and column, and readers crop them to ``TotalPixelMatrixColumns/Rows``.

What OpenSlide 4.0 (libdicom) turned out to need, beyond the SOP class: ``ImageType`` (its third
value, VOLUME, makes an instance a level), ``TotalPixelMatrixColumns/Rows``, ``NumberOfFrames`` and
``PlanarConfiguration``; one ``SeriesInstanceUID`` for every level (an instance of another series
is silently left out of the pyramid); a ``PhotometricInterpretation`` that says what the JPEG
stream holds (``YBR_FULL_422`` for YCbCr: ``RGB`` opens but decodes without colour conversion).
mpp comes from the shared ``PixelSpacing``; an empty Basic Offset Table also works.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import imagecodecs
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, encapsulate_extended
from pydicom.sequence import Sequence
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, JPEGBaseline8Bit, generate_uid

VL_WHOLE_SLIDE = UID("1.2.840.10008.5.1.4.1.1.77.1.6")


@dataclass(frozen=True)
class DicomSlide:
    """What :func:`write_dicom_slide` wrote: one file per level, the level arrays it encoded."""

    files: tuple[Path, ...]
    levels: tuple[np.ndarray, ...]
    mpp: float
    tile_size: int
    quality: int

    @property
    def path(self) -> Path:
        """The level-0 instance (OpenSlide finds the other levels in the same folder)."""
        return self.files[0]


def halve(image: np.ndarray) -> np.ndarray:
    """2x2 box average (rounded), dropping an odd last row/column."""
    h, w = image.shape[0] // 2 * 2, image.shape[1] // 2 * 2
    quads = image[:h, :w].astype(np.uint16).reshape(h // 2, 2, w // 2, 2, -1)
    return ((quads.sum(axis=(1, 3)) + 2) // 4).astype(np.uint8)


def _frames(image: np.ndarray, tile: int, quality: int) -> list[bytes]:
    """Row-major JPEG frames of ``image`` (the TILED_FULL order), edge frames padded."""
    height, width = image.shape[:2]
    frames = []
    for y in range(0, height, tile):
        for x in range(0, width, tile):
            part = image[y : y + tile, x : x + tile]
            # Edge frames repeat the last row/column: no sharp edge to ring into the pixels kept.
            pad = ((0, tile - part.shape[0]), (0, tile - part.shape[1]), (0, 0))
            frame = np.pad(part, pad, mode="edge")
            # YCbCr with 4:2:2 subsampling: what the photometric YBR_FULL_422 says of the stream.
            frames.append(bytes(imagecodecs.jpeg8_encode(frame, level=quality, subsampling="422")))
    return frames


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def _level_dataset(
    image: np.ndarray,
    index: int,
    *,
    tile: int,
    quality: int,
    spacing_mm: float,
    level0_size: tuple[int, int],
    uids: Mapping[str, str],
    extended_offsets: bool,
) -> Dataset:
    height, width = image.shape[:2]
    frames = _frames(image, tile, quality)
    instance_uid = generate_uid()

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = VL_WHOLE_SLIDE
    meta.MediaStorageSOPInstanceUID = instance_uid
    meta.TransferSyntaxUID = JPEGBaseline8Bit
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID

    ds = Dataset()
    ds.file_meta = meta
    ds.preamble = b"\0" * 128
    # Identity: one study, series, frame of reference and pyramid for every level.
    ds.SOPClassUID = VL_WHOLE_SLIDE
    ds.SOPInstanceUID = instance_uid
    ds.StudyInstanceUID = uids["study"]
    ds.SeriesInstanceUID = uids["series"]
    ds.FrameOfReferenceUID = uids["frame"]
    ds.PyramidUID = uids["pyramid"]
    ds.ImageType = (
        ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
        if index == 0
        else ["DERIVED", "PRIMARY", "VOLUME", "RESAMPLED"]
    )
    ds.Modality = "SM"
    ds.Manufacturer = "bigsmall_torch tests"
    ds.ManufacturerModelName = "tests/_dicom.py"
    ds.DeviceSerialNumber = "0"
    ds.SoftwareVersions = "1"
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDateTime = "20240101"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "000000"
    ds.StudyID = ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "", "", "", ""
    ds.SeriesNumber = 1
    ds.InstanceNumber = index + 1
    ds.PatientOrientation = ""
    ds.PositionReferenceIndicator = "SLIDE_CORNER"
    ds.VolumetricProperties = "VOLUME"
    ds.BurnedInAnnotation = ds.SpecimenLabelInImage = "NO"
    ds.FocusMethod, ds.ExtendedDepthOfField = "AUTO", "NO"
    ds.ContainerIdentifier = "SLIDE_1"
    ds.IssuerOfTheContainerIdentifierSequence = Sequence()
    ds.ContainerTypeCodeSequence = Sequence([_code("433466003", "SCT", "Microscope slide")])
    specimen = Dataset()
    specimen.SpecimenIdentifier = "SPECIMEN_1"
    specimen.SpecimenUID = uids["specimen"]
    specimen.IssuerOfTheSpecimenIdentifierSequence = Sequence()
    specimen.SpecimenPreparationSequence = Sequence()
    ds.SpecimenDescriptionSequence = Sequence([specimen])
    ds.AcquisitionContextSequence = Sequence()
    optical = Dataset()
    optical.OpticalPathIdentifier = "0"
    optical.IlluminationTypeCodeSequence = Sequence(
        [_code("111744", "DCM", "Brightfield illumination")]
    )
    optical.IlluminationColorCodeSequence = Sequence([_code("414298005", "SCT", "Full Spectrum")])
    optical.ObjectiveLensPower = 20
    ds.OpticalPathSequence = Sequence([optical])
    ds.NumberOfOpticalPaths = 1
    ds.TotalPixelMatrixFocalPlanes = 1

    # Geometry: the whole level is one pixel matrix, cut into row-major frames (TILED_FULL).
    ds.ImagedVolumeWidth = level0_size[0] * spacing_mm
    ds.ImagedVolumeHeight = level0_size[1] * spacing_mm
    ds.ImagedVolumeDepth = 0.0
    ds.TotalPixelMatrixColumns = width
    ds.TotalPixelMatrixRows = height
    origin = Dataset()
    origin.XOffsetInSlideCoordinateSystem = 0
    origin.YOffsetInSlideCoordinateSystem = 0
    ds.TotalPixelMatrixOriginSequence = Sequence([origin])
    ds.ImageOrientationSlide = [0, -1, 0, -1, 0, 0]
    ds.DimensionOrganizationType = "TILED_FULL"
    organisation = Dataset()
    organisation.DimensionOrganizationUID = uids["dimensions"]
    ds.DimensionOrganizationSequence = Sequence([organisation])
    level_spacing = spacing_mm * 2**index
    measures = Dataset()
    measures.PixelSpacing = [f"{level_spacing:.10g}", f"{level_spacing:.10g}"]  # mm: row, column
    measures.SliceThickness = 0
    frame_type = Dataset()
    frame_type.FrameType = ds.ImageType
    shared = Dataset()
    shared.PixelMeasuresSequence = Sequence([measures])
    shared.WholeSlideMicroscopyImageFrameTypeSequence = Sequence([frame_type])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])

    # Pixels: 8-bit YCbCr JPEG baseline frames, one per tile.
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "YBR_FULL_422"
    ds.PlanarConfiguration = 0
    ds.Rows = ds.Columns = tile
    ds.NumberOfFrames = len(frames)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.LossyImageCompression = "01"
    ds.LossyImageCompressionMethod = "ISO_10918_1"
    ds.LossyImageCompressionRatio = f"{tile * tile * 3 * len(frames) / sum(map(len, frames)):.2f}"
    if extended_offsets:
        data, offsets, lengths = encapsulate_extended(frames)
        ds.PixelData = data
        ds.ExtendedOffsetTable = offsets
        ds.ExtendedOffsetTableLengths = lengths
    else:
        ds.PixelData = encapsulate(frames, has_bot=True)
    ds["PixelData"].VR = "OB"
    return ds


def write_dicom_slide(
    folder: str | Path,
    level0: np.ndarray,
    *,
    levels: int = 3,
    tile_size: int = 256,
    mpp: float = 0.25,
    quality: int = 95,
    extended_offsets: bool = False,
    name: str = "level",
) -> DicomSlide:
    """Write ``level0`` (``H x W x 3`` uint8) as a ``levels``-level DICOM WSI pyramid into ``folder``
    (``{name}_{i}.dcm``, one file per level; put nothing else of another slide there: OpenSlide
    gathers the instances of a series from the folder of the file it is given).

    ``mpp`` is level 0's pixel size in microns (written as PixelSpacing in millimetres);
    ``extended_offsets`` writes an Extended Offset Table instead of a Basic Offset Table.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if level0.ndim != 3 or level0.shape[2] != 3 or level0.dtype != np.uint8:
        raise ValueError(
            f"level0 must be an H x W x 3 uint8 array, got {level0.shape} {level0.dtype}"
        )
    uids = {
        key: generate_uid()
        for key in ("study", "series", "frame", "pyramid", "specimen", "dimensions")
    }
    arrays = [np.ascontiguousarray(level0)]
    for _ in range(1, levels):
        arrays.append(halve(arrays[-1]))
    files = []
    size = (level0.shape[1], level0.shape[0])
    for index, image in enumerate(arrays):
        ds = _level_dataset(
            image, index, tile=tile_size, quality=quality, spacing_mm=mpp / 1000,
            level0_size=size, uids=uids, extended_offsets=extended_offsets,
        )  # fmt: skip
        path = folder / f"{name}_{index}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return DicomSlide(tuple(files), tuple(arrays), mpp, tile_size, quality)
