"""Slides by URL: a real S3-API server (moto's server mode, IAM authentication on) and a real HTTP
server honouring Range requests on localhost; a proxy in front of moto injects throttling and
latency. Patches and windows read by URL must equal those read from the local files."""

from __future__ import annotations

import pickle
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import s3fs  # noqa: F401  (the [remote] extra: part of the test extras)
import tifffile
import torch
from torch.utils.data import DataLoader

import _servers
import bigsmall_torch as bst
from bigsmall_torch.synthetic import write_synthetic_slide

BUCKET = "cohort"


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory, cmu1: Path) -> Path:
    """Two synthetic slides (one in a sub-folder), the real CMU-1 region, and a text file."""
    folder = tmp_path_factory.mktemp("remote-slides")
    write_synthetic_slide(folder / "a.tiff", width=2304, height=1792, tile_size=256, seed=1, tissue="blobs")
    (folder / "deep").mkdir()
    write_synthetic_slide(folder / "deep" / "b.tiff", width=2048, height=2048, tile_size=256, seed=2, tissue="full")
    shutil.copy(cmu1, folder / "cmu1.svs")
    # deflate tiles: not the fast path's, read by tiffslide over the remote file
    rng = np.random.default_rng(3)
    image = np.repeat(np.repeat(rng.integers(0, 255, (28, 40, 3), dtype=np.uint8), 32, 0), 32, 1)
    tifffile.imwrite(folder / "c.tiff", image, tile=(256, 256), compression="zlib", photometric="rgb")
    (folder / "notes.txt").write_text("not a slide")
    return folder


@pytest.fixture(scope="module")
def moto(local: Path) -> Iterator[_servers.Moto]:
    with _servers.moto_server() as server:
        client = server.client()
        client.create_bucket(Bucket=BUCKET)
        for file in sorted(p for p in local.rglob("*") if p.is_file()):
            client.upload_file(str(file), BUCKET, f"set/{file.relative_to(local).as_posix()}")
        yield server


@pytest.fixture(scope="module")
def web(local: Path) -> Iterator[Any]:
    server = _servers.range_server(local)
    yield server
    server.close()


@pytest.fixture
def proxy(moto: _servers.Moto) -> Iterator[Any]:
    server = _servers.proxy(moto.endpoint)
    yield server
    server.close()


def s3(moto: _servers.Moto, **options: Any) -> bst.RemoteOptions:
    return bst.RemoteOptions(storage_options=moto.storage_options(), **options)


def regions(info: bst.SlideInfo) -> list[tuple[int, int, int, int, int]]:
    """(x, y, level, w, h): tile-aligned, unaligned, at the right/bottom edge, every level."""
    width, height = info.dimensions
    out = [(0, 0, 0, 300, 200), (517, 263, 0, 700, 555), (width - 401, height - 333, 0, 401, 333)]
    for level in range(1, info.level_count):
        lw, lh = info.level_dimensions[level]
        ds = info.level_downsamples[level]
        out.append((int(37 * ds), int(91 * ds), level, min(lw - 37, 300), min(lh - 91, 200)))
    return out


# -- paths --------------------------------------------------------------------------------------------


