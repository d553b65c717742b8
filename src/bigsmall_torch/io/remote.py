"""Slides in object storage and on web servers, read through fsspec.

Everything that touches a remote object goes through this module:

* :func:`filesystem`: the fsspec filesystem of a protocol, with a timeout on every request and the
  store's own retries switched off (retrying is done here, once, for every protocol);
* :func:`call`: one request, retried with exponential backoff and jitter: throttling (HTTP 429,
  503 and S3's ``SlowDown``), other 5xx, timeouts and connection resets up to
  ``RemoteOptions.retries`` times, 403 and 404 once (a key rotated under a long run, an object
  written a moment ago); then a :class:`~bigsmall_torch.RemoteError` naming the URL and the HTTP
  status;
* :class:`RemoteFile`: a seekable file over an object for tifffile's header parsing, reading
  aligned blocks (``RemoteOptions.block_bytes``) kept in a per-process LRU, so that reopening a
  slide costs no request;
* :class:`RangeSource`: the byte ranges of a big chunk's tiles, adjacent ranges merged and all of
  them fetched concurrently in one call (one round trip), for the tile-direct fast path; for S3,
  through obstore (Rust's ``object_store``) when it is installed and understands the storage
  options, in DataLoader workers: a signed GET costs the client about 0.75 ms of CPU there against
  3 ms through s3fs/botocore (``benchmarks.bench_remote``; ``RemoteOptions.s3_reads``);
* :class:`DiskCache`: fetched ranges kept on local disk (``RemoteOptions.cache_dir``), bounded by
  ``cache_bytes``, shared by the processes of a node.

Credentials and endpoints come from each store's standard configuration (for S3 the ``AWS_*``
variables, ``AWS_ENDPOINT_URL`` included, and profiles); ``RemoteOptions.storage_options`` is
passed to fsspec as is (it wins over the defaults set here).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import http.client
import io
import json
import logging
import os
import random
import re
import socket
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from .._paths import RemotePath
from ..errors import ConfigError, MissingDependencyError, RemoteError

__all__ = [
    "DiskCache",
    "ObjectInfo",
    "RangeSource",
    "RemoteFile",
    "RemoteOptions",
    "call",
    "filesystem",
    "list_objects",
    "object_info",
    "remote_stats",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")

_CACHE_BLOCK = 16 * 1024  # the disk cache's unit: fetched ranges are rounded out to it
_MEMORY_BLOCKS_BYTES = 64 << 20  # header blocks kept per process (all objects together)
_MAX_GAP = 64 * 1024  # ranges this close are fetched in one request (the gap is read too)


@dataclass(frozen=True, eq=False)
class RemoteOptions:
    """How remote slides (``s3://``, ``gs://``, ``az://``, ``https://``, ...) are read.

    Args:
        storage_options: passed to fsspec as is (``key``/``secret``/``endpoint_url`` for S3,
            ``token`` for GCS, ``headers`` for HTTP, ...); without it each store's standard
            configuration applies (for S3 the ``AWS_*`` environment variables and profiles).
        cache_dir: keep every fetched byte range on local disk here, so that later epochs and
            other processes of the node read it locally; None: no disk cache.
        cache_bytes: bound of the disk cache; the least recently used slides are dropped past it.
        retries: retries of a request failing with throttling (429, 503, ``SlowDown``), another
            5xx, a timeout or a reset connection (403 and 404 are retried once).
        backoff_s: the first retry's wait; each next one doubles it (with jitter), at most 20 s.
        timeout_s: the limit of every request (connecting and reading).
        block_bytes: the unit of header reads (tifffile's small reads are served from blocks).
        s3_reads: who fetches the tile byte ranges of ``s3://`` slides. ``"auto"`` (default):
            obstore in DataLoader worker processes, where the reading of a training or extraction
            run happens, when it is installed (the ``[remote]`` extra), every storage option is one
            it understands (``key``, ``secret``, ``token``, ``endpoint_url``, ``anon``,
            ``profile``, ``client_kwargs={"region_name", "endpoint_url"}``, fsspec's own caching
            options) and the region is known (an endpoint, ``region_name``, ``AWS_REGION`` /
            ``AWS_DEFAULT_REGION`` or the profile's; a bucket found to be in another region is
            read by s3fs from then on, with a warning); s3fs otherwise, and in every other process:
            obstore's runtime does not survive ``fork``, so a main process that used it would
            leave the workers it forks without it. ``"obstore"``: in every process, a
            :class:`~bigsmall_torch.ConfigError` when it cannot (a process forked after obstore
            ran reads with s3fs, with a warning); ``"fsspec"``: always s3fs. Headers, object
            sizes and listings go through s3fs either way. obstore also reads a few ``AWS_*``
            variables of its own that botocore ignores (e.g. ``AWS_SKIP_SIGNATURE``,
            ``AWS_REQUESTER_PAYS``).
    """

    storage_options: Mapping[str, Any] = field(default_factory=dict)
    cache_dir: str | os.PathLike[str] | None = None
    cache_bytes: int = 50 << 30
    retries: int = 3
    backoff_s: float = 0.5
    timeout_s: float = 60.0
    block_bytes: int = 1 << 20
    s3_reads: str = "auto"

    def __post_init__(self) -> None:
        if not isinstance(self.storage_options, Mapping):
            raise ConfigError(
                f"RemoteOptions: storage_options must be a mapping (dict), got "
                f"{type(self.storage_options).__name__}"
            )
        object.__setattr__(self, "storage_options", dict(self.storage_options))
        if self.cache_dir is not None:
            if not isinstance(self.cache_dir, (str, os.PathLike)) or not os.fspath(self.cache_dir):
                raise ConfigError(f"RemoteOptions: cache_dir must be a local folder path, got {self.cache_dir!r}")
            object.__setattr__(self, "cache_dir", Path(self.cache_dir))
        for name, low in (("cache_bytes", 0), ("retries", 0), ("block_bytes", _CACHE_BLOCK)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"RemoteOptions: {name} must be an int >= {low}, got {value!r}")
        if self.block_bytes % _CACHE_BLOCK:
            raise ConfigError(
                f"RemoteOptions: block_bytes must be a multiple of {_CACHE_BLOCK}, got {self.block_bytes}"
            )
        for name in ("backoff_s", "timeout_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ConfigError(f"RemoteOptions: {name} must be a number > 0, got {value!r}")
        if self.s3_reads not in _S3_READS:
            raise ConfigError(f"RemoteOptions: s3_reads must be one of {list(_S3_READS)}, got {self.s3_reads!r}")
        if self.s3_reads == "obstore":
            why = _obstore_refusal(self.storage_options)
            if why:
                raise (MissingDependencyError if "not installed" in why else ConfigError)(
                    f"RemoteOptions(s3_reads='obstore'): {why}"
                )

    def _token(self) -> str:
        """A stable text of the storage options (for per-process caches)."""
        return json.dumps(self.storage_options, sort_keys=True, default=repr)

    def __repr__(self) -> str:
        shown = _masked(self.storage_options)
        return (
            f"RemoteOptions(storage_options={shown!r}, cache_dir={self.cache_dir!r}, "
            f"cache_bytes={self.cache_bytes}, retries={self.retries}, backoff_s={self.backoff_s}, "
            f"timeout_s={self.timeout_s}, s3_reads={self.s3_reads!r})"
        )


_SECRET_WORDS = ("secret", "token", "password", "key", "credential", "authorization", "headers", "connection_string", "sas", "signature")


def _masked(value: Any) -> Any:
    """``value`` with every entry whose name suggests a secret replaced by ``"***"`` (nested too)."""
    if isinstance(value, Mapping):
        return {
            k: "***" if any(w in str(k).lower() for w in _SECRET_WORDS) else _masked(v) for k, v in value.items()
        }
    return value


# -- statistics ----------------------------------------------------------------------------------


class _Stats:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests = 0
        self.bytes = 0
        self.retries = 0
        self.cache_hits = 0

    def add(self, requests: int = 0, nbytes: int = 0, retries: int = 0, hits: int = 0) -> None:
        with self.lock:
            self.requests += requests
            self.bytes += nbytes
            self.retries += retries
            self.cache_hits += hits


_STATS = _Stats()


def remote_stats() -> dict[str, int]:
    """This process's remote reads so far: ``requests`` (data requests sent, retries included),
    ``bytes`` received, ``retries`` and ``cache_hits`` (ranges served by the disk cache)."""
    with _STATS.lock:
        return {
            "requests": _STATS.requests,
            "bytes": _STATS.bytes,
            "retries": _STATS.retries,
            "cache_hits": _STATS.cache_hits,
        }


# -- filesystems and requests ----------------------------------------------------------------------

_EXTRA = "pip install 'bigsmall-torch[remote]'"


def _defaults(protocol: str, timeout: float) -> dict[str, Any]:
    """Options that put a timeout on every request and leave retrying to :func:`call`."""
    if protocol in ("s3", "s3a"):
        return {
            "config_kwargs": {
                "connect_timeout": timeout,
                "read_timeout": timeout,
                "retries": {"total_max_attempts": 1, "mode": "standard"},
            }
        }
    if protocol in ("http", "https"):
        import aiohttp

        return {"client_kwargs": {"timeout": aiohttp.ClientTimeout(total=timeout, connect=timeout)}}
    return {}


# Forked children (DataLoader workers) inherit fsspec's event loop object, and with it the epoll
# instance the parent's loop waits on: the kernel object is shared, not copied. When anything in
# the child closes an inherited connection (an fsspec instance's finalizer does, once the child's
# first request clears fsspec's instance cache), the loop unregisters its socket from that shared
# epoll, and the parent never sees the response to its next request on that connection: it
# hangs until the timeout. So the child gives the inherited loop a selector of its own (removing
# a socket from it touches nothing of the parent's) and keeps the inherited instances alive.
_PARENT_LOOPS: list[Any] = []
_INHERITED: list[Any] = []


def _before_fork() -> None:
    asyn = sys.modules.get("fsspec.asyn")
    loop = getattr(asyn, "loop", [None])[0] if asyn is not None else None
    _PARENT_LOOPS[:] = [loop] if loop is not None else []


def _after_fork_in_child() -> None:
    import selectors

    global _INFO_LOCK
    _INFO_LOCK = threading.Lock()  # a thread of the parent may have held these at the fork
    _BLOCKS.lock = threading.Lock()
    for cache in _DISK.values():
        cache._lock = threading.Lock()

    for loop in _PARENT_LOOPS:
        if hasattr(loop, "_selector"):
            loop._selector = selectors.DefaultSelector()
    _PARENT_LOOPS.clear()
    fsspec = sys.modules.get("fsspec")
    if fsspec is None:
        return
    pending, seen = [fsspec.AbstractFileSystem], set()
    while pending:
        cls = pending.pop()
        if cls in seen:
            continue
        seen.add(cls)
        pending.extend(cls.__subclasses__())
        cache = cls.__dict__.get("_cache")
        if isinstance(cache, dict):
            _INHERITED.extend(cache.values())


def _after_fork_in_parent() -> None:
    _PARENT_LOOPS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(
        before=_before_fork, after_in_child=_after_fork_in_child, after_in_parent=_after_fork_in_parent
    )


def filesystem(protocol: str, remote: RemoteOptions) -> Any:
    """The fsspec filesystem for ``protocol`` with ``remote``'s options (fsspec caches instances
    per process and per options, so connections are reused)."""
    try:
        import fsspec
    except ImportError as exc:  # pragma: no cover - fsspec comes with tiffslide
        raise MissingDependencyError(f"reading {protocol}:// URLs needs fsspec: {_EXTRA}") from exc
    options = _defaults(protocol, remote.timeout_s)
    for key, value in remote.storage_options.items():
        if isinstance(value, Mapping) and isinstance(options.get(key), Mapping):
            options[key] = {**options[key], **value}  # the user's keys win, ours stay otherwise
        else:
            options[key] = value
    try:
        fs = fsspec.filesystem(protocol, **options)
    except ImportError as exc:
        raise MissingDependencyError(f"reading {protocol}:// URLs: {exc} ({_EXTRA})") from exc
    except ValueError as exc:  # an unknown protocol
        raise ConfigError(f"cannot read {protocol}:// URLs: {exc}") from exc
    if hasattr(fs, "retries") and protocol in ("s3", "s3a"):
        fs.retries = 1  # s3fs's own retry loop: retrying is done once, in call()
    return fs


def _run(fs: Any, name: str, *args: Any, timeout: float | None, **kwargs: Any) -> Any:
    """``fs.<name>(*args)``, bounded by ``timeout`` for async filesystems (the hard limit over the
    client's own timeouts)."""
    if getattr(fs, "async_impl", False) and hasattr(fs, "_" + name):
        from fsspec.asyn import sync

        return sync(fs.loop, getattr(fs, "_" + name), *args, timeout=timeout, **kwargs)
    return getattr(fs, name)(*args, **kwargs)


def _status(exc: BaseException) -> int | str | None:
    """The HTTP status (or ``"timeout"`` / ``"connection error"``) behind ``exc``; None for errors
    that are not about a request (a bug, a bad option, missing credentials).

    The chain of causes is searched: what a response said (its status, S3's error code) or a
    timeout or a failed connection wins over what a wrapper's type suggests (fsspec's HTTP store
    raises FileNotFoundError for a timed-out HEAD)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    generic: int | str | None = None
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if type(current).__module__.startswith("obstore"):
            status = _obstore_status(current)
            if status is not None:
                return status
        names = {cls.__name__ for cls in type(current).__mro__}
        response = getattr(current, "response", None)
        if isinstance(response, Mapping):  # botocore's ClientError
            code = response.get("Error", {}).get("Code")
            if code in ("SlowDown", "RequestTimeout", "InternalError", "ServiceUnavailable"):
                return 503
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if status:
                return int(status)
        elif response is not None and isinstance(getattr(response, "status_code", None), int):
            return int(response.status_code)  # requests' HTTPError
        for attribute in ("status", "status_code", "code"):  # aiohttp, requests, gcsfs / adlfs
            status = getattr(current, attribute, None)
            if isinstance(status, int) and not isinstance(status, bool) and 400 <= status < 600:
                return status
        if isinstance(current, (TimeoutError, asyncio.TimeoutError)) or names & _TIMEOUTS or (
            isinstance(current, OSError) and current.errno == errno.ETIMEDOUT
        ):
            return "timeout"
        if isinstance(current, (ConnectionError, http.client.IncompleteRead, socket.gaierror)) or names & _RESETS:
            return "connection error"
        if generic is None:
            if isinstance(current, FileNotFoundError):
                generic = 404
            elif isinstance(current, PermissionError):
                generic = 403
            elif "SlowDown" in str(current):
                generic = 503
        current = current.__cause__ or current.__context__
    return generic


def _retries(status: int | str, remote: RemoteOptions) -> int:
    """How many times a failure with ``status`` is retried."""
    if isinstance(status, str) or status in (408, 429) or status >= 500:
        return remote.retries  # throttling, server trouble, timeouts, failed connections
    if status in (401, 403, 404):
        return min(remote.retries, 1)  # a key rotated under a long run, an object just written
    return 0  # a request the server will refuse again (400, 405, 412, 416, ...)


_TIMEOUTS = frozenset(
    {"FSTimeoutError", "ReadTimeoutError", "ConnectTimeoutError", "ServerTimeoutError", "ConnectionTimeoutError"}
)
_RESETS = frozenset({
    "ServerDisconnectedError", "ClientConnectionError", "ClientOSError", "ClientPayloadError",
    "EndpointConnectionError", "ConnectionClosedError", "IncompleteReadError", "ResponseStreamingError",
    "ClientConnectorError", "ClientConnectorDNSError",
})  # fmt: skip


def call(what: str, path: RemotePath, fn: Callable[[], T]) -> T:
    """``fn()``, retried as the module's notes say; :class:`~bigsmall_torch.RemoteError` naming
    ``path``, what was done and the HTTP status when it keeps failing. Errors that are not about
    a request (missing credentials, a bad option) are raised as they are, at once."""
    remote = path.remote
    attempt = 0
    while True:
        try:
            return fn()
        except RemoteError:
            raise
        except Exception as exc:  # each store raises its own types
            status = _status(exc)
            if status is None:
                raise
            limit = _retries(status, remote)
            if attempt >= limit:
                label = f"HTTP {status}" if isinstance(status, int) else status
                reason = _REASONS.get(status, "") if isinstance(status, int) else ""
                raise RemoteError(
                    path,
                    f"{what} failed: {label}{f', {reason}' if reason else ''} after {attempt + 1} "
                    f"attempt(s): {type(exc).__name__}: {_short(exc, path)}",
                    status=status,
                    attempts=attempt + 1,
                ) from exc
            wait = min(remote.backoff_s * 2**attempt, 20.0) * random.uniform(0.5, 1.0)
            logger.info("%s: %s (%s); retry %d of %d in %.2f s", path.display, what, status, attempt + 1, limit, wait)
            _STATS.add(retries=1)
            time.sleep(wait)
            attempt += 1


_REASONS = {
    401: "not authorised (check the credentials)",
    403: "access denied (check the credentials)",
    404: "no such object",
    416: "range not satisfiable",
}


def _short(exc: BaseException, path: RemotePath) -> str:
    text = " ".join(str(exc).split()).replace(path.url, path.display)
    return text if len(text) <= 300 else text[:297] + "..."


# -- object metadata -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ObjectInfo:
    """What the package needs to know of an object: its size, a version tag (ETag, or the
    modification time, or ""), its modification time (seconds, 0 when unknown), whether it is a
    folder (a prefix)."""

    size: int
    version: str
    mtime: float
    is_dir: bool = False


_INFO: OrderedDict[tuple[str, str], ObjectInfo] = OrderedDict()
_INFO_LOCK = threading.Lock()
_INFO_MAX = 100_000


def _mtime(detail: Mapping[str, Any]) -> float:
    value: Any = (
        detail.get("LastModified") or detail.get("mtime") or detail.get("last_modified") or detail.get("updated")
    )
    if hasattr(value, "timestamp"):
        return float(value.timestamp())
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        from datetime import datetime
        from email.utils import parsedate_to_datetime

        for parse in (datetime.fromisoformat, parsedate_to_datetime):
            try:
                return parse(value.replace("Z", "+00:00")).timestamp()
            except (ValueError, TypeError):
                continue
    return 0.0


def _info_of(detail: Mapping[str, Any]) -> ObjectInfo:
    kind = detail.get("type", "file")
    version = detail.get("ETag") or detail.get("etag") or detail.get("generation") or detail.get("md5Hash") or ""
    mtime = _mtime(detail)
    size = detail.get("size")
    return ObjectInfo(
        size=int(size) if size is not None else -1,
        version=str(version).strip('"') or (str(mtime) if mtime else ""),
        mtime=mtime,
        is_dir=kind == "directory",
    )


def _remember(path: RemotePath, info: ObjectInfo) -> None:
    with _INFO_LOCK:
        _INFO[(path.url, path.remote._token())] = info
        while len(_INFO) > _INFO_MAX:
            _INFO.popitem(last=False)


def object_info(path: RemotePath) -> ObjectInfo:
    """The object's :class:`ObjectInfo` (one request the first time in a process, retried);
    :class:`FileNotFoundError` when there is no such object (after the retry of a 404)."""
    key = (path.url, path.remote._token())
    with _INFO_LOCK:
        known = _INFO.get(key)
    if known is not None:
        return known
    fs = filesystem(path.protocol, path.remote)

    def ask() -> Any:
        _STATS.add(requests=1)
        return _run(fs, "info", path.url, timeout=path.remote.timeout_s)

    try:
        detail = call("reading the object's size", path, ask)
    except RemoteError as exc:
        if exc.status == 404:
            raise FileNotFoundError(errno.ENOENT, f"no such object ({exc.reason})", path.url) from exc
        raise
    info = _info_of(detail)
    if info.size < 0 and not info.is_dir:
        raise RemoteError(path, "the store did not tell the object's size", status=None, attempts=1)
    _remember(path, info)
    return info


def list_objects(root: RemotePath, pattern: str, *, recursive: bool) -> list[RemotePath]:
    """The objects under the prefix ``root`` whose name matches ``pattern`` (in ``root`` itself,
    or at any depth with ``recursive``), sorted; their sizes are remembered (no request later)."""
    import fnmatch

    fs = filesystem(root.protocol, root.remote)
    if root.protocol in ("http", "https"):
        raise ConfigError(
            f"Dataset.from_folder: {root.protocol}:// has no listing of objects; build the dataset "
            "with Dataset.from_csv (a URL per row) or Record(url) instead"
        )
    base = fs._strip_protocol(root.url).rstrip("/")

    def find() -> Any:
        # Many paged requests: each has the client's own timeout, the whole listing none.
        if recursive:
            return _run(fs, "find", base, withdirs=False, detail=True, timeout=None)
        return {d["name"]: d for d in _run(fs, "ls", base, detail=True, timeout=None)}

    found = call("listing the objects", root, find)
    out = []
    for name, detail in sorted(found.items()):
        if detail.get("type") == "directory":
            continue
        relative = name[len(base) :].lstrip("/") if name.startswith(base) else name.rsplit("/", 1)[-1]
        if not fnmatch.fnmatchcase(relative.rsplit("/", 1)[-1], pattern):
            continue
        path = root / relative
        _remember(path, _info_of(detail))
        out.append(path)
    return out


# -- the disk cache ------------------------------------------------------------------------------------


class DiskCache:
    """Fetched byte ranges of remote objects on local disk, shared by the processes of a node.

    One sparse file per object: its bytes at their own offsets, then (from the next multiple of
    16 KiB) one mark byte per 16 KiB block, set once the block's bytes are written. Data and marks
    live in one file, so removing it never leaves marks of bytes that are gone; writes of a block
    by several processes write the same bytes, so no lock is needed; a range is served from disk
    only when every block it touches is marked. Past ``max_bytes`` (disk blocks actually used) the
    objects least recently used are removed whole; a process holding one open reopens it (a fresh,
    empty one) at its next use. Any error of the disk (full, read-only, ...) is logged once and the
    bytes are read from the store instead: the cache never fails a read.
    """

    def __init__(self, folder: Path, max_bytes: int) -> None:
        self.folder = Path(folder)
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._open: OrderedDict[str, int] = OrderedDict()  # key -> descriptor
        self._touched: dict[str, float] = {}
        self._since_check = 0
        self._pid = os.getpid()
        self._warned = False

    @staticmethod
    def key(path: RemotePath, info: ObjectInfo) -> str:
        text = f"{path.url}\n{info.size}\n{info.version}"
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    def _file(self, key: str) -> Path:
        return self.folder / f"{key}.cache"

    def _fd(self, key: str, size: int) -> int:
        """This process's descriptor of ``key``'s file, (re)opened when it was removed."""
        with self._lock:
            if self._pid != os.getpid():  # descriptors of a parent process
                self._open.clear()
                self._pid = os.getpid()
            fd = self._open.get(key)
            if fd is not None and os.fstat(fd).st_nlink == 0:  # removed by a bound(): start over
                os.close(fd)
                del self._open[key]
                fd = None
            if fd is None:
                self.folder.mkdir(parents=True, exist_ok=True)
                fd = os.open(self._file(key), os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
                total = _marks_at(size) + -(-size // _CACHE_BLOCK)
                if os.fstat(fd).st_size < total:
                    os.ftruncate(fd, total)
                self._open[key] = fd
                while len(self._open) > 64:
                    _, old = self._open.popitem(last=False)
                    os.close(old)
            else:
                self._open.move_to_end(key)
            now = time.monotonic()
            if now - self._touched.get(key, 0.0) > 30:  # recently used, for bound()
                self._touched[key] = now
                os.utime(fd)
            return fd

    def _failed(self, what: str, exc: OSError) -> None:
        if not self._warned:
            self._warned = True
            logger.warning("disk cache %s: %s failed (%s); reading from the store instead", self.folder, what, exc)

    def get(self, key: str, size: int, start: int, end: int) -> bytes | None:
        """Bytes ``[start, end)`` of the object when every block they touch is cached, else None."""
        try:
            fd = self._fd(key, size)
            first, last = start // _CACHE_BLOCK, (end - 1) // _CACHE_BLOCK
            flags = os.pread(fd, last - first + 1, _marks_at(size) + first)
            if len(flags) != last - first + 1 or flags.count(0):
                return None
            out = os.pread(fd, end - start, start)
        except OSError as exc:
            self._failed("reading", exc)
            return None
        return out if len(out) == end - start else None

    def put(self, key: str, size: int, start: int, payload: bytes) -> None:
        """Store ``payload`` (bytes from ``start``; ``start`` block-aligned, and the end too unless
        it is the object's end) and then mark its blocks."""
        end = start + len(payload)
        assert start % _CACHE_BLOCK == 0 and (end % _CACHE_BLOCK == 0 or end == size)
        try:
            fd = self._fd(key, size)
            view, at = memoryview(payload), start
            while view:  # pwrite may write less than asked
                written = os.pwrite(fd, view, at)
                view, at = view[written:], at + written
            first, last = start // _CACHE_BLOCK, -(-end // _CACHE_BLOCK)
            os.pwrite(fd, b"\x01" * (last - first), _marks_at(size) + first)
        except OSError as exc:
            self._failed("writing", exc)
            return
        self._since_check += len(payload)
        if self._since_check > max(self.max_bytes // 50, 64 << 20):
            self._since_check = 0
            self.bound(keep=key)

    def bound(self, keep: str | None = None) -> None:
        """Remove the least recently used objects while the cache uses more than ``max_bytes``."""
        entries = []
        total = 0
        try:
            for entry in os.scandir(self.folder):
                if entry.name.endswith(".cache"):
                    try:
                        stat = entry.stat()
                    except FileNotFoundError:
                        continue
                    total += stat.st_blocks * 512
                    entries.append((stat.st_mtime, entry.name[: -len(".cache")], stat.st_blocks * 512))
        except OSError as exc:
            self._failed("listing", exc)
            return
        for _, key, used in sorted(entries):
            if total <= self.max_bytes:
                break
            if key == keep:
                continue
            with contextlib.suppress(FileNotFoundError):  # another process was first
                os.unlink(self._file(key))
            with self._lock:
                fd = self._open.pop(key, None)
            if fd is not None:
                os.close(fd)
            total -= used
            logger.info("disk cache %s: removed %s (%d MiB) to stay under %d MiB", self.folder, key, used >> 20, self.max_bytes >> 20)

    def used_bytes(self) -> int:
        """Disk bytes the cached objects use."""
        if not self.folder.is_dir():
            return 0
        return sum(e.stat().st_blocks * 512 for e in os.scandir(self.folder) if e.name.endswith(".cache"))


def _marks_at(size: int) -> int:
    """Where an object's marks start in its cache file."""
    return -(-size // _CACHE_BLOCK) * _CACHE_BLOCK


_DISK: dict[tuple[str, int], DiskCache] = {}


def disk_cache(remote: RemoteOptions) -> DiskCache | None:
    """The process's :class:`DiskCache` of ``remote.cache_dir`` (None without one)."""
    if remote.cache_dir is None:
        return None
    key = (os.fspath(remote.cache_dir), remote.cache_bytes)
    cache = _DISK.get(key)
    if cache is None:
        cache = _DISK[key] = DiskCache(Path(remote.cache_dir), remote.cache_bytes)
    return cache


# -- fetching ranges -------------------------------------------------------------------------------------


def _merge(ranges: Sequence[tuple[int, int]], gap: int) -> list[tuple[int, int]]:
    """Sorted ``[start, end)`` ranges merged where they overlap or lie within ``gap`` bytes."""
    merged: list[list[int]] = []
    for start, end in sorted(ranges):
        if merged and start - merged[-1][1] <= gap:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(a, b) for a, b in merged]


# -- S3 byte ranges through obstore ---------------------------------------------------------------

_S3_READS = ("auto", "obstore", "fsspec")
# Storage options obstore is given an equivalent of; fsspec's own (caching, not requests) are ignored.
_OBSTORE_OPTIONS = frozenset({"key", "secret", "token", "endpoint_url", "anon", "profile", "client_kwargs"})
_FSSPEC_ONLY = frozenset({
    "skip_instance_cache", "use_listings_cache", "listings_expiry_time", "max_paths", "default_block_size",
    "default_cache_type", "default_fill_cache",
})  # fmt: skip
# How long obstore keeps credentials resolved by botocore before asking again (at most: botocore's own
# expiry of temporary keys comes first). object_store refreshes keys due within 5 minutes, so this
# must be well above that, or it would ask on nearly every request.
_CREDENTIALS_S = 1800.0
_STORES: dict[tuple[int, str, str, float], Any] = {}  # (pid, bucket, options, timeout) -> S3Store, or None: s3fs
_STORES_LOCK = threading.Lock()
# The process in which obstore made its first request. obstore's runtime (its Rust threads) does not
# survive fork: in a process forked from that one a request hangs or crashes, so such a process
# (a DataLoader worker forked after the main process read tiles) reads with s3fs instead.
_OBSTORE_PID: int | None = None
_told_forked = False


def _obstore_refusal(options: Mapping[str, Any]) -> str:
    """Why obstore cannot read with these storage options ("" when it can, as far as the options
    tell: the region is looked up when the store is made)."""
    try:
        import obstore  # noqa: F401
    except ImportError:
        return f"obstore is not installed ({_EXTRA})"
    unknown = sorted(set(options) - _OBSTORE_OPTIONS - _FSSPEC_ONLY)
    client = options.get("client_kwargs") or {}
    if not isinstance(client, Mapping):
        unknown.append("client_kwargs")
    else:
        unknown += [f"client_kwargs[{k!r}]" for k in sorted(set(client) - {"region_name", "endpoint_url"})]
    if unknown:
        return f"storage option(s) {unknown} are understood by s3fs only (use s3_reads='fsspec' or 'auto')"
    return ""


class _StaticCredentials:
    """obstore's credential provider for a key given in the storage options."""

    def __init__(self, key: str, secret: str, token: str | None) -> None:
        self.credential = {"access_key_id": key, "secret_access_key": secret, "token": token, "expires_at": None}

    def __call__(self) -> dict[str, Any]:
        return self.credential


class _BotocoreCredentials:
    """obstore's credential provider over botocore's resolution (environment, profiles, SSO, instance
    roles), asked again every ``_CREDENTIALS_S`` so that refreshed temporary keys are picked up."""

    def __init__(self, credentials: Any) -> None:
        self.credentials = credentials

    def __call__(self) -> dict[str, Any]:
        from datetime import datetime, timedelta, timezone

        frozen = self.credentials.get_frozen_credentials()
        expires = datetime.now(timezone.utc) + timedelta(seconds=_CREDENTIALS_S)
        expiry = getattr(self.credentials, "_expiry_time", None)  # botocore's refreshable keys
        if isinstance(expiry, datetime) and expiry.tzinfo is not None:
            expires = min(expires, expiry)
        return {
            "access_key_id": frozen.access_key, "secret_access_key": frozen.secret_key, "token": frozen.token,
            "expires_at": expires,
        }  # fmt: skip


def _make_store(bucket: str, remote: RemoteOptions) -> tuple[Any, str]:
    """An obstore ``S3Store`` of ``bucket`` equivalent to s3fs with ``remote``'s options, or
    (None, why not)."""
    options = remote.storage_options
    why = _obstore_refusal(options)
    if why:
        return None, why
    import botocore.session
    from obstore.store import S3Store

    client = dict(options.get("client_kwargs") or {})
    endpoint = (
        options.get("endpoint_url") or client.get("endpoint_url")
        or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    )  # fmt: skip
    session = botocore.session.Session(profile=options.get("profile"))
    region = (
        client.get("region_name") or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        or session.get_config_variable("region") or ("us-east-1" if endpoint else None)
    )  # fmt: skip
    if not region:
        return None, "the bucket's region is unknown (give client_kwargs={'region_name': ...} or AWS_REGION)"
    config: dict[str, Any] = {"region": region}
    if endpoint:
        config["endpoint"] = endpoint
    provider: Any = None
    if options.get("anon"):
        config["skip_signature"] = True
    elif options.get("key") and options.get("secret"):
        provider = _StaticCredentials(options["key"], options["secret"], options.get("token"))
    else:
        credentials = session.get_credentials()
        if credentials is None:
            return None, "botocore found no AWS credentials"
        provider = _BotocoreCredentials(credentials)
    from datetime import timedelta

    timeout = timedelta(seconds=remote.timeout_s)
    store = S3Store(
        bucket,
        credential_provider=provider,
        client_options={
            "timeout": timeout, "connect_timeout": timeout,
            "allow_http": bool(endpoint) and str(endpoint).startswith("http://"),
        },
        retry_config={"max_retries": 0},  # retrying is done once, in call()
        **config,
    )  # fmt: skip
    return store, ""


def _s3_store(path: RemotePath) -> Any:
    """The obstore store that reads ``path``'s byte ranges, or None (s3fs reads them)."""
    global _told_forked
    remote = path.remote
    if path.protocol not in ("s3", "s3a") or remote.s3_reads == "fsspec":
        return None
    if remote.s3_reads == "auto":
        from torch.utils.data import get_worker_info

        if get_worker_info() is None:  # not a DataLoader worker: it may fork workers later
            return None
    if _OBSTORE_PID is not None and os.getpid() != _OBSTORE_PID:
        if not _told_forked:
            _told_forked = True
            logger.warning(
                "process %d was forked from process %d after obstore had run there, and obstore's runtime "
                "does not survive fork: s3:// byte ranges are read with s3fs here (slower). Start "
                "DataLoader workers with multiprocessing_context='spawn' or 'forkserver', or read no "
                "s3:// tiles in the main process before they start", os.getpid(), _OBSTORE_PID,
            )  # fmt: skip
        return None
    key = _store_key(path)
    bucket = key[1]
    with _STORES_LOCK:
        if key in _STORES:
            return _STORES[key]
    try:
        store, why = _make_store(bucket, remote)
    except Exception as exc:  # a profile that does not exist, an endpoint obstore refuses, ...
        store, why = None, f"{type(exc).__name__}: {exc}"
    if store is None:
        if remote.s3_reads == "obstore":
            raise ConfigError(f"RemoteOptions(s3_reads='obstore') cannot read {path.display}: {why}")
        logger.info("%s: byte ranges read by s3fs: %s", path.display, why)
    with _STORES_LOCK:
        return _STORES.setdefault(key, store)


def _store_key(path: RemotePath) -> tuple[int, str, str, float]:
    """``path``'s entry in ``_STORES``: per process (a forked worker makes its own), bucket and options."""
    return (os.getpid(), path._key.split("/", 1)[0], path.remote._token(), path.remote.timeout_s)


def _drop_store(path: RemotePath, why: str) -> None:
    """From now on, this process reads ``path``'s bucket with s3fs (``s3_reads="auto"``)."""
    key = _store_key(path)
    with _STORES_LOCK:
        _STORES[key] = None
    logger.warning("%s: obstore cannot read bucket %s (%s); s3fs reads it in this process", path.display, key[1], why)


_OBSTORE_STATUS = re.compile(r"status code: (\d{3})")


def _obstore_status(exc: BaseException) -> int | str | None:
    """The HTTP status (or ``"timeout"`` / ``"connection error"``) of an obstore error, from its
    text (obstore's exceptions carry no status attribute); None when it says none."""
    text = str(exc)
    match = _OBSTORE_STATUS.search(text)
    if match:
        return int(match.group(1))
    lowered = text.lower()  # (every retry error's text says "retry_timeout: ...": not a timeout)
    if "timed out" in lowered:
        return "timeout"
    if any(word in lowered for word in _OBSTORE_RESETS):
        return "connection error"
    return None


_OBSTORE_RESETS = (
    "error sending request", "connection refused", "connection reset", "connection closed", "broken pipe",
    "dns error", "incomplete message",
)  # fmt: skip
# What obstore says when the bucket is in another region than the one the store was given (S3
# answers with a redirect that object_store does not follow; botocore does).
_OBSTORE_REGION = ("redirect", "incorrectly configured region", "authorizationheadermalformed")


class RangeSource:
    """Byte ranges of one remote object: what the disk cache holds is read from it, the rest is
    fetched with one request per merged range, all of them concurrently (async stores) in one call.
    Picklable (the filesystem is looked up again in each process)."""

    def __init__(self, path: RemotePath, info: ObjectInfo) -> None:
        self.path = path
        self.info = info

    def fetch(self, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        """The bytes of each ``(offset, count)`` of ``ranges``, in order."""
        size = self.info.size
        cache = disk_cache(self.path.remote)
        key = DiskCache.key(self.path, self.info) if cache is not None else ""
        spans = [(offset, min(offset + count, size)) for offset, count in ranges]
        got: dict[tuple[int, int], bytes] = {}
        if cache is not None:
            for span in spans:
                cached = cache.get(key, size, *span)
                if cached is not None:
                    got[span] = cached
            if got:
                _STATS.add(hits=len(got))
        missing = [span for span in spans if span not in got]
        if missing:
            wanted = _merge(missing, _MAX_GAP)
            if cache is not None:  # whole blocks, so that everything fetched can be kept
                wanted = _merge(
                    [(a // _CACHE_BLOCK * _CACHE_BLOCK, min(-(-b // _CACHE_BLOCK) * _CACHE_BLOCK, size)) for a, b in wanted],
                    0,
                )
            blobs = self._get(wanted)
            for (a, b), blob in zip(wanted, blobs, strict=True):
                if cache is not None:
                    cache.put(key, size, a, blob)
                for span in missing:
                    if a <= span[0] and span[1] <= b:
                        got[span] = blob[span[0] - a : span[1] - a]
        return [got[span] for span in spans]

    def _get(self, wanted: Sequence[tuple[int, int]]) -> list[bytes]:
        url = self.path.url
        key = url.split("://", 1)[1].partition("/")[2]
        store = _s3_store(self.path)
        if store is not None and any(part in ("", ".", "..") for part in key.split("/")):
            store = None  # a key obstore's paths cannot hold (an empty, "." or ".." segment)
        fs = filesystem(self.path.protocol, self.path.remote) if store is None else None
        timeout = self.path.remote.timeout_s

        def fetch() -> list[bytes]:
            nonlocal store, fs
            _STATS.add(requests=len(wanted))  # attempts, failed ones included
            blobs: list[bytes] | None = None
            if store is not None:
                import obstore

                global _OBSTORE_PID
                if _OBSTORE_PID is None:  # before the first request: a fork from now on cannot use it
                    _OBSTORE_PID = os.getpid()
                try:
                    got = obstore.get_ranges(
                        store, key, starts=[a for a, _ in wanted], ends=[b for _, b in wanted], coalesce=0
                    )
                except Exception as exc:
                    text = str(exc).lower()
                    if self.path.remote.s3_reads != "auto" or not any(w in text for w in _OBSTORE_REGION):
                        raise
                    _drop_store(self.path, _short(exc, self.path))  # another region: botocore follows
                    store, fs = None, filesystem(self.path.protocol, self.path.remote)
                else:
                    blobs = [bytes(blob) for blob in got]
            if blobs is None and len(wanted) == 1:
                a, b = wanted[0]
                blobs = [_run(fs, "cat_file", url, start=a, end=b, timeout=timeout)]
            elif blobs is None:
                blobs = _run(
                    fs, "cat_ranges", [url] * len(wanted), [a for a, _ in wanted], [b for _, b in wanted],
                    on_error="raise", timeout=timeout * (1 + len(wanted) // 10),
                )  # fmt: skip
            _STATS.add(nbytes=sum(len(b) for b in blobs))
            for (a, b), blob in zip(wanted, blobs, strict=True):
                if len(blob) > b - a:  # a whole object for a range: retrying would not help
                    raise RemoteError(
                        self.path,
                        f"the server does not honour Range requests: it sent {len(blob)} bytes for a "
                        f"range of {b - a}; serve the slides from a server that does (or copy them)",
                        status=None,
                    )
                if len(blob) < b - a:
                    raise http.client.IncompleteRead(blob, b - a - len(blob))
            return blobs

        return call(f"reading {len(wanted)} byte range(s)", self.path, fetch)


# -- a file for tifffile -----------------------------------------------------------------------------------


class _Blocks:
    """Aligned blocks of objects, least recently used dropped past ``_MEMORY_BLOCKS_BYTES``."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.blocks: OrderedDict[tuple[str, str, int, int, int], bytes] = OrderedDict()
        self.total = 0

    def get(self, key: tuple[str, str, int, int, int]) -> bytes | None:
        with self.lock:
            block = self.blocks.get(key)
            if block is not None:
                self.blocks.move_to_end(key)
            return block

    def put(self, key: tuple[str, str, int, int, int], block: bytes) -> None:
        with self.lock:
            if key not in self.blocks:
                self.blocks[key] = block
                self.total += len(block)
            while self.total > _MEMORY_BLOCKS_BYTES and self.blocks:
                _, dropped = self.blocks.popitem(last=False)
                self.total -= len(dropped)


_BLOCKS = _Blocks()


class RemoteFile(io.RawIOBase):
    """A read-only, seekable file over a remote object, for tifffile and tiffslide.

    Reads are served from aligned blocks of ``block_bytes``, kept in a per-process LRU (and in the
    disk cache when there is one), so the many small reads of TIFF header parsing cost a few
    requests, and reopening the slide none."""

    def __init__(self, path: RemotePath) -> None:
        super().__init__()
        self.path = path
        self.info = object_info(path)
        self.size = self.info.size
        self.name = path.url
        self._pos = 0
        self._source = RangeSource(path, self.info)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        n = max(0, min(len(view), self.size - self._pos))
        if n:
            view[:n] = self.pread(self._pos, n)
            self._pos += n
        return n

    def pread(self, offset: int, count: int) -> bytes:
        """``count`` bytes from ``offset`` (fewer at the object's end)."""
        step = self.path.remote.block_bytes
        end = min(offset + count, self.size)
        if end <= offset:
            return b""
        first, last = offset // step, (end - 1) // step
        token = (self.path.url, self.info.version, self.size, step)
        blocks: dict[int, bytes] = {}
        missing = []
        for index in range(first, last + 1):
            block = _BLOCKS.get((*token, index))
            if block is None:
                missing.append(index)
            else:
                blocks[index] = block
        if missing:
            spans = [(i * step, min((i + 1) * step, self.size) - i * step) for i in missing]
            for index, block in zip(missing, self._source.fetch(spans), strict=True):
                _BLOCKS.put((*token, index), block)
                blocks[index] = block
        start, stop = offset - first * step, end - first * step
        if first == last:  # tifffile's many small reads: slice the block, never copy it whole
            return blocks[first][start:stop]
        return b"".join(blocks[i] for i in range(first, last + 1))[start:stop]

    def fileno(self) -> int:
        raise io.UnsupportedOperation("a remote object has no file descriptor")
