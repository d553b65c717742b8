"""The exception hierarchy of bigsmall_torch.

Every error the package raises on purpose derives from :class:`BigSmallError`, so callers can catch
the package's errors in one place. Errors about arguments also derive from :class:`ValueError` /
:class:`TypeError`, so code written against the built-in exceptions keeps working.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._paths import RemotePath

__all__ = [
    "AnnotationError",
    "BigSmallError",
    "ConfigError",
    "DatasetError",
    "ExtractorError",
    "MissingDependencyError",
    "MissingWindowsError",
    "RemoteError",
    "SlideError",
    "SlideOpenError",
    "SlideReadError",
    "StitchError",
    "StitcherClosedError",
    "StreamError",
    "UnusableSlidesError",
]


class BigSmallError(Exception):
    """Base class of every error raised by bigsmall_torch."""


class ConfigError(BigSmallError, ValueError):
    """An argument has a value that is not allowed (the message names it and what is allowed)."""


class DatasetError(BigSmallError, ValueError):
    """A dataset of patients is malformed: no slides found, duplicate ids, missing files."""


class ExtractorError(BigSmallError, TypeError):
    """A user's loader or collector broke its contract (e.g. returned the wrong type)."""


class MissingDependencyError(BigSmallError, ImportError):
    """An optional dependency is not installed; the message names the extra to install."""


class StreamError(BigSmallError, RuntimeError):
    """The sample stream cannot go on (e.g. every patient of a shard gives nothing)."""


class StitchError(BigSmallError, ValueError):
    """An output or its metadata does not fit the grids (shape, patient id, position, duplicate).

    Not a :class:`ConfigError`: the Stitcher's arguments were fine, the data given to it is not."""


class StitcherClosedError(BigSmallError, RuntimeError):
    """``Stitcher.add`` was called after ``Stitcher.finish``."""


class MissingWindowsError(BigSmallError, RuntimeError):
    """``strict=True``: some windows never arrived. ``missing`` maps patient id -> ``(n, 2)`` rows/cols."""

    def __init__(self, missing: dict[Any, Any] | str) -> None:
        if isinstance(missing, str):  # a whole message (rebuilt from a worker's re-raise)
            self.missing: dict[Any, Any] = {}
            super().__init__(missing)
            return
        self.missing = missing
        parts = [f"{pid!r}: {len(cells)}" for pid, cells in missing.items()]
        super().__init__(f"windows never received, per patient: {', '.join(parts)}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.missing or str(self),))


class SlideError(BigSmallError):
    """Base class of errors about one slide file; ``path`` names the file.

    Raised in a DataLoader worker, it arrives in the main process with its type: torch's re-raise
    builds it from one message (``SlideError(message)``, then ``path`` is None and ``reason`` the
    whole message), and pickling keeps ``path`` and ``reason``.
    """

    def __init__(self, path: str | os.PathLike[str] | None, reason: str | None = None) -> None:
        if reason is None:  # one argument: a whole message (torch's worker re-raise)
            self.path: Path | RemotePath | None = None
            self.reason = str(path)
            super().__init__(self.reason)
            return
        from ._paths import as_path  # a URL stays a URL

        self.path = None if path is None else as_path(path)
        self.reason = reason
        super().__init__(f"{getattr(self.path, 'display', self.path)}: {reason}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), self.path, self.reason, self.__dict__.copy()))


def _rebuild(cls: type[SlideError], path: Path | RemotePath | None, reason: str, state: dict[str, Any]) -> SlideError:
    error = cls.__new__(cls)
    BigSmallError.__init__(error, reason if path is None else f"{getattr(path, 'display', path)}: {reason}")
    error.__dict__.update(state)
    return error


class SlideOpenError(SlideError, OSError):
    """A slide file cannot be opened by any backend tried."""

    def __init__(
        self, path: str | os.PathLike[str] | None, reason: str | None = None, *, backends: Sequence[str] = ()
    ) -> None:
        self.backends = tuple(backends)
        if self.backends and reason is not None:
            reason = f"{reason} (backends tried: {', '.join(self.backends)})"
        super().__init__(path, reason)


class SlideReadError(SlideError, OSError):
    """Reading a region of an opened slide failed."""


class RemoteError(SlideReadError):
    """A request for a remote object (``s3://``, ``https://``, ...) kept failing: the message
    names the URL, what was asked and the HTTP status. ``status`` is that status (an int), or
    ``"timeout"`` / ``"connection reset"``, or None for other failures; ``attempts`` counts the
    tries. A :class:`SlideError`, so ``on_error="skip"`` leaves the slide's patient out."""

    def __init__(
        self,
        path: str | os.PathLike[str] | None,
        reason: str | None = None,
        *,
        status: int | str | None = None,
        attempts: int = 1,
    ) -> None:
        self.status = status
        self.attempts = attempts
        super().__init__(path, reason)


class AnnotationError(SlideError, ValueError):
    """An annotation file cannot be used: it cannot be parsed, an object has bad coordinates or lies
    outside the slide, or it holds none of the asked classes. ``path`` names the file and the
    message the object. A :class:`SlideError`, so ``on_error="skip"`` leaves its patient out."""


class UnusableSlidesError(DatasetError, SlideError):
    """Several slides of a dataset cannot be used (``on_error="raise"`` at construction): the
    message names every one; ``errors`` maps patient id -> that slide's own error."""

    def __init__(self, message: str, errors: dict[Any, BaseException] | None = None) -> None:
        SlideError.__init__(self, message)
        self.errors = dict(errors or {})

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.reason, self.errors))
