"""Physical resolution: from ``level=`` / ``mpp=`` / ``magnification=`` to the level to read and the
resampling that brings it to the asked scale.

A level is used as it is when its scale is within ``tolerance`` (relative, default 5%) of the asked
scale; otherwise the closest finer level is read and resampled down (area-aware, antialiased).
Asking for a scale finer than level 0 beyond the tolerance, or an ``mpp`` of a slide that does not
record one, is an error: a wrong scale is never delivered silently.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import numpy as np

from ..errors import ConfigError, SlideError
from .slide import SlideInfo, SlideReader

if TYPE_CHECKING:
    from ._tiles import TiledRegion

__all__ = [
    "DEFAULT_TOLERANCE", "LevelChoice", "Resolution", "extent", "read_at", "read_tiled_at", "resample",
]  # fmt: skip

DEFAULT_TOLERANCE = 0.05


@dataclass(frozen=True)
class LevelChoice:
    """How to read one slide at the asked resolution.

    Attributes:
        level: the pyramid level to read.
        downsample: level-0 pixels per output pixel (the asked scale).
        scale: level pixels per output pixel (1.0: read as is; > 1: resample down after reading).
        mpp: microns per output pixel, or NaN when the slide has no mpp.
    """

    level: int
    downsample: float
    scale: float
    mpp: float

    @property
    def resampled(self) -> bool:
        return self.scale != 1.0


@dataclass(frozen=True)
class Resolution:
    """The resolution asked for: exactly one of ``level``, ``mpp`` or ``magnification``."""

    level: int | None = None
    mpp: float | None = None
    magnification: float | None = None
    tolerance: float = DEFAULT_TOLERANCE

    @classmethod
    def from_args(
        cls,
        owner: str,
        *,
        level: int | None = None,
        mpp: float | None = None,
        magnification: float | None = None,
        tolerance: float = DEFAULT_TOLERANCE,
    ) -> Resolution:
        """Validate the arguments of ``owner`` (named in errors); no argument means level 0."""
        given = [name for name, v in (("level", level), ("mpp", mpp), ("magnification", magnification)) if v is not None]
        if len(given) > 1:
            raise ConfigError(f"{owner}: give only one of level=, mpp= or magnification=, got {', '.join(given)}")
        if level is not None and (isinstance(level, bool) or not isinstance(level, int) or level < 0):
            raise ConfigError(f"{owner}: level must be an int >= 0, got {level!r}")
        for name, value in (("mpp", mpp), ("magnification", magnification)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0):
                raise ConfigError(f"{owner}: {name} must be a number > 0, got {value!r}")
        if not isinstance(tolerance, (int, float)) or not 0 <= tolerance < 1:
            raise ConfigError(f"{owner}: tolerance must be in [0, 1), got {tolerance!r}")
        if not given:
            level = 0
        return cls(
            level=level,
            mpp=None if mpp is None else float(mpp),
            magnification=None if magnification is None else float(magnification),
            tolerance=float(tolerance),
        )

    def describe(self) -> str:
        if self.mpp is not None:
            return f"mpp={self.mpp:g}"
        if self.magnification is not None:
            return f"magnification={self.magnification:g}"
        return f"level={self.level}"

    def choose(self, info: SlideInfo) -> LevelChoice:
        """The level of ``info`` to read, and the resampling needed; raises naming the slide."""
        downsamples = info.level_downsamples
        base_mpp = info.mpp if info.mpp is not None else math.nan
        if self.level is not None:
            if self.level >= len(downsamples):
                raise SlideError(info.path, f"level {self.level} does not exist (levels 0..{len(downsamples) - 1})")
            ds = downsamples[self.level]
            return LevelChoice(self.level, ds, 1.0, base_mpp * ds)
        if self.mpp is not None:
            if info.mpp is None:
                raise SlideError(info.path, f"mpp={self.mpp:g} was asked but the slide records no mpp; use level=")
            target = self.mpp / info.mpp
        else:
            assert self.magnification is not None
            if info.objective_power is None:
                raise SlideError(
                    info.path,
                    f"magnification={self.magnification:g} was asked but the slide records no objective power; use level= or mpp=",
                )
            target = info.objective_power / self.magnification
        if target < 1 - self.tolerance:
            finest = f"{info.mpp:.4g} mpp" if info.mpp is not None else "level 0"
            raise SlideError(
                info.path,
                f"{self.describe()} is finer than the slide's finest level ({finest}, downsample "
                f"{target:.3g} < 1 beyond the {self.tolerance:.0%} tolerance); upsampling is not done",
            )
        # Coarsest level not coarser than the target (within tolerance).
        level = max(i for i, d in enumerate(downsamples) if d <= target * (1 + self.tolerance) or i == 0)
        ds = downsamples[level]
        if abs(ds / target - 1) <= self.tolerance:
            return LevelChoice(level, ds, 1.0, base_mpp * ds)
        return LevelChoice(level, target, target / ds, base_mpp * target)


def to_level0(position: int, downsample: float) -> int:
    """The level-0 coordinate reported for pixel ``position`` of a level (or resolution) whose
    downsample is ``downsample``: the smallest level-0 coordinate that maps back to that pixel under
    the floor convention of tiffslide and of this package's readers, ``int(x0 / downsample)``.

    With a whole downsample this is ``position * downsample``; with a fractional one (a level of
    2.0005, say) plain rounding can land one pixel short, so that re-reading at the reported
    coordinate starts a pixel away from the patch.
    """
    x0 = math.floor(position * downsample)
    while int(x0 / downsample) < position:
        x0 += 1
    return x0


def extent(info: SlideInfo, choice: LevelChoice) -> tuple[int, int]:
    """``(width, height)`` of a slide in pixels of the chosen resolution."""
    if not choice.resampled:
        return info.level_dimensions[choice.level]
    return int(info.dimensions[0] // choice.downsample), int(info.dimensions[1] // choice.downsample)


def read_at(
    reader: SlideReader, choice: LevelChoice, x: int, y: int, width: int, height: int, *,
    planar: bool = True,
) -> np.ndarray:  # fmt: skip
    """The ``height x width`` region whose top-left is ``(x, y)`` in pixels of the chosen resolution.

    Read from ``choice.level`` and resampled when the level's scale differs from the asked one. The
    region must lie inside :func:`extent`. ``planar``: channel-planar memory where the reader can
    write it directly (see :func:`~bigsmall_torch.chunks.channel_planar`), else as read.
    """
    x0, y0 = to_level0(x, choice.downsample), to_level0(y, choice.downsample)
    if not choice.resampled:
        return reader.read(x0, y0, choice.level, width, height, planar=planar)
    info = reader.info
    level_ds = info.level_downsamples[choice.level]
    lw, lh = info.level_dimensions[choice.level]
    lx, ly = round(x0 / level_ds), round(y0 / level_ds)
    rw = min(math.ceil(width * choice.scale), lw - lx)
    rh = min(math.ceil(height * choice.scale), lh - ly)
    return resample(reader.read(x0, y0, choice.level, rw, rh), width, height)


def read_tiled_at(
    reader: SlideReader, choice: LevelChoice, x: int, y: int, width: int, height: int
) -> TiledRegion | None:
    """The region of :func:`read_at` kept as the tiles that cover it (see
    :class:`~bigsmall_torch.io._tiles.TiledRegion`), or None where that is not how the reader reads it
    (a resampled level, a level without the tile fast path, a reader of another kind)."""
    read_tiled = getattr(reader, "read_tiled", None)
    if choice.resampled or read_tiled is None:
        return None
    x0, y0 = to_level0(x, choice.downsample), to_level0(y, choice.downsample)
    return cast("TiledRegion | None", read_tiled(x0, y0, choice.level, width, height))


def resample(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """``image`` (``H x W x 3`` uint8) resized to ``width x height`` (antialiased when shrinking)."""
    from PIL import Image

    if image.shape[1] == width and image.shape[0] == height:
        return image
    resized = Image.fromarray(np.ascontiguousarray(image)).resize((width, height), Image.Resampling.BILINEAR)
    return np.asarray(resized)