def test_urls_stay_urls() -> None:
    record = bst.Record("s3://bkt/cohort/sub/a.svs")
    path = record.path
    assert isinstance(path, bst.RemotePath) and str(path) == "s3://bkt/cohort/sub/a.svs"
    assert (path.name, path.stem, path.suffix) == ("a.svs", "a", ".svs")
    assert str(path.parent) == "s3://bkt/cohort/sub" and str(path.parent / "b.svs") == "s3://bkt/cohort/sub/b.svs"
    assert str(path.relative_to("s3://bkt/cohort")) == "sub/a.svs"
    assert pickle.loads(pickle.dumps(record)) == record
    assert bst.Record("S3://bkt/x.svs/").path == bst.Record("s3://bkt/x.svs").path  # one spelling
    assert isinstance(bst.Record("file:///tmp/a.svs").path, Path)  # file:// is local
    assert isinstance(bst.Record("C:/slides/a.svs").path, Path)  # a drive letter is no scheme
    error = bst.SlideReadError(path, "broken")
    assert str(error) == "s3://bkt/cohort/sub/a.svs: broken"
    with pytest.raises(bst.ConfigError, match="storage_options or remote"):
        bst.open_slide("s3://bkt/a.svs", storage_options={}, remote=bst.RemoteOptions())
    with pytest.raises(bst.ConfigError, match="retries"):
        bst.RemoteOptions(retries=-1)
    with pytest.raises(bst.ConfigError, match="timeout_s"):
        bst.RemoteOptions(timeout_s=0)
    shown = repr(bst.RemoteOptions(storage_options={"secret": "hush", "client_kwargs": {"headers": {"Authorization": "Bearer t0k"}}}))
    assert "hush" not in shown and "t0k" not in shown and "client_kwargs" in shown
    signed = bst.RemotePath("https://h.org/a.svs?X-Amz-Signature=s1gn")
    assert "s1gn" not in repr(signed) and "s1gn" not in str(bst.SlideReadError(signed, "broken"))
    assert str(signed / "b.svs") == "https://h.org/a.svs/b.svs"  # a signature belongs to one object
    assert sorted([bst.RemotePath("s3://b/k"), Path("/a")]) == [Path("/a"), bst.RemotePath("s3://b/k")]
    with pytest.raises(bst.AnnotationError, match="local disk only"):
        bst.read_annotations("s3://bkt/a.geojson")


# -- reading ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("store", ["s3", "https"])
@pytest.mark.parametrize("name", ["a.tiff", "deep/b.tiff", "cmu1.svs", "c.tiff"])
def test_regions_by_url_equal_the_local_file(
    local: Path, moto: _servers.Moto, web: Any, store: str, name: str
) -> None:
    if store == "s3":
        url, remote = f"s3://{BUCKET}/set/{name}", s3(moto)
    else:
        url, remote = f"{web.url}/{name}", None
    before = bst.remote_stats()["requests"]
    reader = bst.open_slide(url, remote=remote, decode_threads=2)
    opened = bst.remote_stats()["requests"] - before
    expected = bst.open_slide(local / name)
    try:
        assert reader.info.backend == "tiffslide" and str(reader.info.path) == url
        assert reader.info.level_dimensions == expected.info.level_dimensions
        assert (reader.info.mpp, reader.info.codec, reader.info.tile_size) == (
            expected.info.mpp, expected.info.codec, expected.info.tile_size,
        )  # fmt: skip
        assert opened <= 3  # headers in a few 1 MiB blocks, not a request per IFD entry
        for x, y, level, w, h in regions(expected.info):
            before = bst.remote_stats()["requests"]
            got = reader.read(x, y, level, w, h)
            # the tiles of a region: one request per run of adjacent tiles (a tile row here)
            rows = (y // int(expected.info.level_downsamples[level]) + h - 1) // 256 - (
                y // int(expected.info.level_downsamples[level])
            ) // 256 + 1
            assert bst.remote_stats()["requests"] - before <= rows
            np.testing.assert_array_equal(got, expected.read(x, y, level, w, h))
    finally:
        reader.close()
        expected.close()


def test_slide_info_and_inspect_by_url(
    moto: _servers.Moto, web: Any, local: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from bigsmall_torch.cli import main

    info = bst.slide_info(f"{web.url}/cmu1.svs")
    assert info.level_dimensions == bst.slide_info(local / "cmu1.svs").level_dimensions
    # the CLI has no option for credentials: they come from the environment, as for the AWS CLI
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", moto.key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", moto.secret)
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto.endpoint)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    code = main(["inspect", f"s3://{BUCKET}/set/a.tiff", f"s3://{BUCKET}/set/none.tiff"])
    out = capsys.readouterr().out
    assert code == 1, out
    assert f"s3://{BUCKET}/set/a.tiff\n  backend:   tiffslide" in out
    assert "level 0:   2304 x 1792" in out and "tissue:" in out
    assert f"s3://{BUCKET}/set/none.tiff: error:" in out and "HTTP 404" in out


