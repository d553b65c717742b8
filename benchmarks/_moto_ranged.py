"""moto's S3 server whose ranged GETs read only the range: ``python -m benchmarks._moto_ranged``
takes ``python -m moto.server``'s arguments.

moto (5.x) answers ``GET`` with ``Range: bytes=a-b`` by reading the whole object from its buffer
(``FakeKey.value``) and then slicing it, so every 200 KB tile-row request of a 44 MB slide costs
as much as reading 44 MB (64 ms against 11 ms for a 1 MB object, measured with boto3). Real object
stores serve a range in time proportional to the range. This module runs moto's own server with
one change: for a GET whose ``Range`` is a single ``bytes=a-b`` or ``bytes=a-``, the body handed to
moto's own range handling reads only ``[a, b]`` from the object's buffer. Everything else
(authentication, signatures, headers, errors, listing, uploads) is moto's, unchanged.

Used by ``benchmarks.bench_remote`` (its S3 rows) unless ``--moto-as-is``; the tests use moto as it
is (they check correctness, not speed).
"""

from __future__ import annotations

import re
import threading
from typing import Any

from moto.s3.models import FakeKey
from moto.s3.responses import S3Response
from moto.server import main

_SIMPLE_RANGE = re.compile(r"bytes=(\d+)-(\d*)$")
_local = threading.local()
_whole_value = FakeKey.value


class _RangeReader:
    """What moto's range handling needs of an object's body (its length and one slice), reading
    only the slice from the key's buffer."""

    def __init__(self, key: FakeKey) -> None:
        self.key = key

    def __len__(self) -> int:
        return int(self.key.contentsize)

    def __getitem__(self, span: slice) -> bytes:
        start, stop, _ = span.indices(len(self))
        with self.key.lock:
            self.key._value_buffer.seek(start)
            return bytes(self.key._value_buffer.read(max(0, stop - start)))


def _value(key: FakeKey) -> Any:
    return _RangeReader(key) if getattr(_local, "ranged", False) else _whole_value.fget(key)  # type: ignore[attr-defined]


_get_object = S3Response.get_object


def _ranged_get_object(self: S3Response) -> Any:
    match = _SIMPLE_RANGE.match(self.headers.get("range", "") or "")
    _local.ranged = (
        match is not None
        and "partNumber" not in self.querystring
        and (not match.group(2) or int(match.group(1)) <= int(match.group(2)))
    )
    try:
        return _get_object(self)
    finally:
        _local.ranged = False


FakeKey.value = property(_value, _whole_value.fset)  # type: ignore[assignment, attr-defined]
S3Response.get_object = _ranged_get_object  # type: ignore[method-assign]

if __name__ == "__main__":
    main()
