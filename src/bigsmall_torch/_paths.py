"""Paths that may be URLs: local files stay :class:`~pathlib.Path`, ``s3://``, ``gs://``, ``az://``,
``https://``, ... become :class:`RemotePath`.

A :class:`RemotePath` behaves like the part of ``Path`` the package uses for slide files (``name``,
``suffix``, ``stem``, ``parent``, ``/``, ``exists``, ``is_dir``, ``stat``, equality, ordering,
``os.fspath`` gives the URL) and carries the :class:`~bigsmall_torch.RemoteOptions` its object is
read with (credentials, cache, retries; not part of equality). ``Path("s3://b/k")`` would collapse
the ``//``: code that may meet URLs converts with :func:`as_path`, never with ``Path``.
"""

from __future__ import annotations

import os
import posixpath
import re
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .io.remote import RemoteOptions

__all__ = ["RemotePath", "as_path", "is_url"]

# A URL scheme of two or more characters (so that "C:\\slides" stays a path), then "://".
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]+)://")


def is_url(path: Any) -> bool:
    """Whether ``path`` is a URL of a remote object (``file://`` URLs are local paths)."""
    if isinstance(path, RemotePath):
        return True
    if not isinstance(path, str):
        return False
    match = _URL.match(path)
    return match is not None and match.group(1).lower() != "file"


def as_path(path: str | os.PathLike[str], remote: RemoteOptions | None = None) -> Path | RemotePath:
    """``path`` as a :class:`RemotePath` when it is a URL (read with ``remote``, or its own options
    when it is one already and ``remote`` is None), else as a local :class:`~pathlib.Path`
    (``file://`` stripped)."""
    if isinstance(path, RemotePath):
        return path if remote is None else RemotePath(path.url, remote)
    text = os.fspath(path)
    if is_url(text):
        return RemotePath(text, remote)
    if text.lower().startswith("file://"):
        text = text[len("file://") :]
    return Path(text)


# The options an object was last given in this process: a URL met again as text (a grid's or a
# chunk's ``"path"``) is read as its record is. Pickled RemotePaths register again where they land.
_OPTIONS: dict[str, RemoteOptions] = {}


class RemotePath(os.PathLike[str]):
    """An object in a store fsspec reads (``protocol://bucket/key``), path-like.

    Args:
        url: the object's URL.
        remote: how to read it (:class:`~bigsmall_torch.RemoteOptions`); None: the options this
            URL was last given in this process, else the defaults (credentials from the store's
            standard configuration, e.g. the ``AWS_*`` variables).
    """

    __slots__ = ("protocol", "remote", "url")

    def __init__(self, url: str, remote: RemoteOptions | None = None) -> None:
        match = _URL.match(url)
        if match is None:
            raise ValueError(f"not a URL: {url!r}")
        self.protocol = match.group(1).lower()
        # One spelling per object: no trailing slash, the scheme lowercased.
        self.url = self.protocol + url[match.end(1) :].rstrip("/")
        if remote is None:
            remote = _OPTIONS.get(self.url)
            if remote is None:
                from .io.remote import RemoteOptions

                remote = RemoteOptions()
        else:
            _OPTIONS[self.url] = remote
        self.remote = remote

    # -- pure path ---------------------------------------------------------------------------------

    @property
    def _key(self) -> str:
        """The part after ``protocol://``."""
        return self.url.split("://", 1)[1]

    @property
    def name(self) -> str:
        return posixpath.basename(self._key.split("?", 1)[0])

    @property
    def suffix(self) -> str:
        return PurePosixPath(self.name).suffix

    @property
    def suffixes(self) -> list[str]:
        return PurePosixPath(self.name).suffixes

    @property
    def stem(self) -> str:
        return PurePosixPath(self.name).stem

    @property
    def parent(self) -> RemotePath:
        key = self._key.split("?", 1)[0]
        head = posixpath.dirname(key)
        return RemotePath(f"{self.protocol}://{head or key}", self.remote)

    def __truediv__(self, other: str | os.PathLike[str]) -> RemotePath:
        base = self.url.split("?", 1)[0]  # a query (a signature) belongs to one object only
        return RemotePath(f"{base}/{os.fspath(other).lstrip('/')}", self.remote)

    def relative_to(self, other: str | os.PathLike[str] | RemotePath) -> PurePosixPath:
        base = other.url if isinstance(other, RemotePath) else os.fspath(other)
        base = base.rstrip("/") + "/"
        if not self.url.startswith(base):
            raise ValueError(f"{self.url!r} is not under {base!r}")
        return PurePosixPath(self.url[len(base) :])

    def with_suffix(self, suffix: str) -> RemotePath:
        return self.parent / (self.stem + suffix)

    def as_posix(self) -> str:
        return self.url

    @property
    def display(self) -> str:
        """The URL without its query, which may hold a signature or a token: what messages show."""
        return self.url.split("?", 1)[0] + ("?..." if "?" in self.url else "")

    def resolve(self, strict: bool = False) -> RemotePath:
        return self

    def absolute(self) -> RemotePath:
        return self

    def __fspath__(self) -> str:
        return self.url

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"RemotePath({self.display!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RemotePath) and other.url == self.url

    def __hash__(self) -> int:
        return hash(("RemotePath", self.url))

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, (RemotePath, Path)):
            return NotImplemented
        return str(self) < str(other)

    def __gt__(self, other: object) -> bool:  # also what ``Path < RemotePath`` falls back to
        if not isinstance(other, (RemotePath, Path)):
            return NotImplemented
        return str(self) > str(other)

    def __le__(self, other: object) -> bool:
        if not isinstance(other, (RemotePath, Path)):
            return NotImplemented
        return str(self) <= str(other)

    def __ge__(self, other: object) -> bool:
        if not isinstance(other, (RemotePath, Path)):
            return NotImplemented
        return str(self) >= str(other)

    def __reduce__(self) -> tuple[Any, ...]:
        return (RemotePath, (self.url, self.remote))

    # -- the store ---------------------------------------------------------------------------------

    def stat(self) -> os.stat_result:
        """Size and modification time of the object (one request, then cached in this process);
        :class:`FileNotFoundError` when there is none."""
        from .io.remote import object_info

        info = object_info(self)
        if info.is_dir:
            raise IsADirectoryError(self.url)
        return _Stat(info.size, int(info.mtime * 1e9))  # type: ignore[return-value]

    def exists(self) -> bool:
        from .io.remote import object_info

        try:
            object_info(self)
        except FileNotFoundError:
            return False
        return True

    def is_dir(self) -> bool:
        from .io.remote import object_info

        try:
            return object_info(self).is_dir
        except FileNotFoundError:
            return False

    def is_file(self) -> bool:
        from .io.remote import object_info

        try:
            return not object_info(self).is_dir
        except FileNotFoundError:
            return False


class _Stat:
    """The two fields of ``os.stat_result`` the package reads of an object."""

    __slots__ = ("st_mtime", "st_mtime_ns", "st_size")

    def __init__(self, size: int, mtime_ns: int) -> None:
        self.st_size = size
        self.st_mtime_ns = mtime_ns
        self.st_mtime = mtime_ns / 1e9