def test_openslide_and_plain_images_refuse_urls(web: Any) -> None:
    with pytest.raises(bst.SlideOpenError, match=r"openslide.*local files only"):
        bst.open_slide(f"{web.url}/cmu1.svs", backend="openslide")
    with pytest.raises(bst.SlideOpenError, match="tiffslide"):
        bst.open_slide(f"{web.url}/notes.txt")


def test_from_folder_lists_a_prefix(moto: _servers.Moto) -> None:
    flat = bst.Dataset.from_folder(f"s3://{BUCKET}/set", pattern="*.tiff", storage_options=moto.storage_options())
    assert [p.id for p in flat] == ["a", "c"]
    deep = bst.Dataset.from_folder(f"s3://{BUCKET}/set/", pattern="*.tiff", recursive=True, remote=s3(moto))
    assert [p.id for p in deep] == ["a", "c", "deep/b"]
    assert str(deep.patients[2].record("wsi").path) == f"s3://{BUCKET}/set/deep/b.tiff"
    assert deep.name == "set"
    with pytest.raises(bst.DatasetError, match=r"no object matches pattern '\*.ndpi'"):
        bst.Dataset.from_folder(f"s3://{BUCKET}/set", pattern="*.ndpi", storage_options=moto.storage_options())
    with pytest.raises(bst.ConfigError, match="no listing"):
        bst.Dataset.from_folder("https://example.org/slides", pattern="*.svs")


def test_credentials_from_the_environment(moto: _servers.Moto, monkeypatch: pytest.MonkeyPatch, local: Path) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", moto.key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", moto.secret)
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto.endpoint)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    reader = bst.open_slide(f"s3://{BUCKET}/set/deep/b.tiff", remote=bst.RemoteOptions(storage_options={"skip_instance_cache": True}))
    try:
        np.testing.assert_array_equal(reader.read(10, 20, 0, 64, 64), bst.open_slide(local / "deep" / "b.tiff").read(10, 20, 0, 64, 64))
    finally:
        reader.close()


# -- streams ------------------------------------------------------------------------------------------


def _train(dataset: bst.Dataset, batch_size: int | None = None, **options: Any) -> bst.BigSmallDataset:
    return bst.BigSmallDataset(
        dataset, bst.RandomRegionLoader(512), bst.RandomCropCollector(96), buffer_size=2,
        smallchunks_per_bigchunk=8, samples_per_epoch=64, seed=3, batch_size=batch_size, **options,
    )  # fmt: skip


def _samples(ds: Any, batched: bool) -> list[tuple[Any, ...]]:
    loader = DataLoader(ds, batch_size=None if batched else 16, num_workers=2)
    out = []
    for batch in loader:
        for i in range(len(batch["image"])):
            out.append((batch["patient_id"][i], int(batch["x"][i]), int(batch["y"][i]), batch["image"][i].clone()))
    return out


@pytest.mark.parametrize("batched", [False, True])
def test_training_by_url_equals_local(local: Path, moto: _servers.Moto, batched: bool) -> None:
    remote = bst.Dataset.from_folder(f"s3://{BUCKET}/set", pattern="*.tiff", recursive=True, remote=s3(moto))
    plain = bst.Dataset.from_folder(local, pattern="*.tiff", recursive=True)
    by_url = _train(remote, 16 if batched else None)
    assert by_url.prefetch == 4  # deeper for remote records
    got, expected = _samples(by_url, batched), _samples(_train(plain, 16 if batched else None), batched)
    assert len(got) == len(expected) == 64
    for (pid, x, y, image), (pid2, x2, y2, image2) in zip(got, expected, strict=True):
        assert (pid, x, y) == (pid2, x2, y2)
        assert torch.equal(image, image2)


def test_sliding_windows_and_tissue_by_url(local: Path, web: Any) -> None:
    def windows(dataset: bst.Dataset) -> list[tuple[Any, ...]]:
        ds = bst.SlidingWindowDataset(dataset, 256, level=0, tissue_only=True, block_size=1024, batch_size=8)
        out = []
        for batch in DataLoader(ds, batch_size=None, num_workers=2):
            for i in range(len(batch["image"])):
                out.append((batch["patient_id"][i], int(batch["x"][i]), int(batch["y"][i]), batch["image"][i].sum().item()))
        return sorted(out)

    remote = bst.Dataset("web", [bst.Patient("a", {"wsi": bst.Record(f"{web.url}/a.tiff")})])
    plain = bst.Dataset("local", [bst.Patient("a", {"wsi": bst.Record(local / "a.tiff")})])
    got = windows(remote)
    assert got == windows(plain) and 0 < len(got) < (2304 // 256) * (1792 // 256)  # tissue only


# -- failures -----------------------------------------------------------------------------------------


def test_missing_object_and_wrong_credentials(moto: _servers.Moto, proxy: Any) -> None:
    fast = {"backoff_s": 0.01}
    with pytest.raises(bst.SlideOpenError) as missing:
        bst.open_slide(f"s3://{BUCKET}/set/missing.tiff", remote=bst.RemoteOptions(storage_options=moto.storage_options(proxy.url), **fast))
    message = str(missing.value)
    assert f"s3://{BUCKET}/set/missing.tiff" in message and "HTTP 404" in message and "2 attempt(s)" in message
    assert proxy.faults.count("HEAD", "missing.tiff") == 2  # retried once
    with pytest.raises(bst.SlideOpenError) as denied:
        bst.open_slide(
            f"s3://{BUCKET}/set/a.tiff",
            remote=bst.RemoteOptions(storage_options=moto.storage_options(proxy.url, secret="wrong"), **fast),
        )
    assert "HTTP 403" in str(denied.value) and "credentials" in str(denied.value)
    # on_error="skip": the patient is left out and reported; the others stream
    patients = [
        bst.Patient("good", {"wsi": bst.Record(f"s3://{BUCKET}/set/a.tiff")}),
        bst.Patient("gone", {"wsi": bst.Record(f"s3://{BUCKET}/set/gone.tiff")}),
    ]
    ds = _train(bst.Dataset("mixed", patients, remote=s3(moto, **fast)), on_error="skip")
    assert list(ds.skipped) == ["gone"] and "HTTP 404" in ds.skipped["gone"]
    assert {s["patient_id"] for s in ds} == {"good"}


def test_throttling_is_retried_with_backoff(moto: _servers.Moto, proxy: Any, local: Path) -> None:
    remote = bst.RemoteOptions(storage_options=moto.storage_options(proxy.url), backoff_s=0.01, retries=3)
    reader = bst.open_slide(f"s3://{BUCKET}/set/deep/b.tiff", remote=remote)
    expected = bst.open_slide(local / "deep" / "b.tiff")
    try:
        proxy.faults.reset()
        proxy.faults.fail("b.tiff", 503, times=2)  # SlowDown twice, then served
        before = bst.remote_stats()["retries"]
        np.testing.assert_array_equal(reader.read(0, 0, 0, 256, 256), expected.read(0, 0, 0, 256, 256))
        assert bst.remote_stats()["retries"] - before == 2
        assert proxy.faults.count("GET", "b.tiff") == 3
        proxy.faults.reset()
        proxy.faults.fail("b.tiff", 503, times=100)  # an outage: retries, then a clear error
        with pytest.raises(bst.RemoteError) as failed:
            reader.read(512, 512, 0, 256, 256)
        assert failed.value.status == 503 and failed.value.attempts == 4
        assert "HTTP 503" in str(failed.value) and f"s3://{BUCKET}/set/deep/b.tiff" in str(failed.value)
        assert proxy.faults.count("GET", "b.tiff") == 4
        assert isinstance(failed.value, bst.SlideReadError)  # on_error="skip" covers it
        proxy.faults.reset()
        proxy.faults.fail("b.tiff", 400, times=100, code="InvalidRequest")  # refused again: no retry
        with pytest.raises(bst.RemoteError) as refused:
            reader.read(1024, 1024, 0, 256, 256)
        assert refused.value.status == 400 and refused.value.attempts == 1
        assert proxy.faults.count("GET", "b.tiff") == 1
    finally:
        reader.close()
        expected.close()


def test_a_server_ignoring_range_is_refused_not_retried(web: Any) -> None:
    with pytest.raises(bst.SlideOpenError, match="does not honour Range requests"):
        bst.open_slide(f"{web.url}/a.tiff?norange", remote=bst.RemoteOptions(block_bytes=16 * 1024))
    assert web.faults.count("GET", "norange") == 1  # the whole file once, not again per retry


def test_every_request_has_a_timeout(web: Any) -> None:
    remote = bst.RemoteOptions(timeout_s=0.3, retries=1, backoff_s=0.01)
    web.faults.latency_s = 2.0
    try:
        with pytest.raises(bst.SlideOpenError, match="timeout after 2 attempt"):
            bst.open_slide(f"{web.url}/a.tiff?slow", remote=remote)
    finally:
        web.faults.latency_s = 0.0


# -- the disk cache --------------------------------------------------------------------------------


def test_disk_cache_serves_the_second_epoch(local: Path, web: Any, tmp_path: Path) -> None:
    # small header blocks, so that the header reads do not fetch this small slide whole
    remote = bst.RemoteOptions(cache_dir=tmp_path / "cache", block_bytes=16 * 1024)
    dataset = bst.Dataset("web", [bst.Patient("a", {"wsi": bst.Record(f"{web.url}/a.tiff?cached")})], remote=remote)
    web.faults.reset()
    ds = bst.SlidingWindowDataset(dataset, 256, level=0, block_size=768, batch_size=16)

    def epoch() -> list[tuple[int, int, torch.Tensor]]:
        out = []
        for batch in DataLoader(ds, batch_size=None, num_workers=2):
            out += [(int(x), int(y), image.clone()) for x, y, image in zip(batch["x"], batch["y"], batch["image"], strict=True)]
        return sorted(out, key=lambda s: (s[1], s[0]))

    first = epoch()
    assert web.faults.count("GET", "cached") > 2  # headers and tiles
    web.faults.reset()
    second = epoch()
    assert web.faults.count("GET", "cached") == 0, web.faults.requests  # every byte from the disk cache
    expected = bst.open_slide(local / "a.tiff")
    assert len(first) == len(second) == 9 * 7
    for (x, y, image), (x2, y2, image2) in zip(first, second, strict=True):
        assert (x, y) == (x2, y2) and torch.equal(image, image2)
        assert torch.equal(image, torch.from_numpy(expected.read(x, y, 0, 256, 256)).permute(2, 0, 1))
    from bigsmall_torch.io.remote import disk_cache

    cache = disk_cache(remote)
    assert cache is not None and 0 < cache.used_bytes() <= (local / "a.tiff").stat().st_size + (1 << 20)


def test_disk_cache_stays_under_its_bound(local: Path, web: Any, tmp_path: Path) -> None:
    from bigsmall_torch.io.remote import DiskCache

    folder = tmp_path / "small"
    for name in ("a.tiff", "deep/b.tiff"):
        reader = bst.open_slide(f"{web.url}/{name}", remote=bst.RemoteOptions(cache_dir=folder))
        reader.read(0, 0, 0, 1024, 1024)
        reader.close()
    cache = DiskCache(folder, max_bytes=10)
    assert cache.used_bytes() > 10
    cache.bound()
    assert cache.used_bytes() == 0 and not list(folder.glob("*.cache"))
    # a process holding an object while it is removed starts over: never marks without bytes
    other = DiskCache(folder, max_bytes=1 << 30)
    block = bytes(range(256)) * 64  # one 16 KiB block
    other.put("k", len(block) * 2, 0, block)
    assert other.get("k", len(block) * 2, 0, len(block)) == block
    cache.bound()  # removes "k" under the other process's descriptor
    assert other.get("k", len(block) * 2, 0, len(block)) is None
    other.put("k", len(block) * 2, len(block), block)
    assert other.get("k", len(block) * 2, 0, 2 * len(block)) is None  # block 0 is gone with the file
    assert other.get("k", len(block) * 2, len(block), 2 * len(block)) == block


# -- who reads the tile ranges of s3:// slides ---------------------------------------------------------


def _tile_readers(proxy: Any, name: str) -> set[str]:
    """The clients that sent the tile GETs of ``name`` through ``proxy``: obstore or s3fs. Header
    reads (s3fs, whole ``RemoteOptions.block_bytes`` blocks from a block boundary) are left out."""
    requests, agents = proxy.faults.requests, proxy.faults.agents
    kinds = set()
    for (method, path, range_), agent in zip(requests, agents, strict=True):
        start = int(range_.removeprefix("bytes=").split("-")[0] or 0) if range_ else 0
        if method != "GET" or name not in path or start % bst.RemoteOptions().block_bytes == 0:
            continue
        kinds.add("obstore" if "object_store" in agent.lower() else "s3fs" if "botocore" in agent.lower() else agent)
    return kinds


def test_s3_tile_ranges_are_read_by_obstore_or_as_asked(moto: _servers.Moto, proxy: Any, local: Path) -> None:
    from bigsmall_torch.io.remote import _make_store

    expected = bst.open_slide(local / "deep" / "b.tiff").read(300, 400, 0, 600, 500)
    options = {**moto.storage_options(proxy.url), "requester_pays": False}
    # in this (main) process "auto" is s3fs: it may fork DataLoader workers later
    for reads, extra, reader_kinds in (
        ("auto", {}, {"s3fs"}), ("obstore", {}, {"obstore"}), ("fsspec", {}, {"s3fs"}),
        ("fsspec", {"requester_pays": False}, {"s3fs"}),
    ):  # fmt: skip
        storage = {**moto.storage_options(proxy.url), **extra}
        reader = bst.open_slide(f"s3://{BUCKET}/set/deep/b.tiff", remote=bst.RemoteOptions(storage_options=storage, s3_reads=reads))
        proxy.faults.reset()
        try:
            np.testing.assert_array_equal(reader.read(300, 400, 0, 600, 500), expected)
        finally:
            reader.close()
        assert _tile_readers(proxy, "b.tiff") == reader_kinds, (reads, proxy.faults.agents)
    # a key obstore's paths cannot hold ("." or ".." or empty segments): s3fs reads it
    moto.client().upload_file(str(local / "deep" / "b.tiff"), BUCKET, "set/odd/../b.tiff")
    forced = bst.RemoteOptions(storage_options=moto.storage_options(proxy.url), s3_reads="obstore")
    reader = bst.open_slide(f"s3://{BUCKET}/set/odd/../b.tiff", remote=forced)
    proxy.faults.reset()
    try:
        np.testing.assert_array_equal(reader.read(300, 400, 0, 600, 500), expected)
    finally:
        reader.close()
    assert _tile_readers(proxy, "b.tiff") == {"s3fs"}
    # what "auto" decides in a worker: obstore for these options, s3fs for one it has no equivalent of
    store, why = _make_store(BUCKET, bst.RemoteOptions(storage_options=moto.storage_options()))
    assert store is not None and why == ""
    store, why = _make_store(BUCKET, bst.RemoteOptions(storage_options=options))
    assert store is None and "requester_pays" in why
    with pytest.raises(bst.ConfigError, match="requester_pays"):
        bst.RemoteOptions(storage_options=options, s3_reads="obstore")
    with pytest.raises(bst.ConfigError, match="s3_reads must be one of"):
        bst.RemoteOptions(s3_reads="boto")


_WORKERS = """
import sys
import numpy as np
import torch
from torch.utils.data import DataLoader
import bigsmall_torch as bst

endpoint, key, secret, url, local = sys.argv[1:6]
remote = bst.RemoteOptions(storage_options={"key": key, "secret": secret, "endpoint_url": endpoint})
def train(record, remote=None):
    patients = [bst.Patient("b", {"wsi": bst.Record(record)})]
    return bst.BigSmallDataset(bst.Dataset("d", patients, remote=remote), bst.RandomRegionLoader(512),
                               bst.RandomCropCollector(96), buffer_size=2, smallchunks_per_bigchunk=8,
                               samples_per_epoch=64, seed=3)
got = list(DataLoader(train(url, remote), batch_size=16, num_workers=2))
want = list(DataLoader(train(local), batch_size=16, num_workers=2))
assert len(got) == len(want) == 4
assert all(torch.equal(a["image"], b["image"]) for a, b in zip(got, want))
"""


def test_forked_workers_read_s3_tiles_with_obstore(moto: _servers.Moto, proxy: Any, local: Path) -> None:
    """The default: a main process building a dataset and a DataLoader forking its workers (in a
    fresh process, so that nothing of this one ran obstore before): the workers read with obstore."""
    import subprocess
    import sys

    url = f"s3://{BUCKET}/set/deep/b.tiff"
    proxy.faults.reset()
    subprocess.run(
        [sys.executable, "-c", _WORKERS, proxy.url, moto.key, moto.secret, url, str(local / "deep" / "b.tiff")],
        check=True, timeout=300,
    )  # fmt: skip
    assert _tile_readers(proxy, "b.tiff") == {"obstore"}


@pytest.mark.parametrize("context", ["forkserver", "fork"])
def test_workers_read_s3_tiles_with_obstore_unless_forked_after_it_ran(
    moto: _servers.Moto, proxy: Any, local: Path, context: str
) -> None:
    """obstore's runtime does not survive fork: workers forked after the main process read tiles
    with it read with s3fs (and say so); workers of a fresh forkserver use obstore. Both equal the
    local file."""
    url = f"s3://{BUCKET}/set/deep/b.tiff"
    remote = bst.RemoteOptions(storage_options=moto.storage_options(proxy.url))
    forced = bst.RemoteOptions(storage_options=moto.storage_options(proxy.url), s3_reads="obstore")
    reader = bst.open_slide(url, remote=forced)  # obstore runs in this process
    try:
        reader.read(0, 0, 0, 256, 256)
    finally:
        reader.close()
    reference = _train(bst.Dataset("local", [bst.Patient("b", {"wsi": bst.Record(local / "deep" / "b.tiff")})]))
    ds = _train(bst.Dataset("s3", [bst.Patient("b", {"wsi": bst.Record(url)})], remote=remote))
    proxy.faults.reset()
    got = list(DataLoader(ds, batch_size=16, num_workers=2, multiprocessing_context=context))
    want = list(DataLoader(reference, batch_size=16, num_workers=2, multiprocessing_context=context))
    assert len(got) == len(want) == 4
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["x"], b["x"])
    assert _tile_readers(proxy, "b.tiff") == ({"obstore"} if context == "forkserver" else {"s3fs"})


def test_obstore_errors_map_to_statuses() -> None:
    from bigsmall_torch.io.remote import _obstore_status

    retry = "Generic S3 error: Error after 0 retries in 2ms, max_retries:0, retry_timeout:180s, source:"
    assert _obstore_status(Exception(retry + " HTTP status server error (503 Service Unavailable) ... "
                                     "Server returned non-2xx status code: 503 Service Unavailable")) == 503  # fmt: skip
    assert _obstore_status(Exception(retry + " error sending request for url (http://h/b/k)")) == "connection error"
    assert _obstore_status(Exception(retry + " operation timed out")) == "timeout"
    assert _obstore_status(Exception(retry + " Received redirect without LOCATION")) is None  # not a timeout
