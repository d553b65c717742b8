"""The ``"image"`` backend: plain images (stripped TIFFs, PNG, JPEG, BMP) read as one-level slides
with a virtual pyramid, by strips where the file has them, with mpp from the file or the record."""

from __future__ import annotations

import pickle
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import bigsmall_torch as bst
from bigsmall_torch.io import _image

tifffile = pytest.importorskip("tifffile")
Image = pytest.importorskip("PIL.Image")


def _pixels(height: int, width: int, channels: int = 3, *, seed: int = 0) -> np.ndarray:
    """Smooth blocks plus noise: compresses like a picture, every pixel distinct enough to test."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (height // 16 + 1, width // 16 + 1, channels), dtype=np.uint8)
    image = np.kron(base, np.ones((16, 16, 1), dtype=np.uint8))[:height, :width].astype(np.int16)
    image += rng.integers(-12, 13, image.shape, dtype=np.int16)
    return image.clip(0, 255).astype(np.uint8)


def _rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[:, :, None], 3, axis=2)


def _over_white(rgba: np.ndarray) -> np.ndarray:
    color, alpha = rgba[..., :3].astype(np.float64), rgba[..., 3:].astype(np.float64)
    return np.rint(color * alpha / 255 + 255 * (1 - alpha / 255)).astype(np.uint8)


# Each writer saves one image under the folder and returns its path and the RGB the decoder gives.
Writer = Callable[[Path], tuple[Path, np.ndarray]]


def _tiff(name: str, data: np.ndarray, **options: object) -> Writer:
    def write(folder: Path) -> tuple[Path, np.ndarray]:
        path = folder / name
        tifffile.imwrite(path, data, **options)
        decoded = tifffile.imread(path)
        if decoded.dtype == np.uint16:
            decoded = (decoded >> 8).astype(np.uint8)
        if decoded.ndim == 2:
            decoded = _rgb(decoded)
        if options.get("planarconfig") == "separate":
            decoded = np.moveaxis(decoded, 0, 2)
        if decoded.shape[2] == 4:
            decoded = _over_white(decoded)
        return path, decoded

    return write


def _pillow(name: str, image: Callable[[], object], **options: object) -> Writer:
    def write(folder: Path) -> tuple[Path, np.ndarray]:
        path = folder / name
        image().save(path, **options)  # type: ignore[attr-defined]
        with Image.open(path) as opened:
            if opened.mode == "I;16":
                decoded = _rgb((np.asarray(opened) >> 8).astype(np.uint8))
            elif opened.mode == "RGBA":
                decoded = _over_white(np.asarray(opened))
            else:
                decoded = np.asarray(opened.convert("RGB"))
        return path, decoded

    return write


def _palette() -> object:
    indices = (_pixels(333, 517, 1, seed=5)[:, :, 0] // 32).astype(np.uint8)
    image = Image.fromarray(indices, "P")
    image.putpalette([v for i in range(8) for v in (i * 30, 255 - i * 20, (i * 97) % 256)])
    return image


CASES: dict[str, Writer] = {
    "tiff-none-1493x901": _tiff("none.tiff", _pixels(901, 1493), photometric="rgb", rowsperstrip=64),
    "tiff-none-one-strip": _tiff("whole.tiff", _pixels(901, 1493, seed=1), photometric="rgb"),
    "tiff-lzw-640x480": _tiff("lzw.tiff", _pixels(480, 640, seed=2), photometric="rgb", compression="lzw", rowsperstrip=16),
    "tiff-deflate": _tiff("deflate.tiff", _pixels(901, 1493, seed=3), photometric="rgb", compression="zlib", rowsperstrip=50),
    "tiff-jpeg": _tiff("jpeg.tiff", _pixels(901, 1493, seed=4), photometric="rgb", compression="jpeg", rowsperstrip=32),
    "tiff-packbits": _tiff("packbits.tiff", _pixels(477, 611, seed=5), photometric="rgb", compression="packbits", rowsperstrip=20),
    "tiff-gray8": _tiff("gray8.tiff", _pixels(599, 701, 1, seed=6)[:, :, 0], photometric="minisblack", compression="lzw", rowsperstrip=24),
    "tiff-gray16": _tiff("gray16.tiff", (_pixels(599, 701, 1, seed=7)[:, :, 0].astype(np.uint16) * 257 + 3), photometric="minisblack", rowsperstrip=40),
    "tiff-rgb16": _tiff("rgb16.tiff", _pixels(311, 413, seed=8).astype(np.uint16) * 251, photometric="rgb", compression="zlib", rowsperstrip=30),
    "tiff-planar": _tiff("planar.tiff", np.moveaxis(_pixels(411, 333, seed=9), 2, 0), photometric="rgb", planarconfig="separate", compression="lzw", rowsperstrip=25),
    "tiff-rgba": _tiff("rgba.tiff", _pixels(300, 401, 4, seed=10), photometric="rgb", extrasamples=["unassalpha"], compression="lzw", rowsperstrip=33),
    "png-rgb": _pillow("rgb.png", lambda: Image.fromarray(_pixels(413, 517, seed=11))),
    "png-rgba": _pillow("rgba.png", lambda: Image.fromarray(_pixels(413, 517, 4, seed=12), "RGBA")),
    "png-gray": _pillow("gray.png", lambda: Image.fromarray(_pixels(413, 517, 1, seed=13)[:, :, 0], "L")),
    "png-gray16": _pillow("gray16.png", lambda: Image.fromarray(_pixels(300, 333, 1, seed=14)[:, :, 0].astype(np.uint16) * 257)),
    "png-palette": _pillow("palette.png", _palette),
    "jpeg": _pillow("photo.jpg", lambda: Image.fromarray(_pixels(413, 517, seed=15)), quality=90),
    "bmp": _pillow("picture.bmp", lambda: Image.fromarray(_pixels(413, 517, seed=16))),
}  # fmt: skip


def _regions(width: int, height: int) -> list[tuple[int, int, int, int]]:
    return [
        (0, 0, 64, 48),
        (width // 3, height // 3, 200, 150),  # crosses strip boundaries
        (width - 70, 10, 70, 90),  # the right edge
        (15, height - 33, 120, 33),  # the bottom edge
        (width - 1, height - 1, 1, 1),
        (0, 0, width, height),
    ]


@pytest.mark.parametrize("case", sorted(CASES))
def test_plain_images_read_as_the_decoder_gives_them(tmp_path: Path, case: str) -> None:
    path, expected = CASES[case](tmp_path)
    reader = bst.open_slide(path)
    try:
        assert reader.info.backend == "image"
        height, width = expected.shape[:2]
        assert reader.info.dimensions == (width, height)
        assert reader.info.tile_size is None
        for x, y, w, h in _regions(width, height):
            region = reader.read(x, y, 0, w, h)
            assert region.shape == (h, w, 3) and region.dtype == np.uint8
            assert region.flags.c_contiguous
            assert np.array_equal(region, expected[y : y + h, x : x + w]), (x, y, w, h)
    finally:
        reader.close()


@pytest.mark.parametrize(
    ("case", "codec"),
    [("tiff-lzw-640x480", "lzw"), ("tiff-deflate", "deflate"), ("tiff-jpeg", "jpeg"),
     ("tiff-none-1493x901", "none"), ("tiff-packbits", "packbits"), ("png-rgb", "png"),
     ("jpeg", "jpeg"), ("bmp", "bmp")],
)  # fmt: skip
def test_codec_names_the_compression(tmp_path: Path, case: str, codec: str) -> None:
    path, _ = CASES[case](tmp_path)
    assert bst.slide_info(path).codec == codec


def test_codec_of_tiled_slides(slide_folder: Path, cmu1: Path) -> None:
    assert bst.slide_info(slide_folder / "synthetic_000.tiff").codec == "jpeg"
    assert bst.slide_info(cmu1, backend="tiffslide").codec == "jpeg"
    assert bst.slide_info(cmu1, backend="openslide").codec == "jpeg"
    assert (
        bst.slide_info(cmu1.parent / "boxes_0.dcm").codec == "jpeg"
    )  # JPEG baseline transfer syntax


def test_only_the_strips_a_region_touches_are_decoded(tmp_path: Path) -> None:
    path, expected = CASES["tiff-lzw-640x480"](tmp_path)  # strips of 16 rows
    reader = bst.open_slide(path)
    source = reader._source  # type: ignore[attr-defined]
    decoded: list[int] = []
    decode = source._decode

    def counting(data: bytes, index: int, **kwargs: object) -> object:
        decoded.append(index)
        return decode(data, index, **kwargs)

    source._decode = counting
    assert np.array_equal(reader.read(100, 20, 0, 50, 20), expected[20:40, 100:150])  # rows 20..39
    assert decoded == [1, 2] and source.strips_decoded == 2
    reader.read(0, 30, 0, 640, 10)  # rows 30..39: both strips still decoded
    assert decoded == [1, 2]
    reader.read(300, 40, 0, 10, 9)  # rows 40..48: strip 2 again, strip 3 new
    assert decoded == [1, 2, 3]
    assert reader.resident_bytes == 3 * 16 * 640 * 3  # type: ignore[attr-defined]
    reader.close()


@pytest.mark.parametrize("compression", ["lzw", None], ids=["lzw", "uncompressed"])
def test_a_truncated_strip_is_a_read_error_naming_the_file(
    tmp_path: Path, compression: str | None
) -> None:
    image = _pixels(480, 640, seed=2)
    path = tmp_path / "whole.tiff"
    tifffile.imwrite(path, image, photometric="rgb", compression=compression, rowsperstrip=16)
    expected = image
    with tifffile.TiffFile(path) as tif:
        page = tif.pages.first
        cut = int(page.dataoffsets[-3]) + 10  # the last three strips lose their data
    data = path.read_bytes()
    damaged = tmp_path / "cut.tiff"
    damaged.write_bytes(data[:cut])
    reader = bst.open_slide(damaged)
    assert np.array_equal(reader.read(0, 0, 0, 640, 100), expected[:100])  # intact strips read
    with pytest.raises(bst.SlideReadError, match=r"cut\.tiff: strip 27 is truncated: 10 of its"):
        reader.read(0, 440, 0, 640, 5)  # rows of strip 27 (432..447)
    reader.close()


def _box_mean(image: np.ndarray, x: int, y: int, ds: int, width: int, height: int) -> np.ndarray:
    lx, ly = int(x / ds), int(y / ds)
    block = image[ly * ds : (ly + height) * ds, lx * ds : (lx + width) * ds].astype(np.float64)
    mean = block.reshape(height, ds, width, ds, 3).mean(axis=(1, 3))
    return np.floor(mean + 0.5).astype(np.uint8)


@pytest.mark.parametrize("kind", ["png", "tiff-lzw"])
def test_virtual_levels_are_exact_box_means(
    tmp_path: Path, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    image = _pixels(1100, 2300, seed=20)
    path = tmp_path / ("big.png" if kind == "png" else "big.tiff")
    if kind == "png":
        Image.fromarray(image).save(path)
    else:
        tifffile.imwrite(path, image, photometric="rgb", compression="lzw", rowsperstrip=7)
    reader = bst.open_slide(path)
    info = reader.info
    assert info.level_dimensions == ((2300, 1100), (1150, 550), (575, 275))
    assert info.level_downsamples == (1.0, 2.0, 4.0)
    for level, (x, y, w, h) in [(1, (101, 57, 300, 200)), (1, (2299, 1099, 1, 1)),
                                (2, (13, 9, 100, 80)), (2, (1303, 777, 249, 80)),
                                (2, (0, 0, 575, 275))]:  # fmt: skip
        ds = int(info.level_downsamples[level])
        lw, lh = info.level_dimensions[level]
        w, h = min(w, lw - int(x / ds)), min(h, lh - int(y / ds))
        assert np.array_equal(reader.read(x, y, level, w, h), _box_mean(image, x, y, ds, w, h))
    monkeypatch.setattr(_image, "_BAND_PIXELS", 5000)  # many bands per read: the same pixels
    assert np.array_equal(reader.read(0, 0, 2, 575, 275), _box_mean(image, 0, 0, 4, 575, 275))
    with pytest.raises(bst.SlideReadError, match="outside"):
        reader.read(4, 0, 2, 575, 10)
    reader.close()


def test_small_images_have_one_level() -> None:
    assert _image.virtual_levels(300, 700) == (((300, 700),), (1.0,))
    assert _image.virtual_levels(512, 512)[1] == (1.0, 2.0)
    assert _image.virtual_levels(511, 4000)[1] == (1.0,)


def test_mpp_from_tiff_resolution_tags(tmp_path: Path) -> None:
    image = _pixels(300, 400)
    cases = [
        ({"resolution": (40000, 40000), "resolutionunit": "CENTIMETER"}, 0.25),
        ({"resolution": (50800, 50800), "resolutionunit": "INCH"}, 0.5),
        (
            {"resolution": (72, 72), "resolutionunit": "INCH"},
            None,
        ),  # a writer's default, not a scan
        ({"resolution": (40000, 40000), "resolutionunit": "NONE"}, None),
        ({}, None),
    ]
    for i, (options, mpp) in enumerate(cases):
        path = tmp_path / f"res{i}.tiff"
        tifffile.imwrite(path, image, photometric="rgb", compression="lzw", **options)
        assert bst.slide_info(path).mpp == (None if mpp is None else pytest.approx(mpp)), options
    Image.fromarray(image).save(tmp_path / "dpi.png", dpi=(101600, 101600))  # pHYs: 4e6 px/m
    assert bst.slide_info(tmp_path / "dpi.png").mpp == pytest.approx(0.25, rel=1e-6)


def test_mpp_hint_from_the_record(tmp_path: Path) -> None:
    Image.fromarray(_pixels(300, 400)).save(tmp_path / "a.png")
    Image.fromarray(_pixels(300, 400, seed=1)).save(tmp_path / "b.png")
    tifffile.imwrite(tmp_path / "c.tiff", _pixels(300, 400), photometric="rgb",
                     resolution=(40000, 40000), resolutionunit="CENTIMETER")  # fmt: skip
    cache = bst.SlideCache(1)
    assert cache.get(tmp_path / "a.png").info.mpp is None
    assert cache.get(tmp_path / "a.png", mpp=0.25).info.mpp == 0.25
    assert cache.get(tmp_path / "b.png", mpp="0.5 ").info.mpp == 0.5  # a CSV's string; evicts a.png
    assert cache.get(tmp_path / "a.png").info.mpp == 0.25  # reopened: the hint is remembered
    assert cache.get(tmp_path / "c.tiff", mpp=1.0).info.mpp == pytest.approx(0.25)  # file wins
    assert pickle.loads(pickle.dumps(cache)).get(tmp_path / "b.png").info.mpp == 0.5
    for bad in (0, -1.0, "abc", float("nan"), True, [0.25]):
        with pytest.raises(bst.ConfigError, match=r"a\.png: the mpp hint .* must be a number > 0"):
            cache.get(tmp_path / "a.png", mpp=bad)  # type: ignore[arg-type]
    cache.close()


def test_from_csv_mpp_column(tmp_path: Path) -> None:
    for name in ("a.png", "b.png", "c.png"):
        Image.fromarray(_pixels(300, 400)).save(tmp_path / name)
    csv = tmp_path / "cohort.csv"
    csv.write_text("patient_id,wsi,ihc,mpp\n1,a.png,b.png,0.25\n2,c.png,,\n")
    dataset = bst.Dataset.from_csv(csv, record_columns=("wsi", "ihc"))
    first, second = dataset
    assert first.records["wsi"].info == {"mpp": 0.25} and first.records["ihc"].info == {"mpp": 0.25}
    assert second.records["wsi"].info == {}
    assert first.info == {"mpp": "0.25"}  # kept in patient.info as a string, as before
    unhinted = bst.Dataset.from_csv(csv, record_columns=("wsi", "ihc"), mpp_column=None)
    assert unhinted[0].records["wsi"].info == {}
    csv.write_text("patient_id,wsi,mpp\n1,a.png,0.25\n2,b.png,abc\n3,c.png,-1\n")
    with pytest.raises(bst.DatasetError, match=r"line 3: 'abc'; line 4: '-1'"):
        bst.Dataset.from_csv(csv)
    with pytest.raises(bst.ConfigError, match="mpp_column"):
        bst.Dataset.from_csv(csv, mpp_column="wsi")


def test_random_region_loader_at_an_mpp_on_a_png_with_a_record_mpp(tmp_path: Path) -> None:
    image = _pixels(900, 1200, seed=30)
    path = tmp_path / "plain.png"
    Image.fromarray(image).save(path)
    record = bst.Record(path, {"mpp": 0.25})
    dataset = bst.BigSmallDataset(
        bst.Dataset("d", [bst.Patient("p", {"wsi": record})]),
        bst.RandomRegionLoader(300, mpp=0.5, tile_aligned=False),
        bst.RandomCropCollector(patch_size=37), buffer_size=2, smallchunks_per_bigchunk=8,
        samples_per_epoch=48, seed=3,
    )  # fmt: skip
    reader = bst.open_slide(path)
    checked = 0
    for item in DataLoader(dataset, batch_size=None, num_workers=0):
        assert item["level"] == 1 and item["mpp"] == pytest.approx(0.5)
        want = torch.from_numpy(reader.read(int(item["x"]), int(item["y"]), 1, 37, 37)).permute(
            2, 0, 1
        )
        assert torch.equal(item["image"], want), (item["x"], item["y"])
        checked += 1
    assert checked == 48
    reader.close()
    without = bst.Dataset("d", [bst.Patient("p", {"wsi": bst.Record(path)})])
    with pytest.raises(
        bst.SlideError, match=r"plain\.png: mpp=0\.5 was asked but the slide records no mpp"
    ):
        bst.BigSmallDataset(without, bst.RandomRegionLoader(300, mpp=0.5), bst.RandomCropCollector(37),
                            buffer_size=2, smallchunks_per_bigchunk=8)  # fmt: skip


def test_decoded_images_are_bounded_by_bytes(tmp_path: Path, slide_folder: Path) -> None:
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(_pixels(100, 200, seed=i)).save(paths[-1])  # 60000 bytes decoded
    cache = bst.SlideCache(8, max_decoded_bytes=130_000)
    tiled = cache.get(slide_folder / "synthetic_000.tiff")
    first = cache.get(paths[0])
    assert first.resident_bytes == 60_000  # type: ignore[attr-defined]
    cache.get(paths[1])
    assert len(cache) == 3 and cache.decoded_bytes == 120_000
    cache.get(paths[2])  # over the budget: paths[0], the least recently used image, is closed
    assert len(cache) == 3 and cache.decoded_bytes == 120_000
    assert cache.get(slide_folder / "synthetic_000.tiff") is tiled  # tiled slides hold no bytes
    assert cache.get(paths[0]) is not first
    tight = bst.SlideCache(8, max_decoded_bytes=0)
    for path in paths:
        tight.get(path)  # the image just returned is never closed
    assert len(tight) == 1
    cache.close()
    tight.close()
    for bad in (-1, 1.5, True, "1"):
        with pytest.raises(bst.ConfigError, match="max_decoded_bytes must be an int >= 0"):
            bst.SlideCache(max_decoded_bytes=bad)  # type: ignore[arg-type]


def test_a_corrupt_png_names_the_file_and_every_backend(tmp_path: Path) -> None:
    Image.fromarray(_pixels(300, 400)).save(tmp_path / "whole.png")
    data = (tmp_path / "whole.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(bst.SlideOpenError) as info:
        bst.open_slide(tmp_path / "cut.png")
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 'cut.png'}: cannot be read as a slide")
    assert "tiffslide: " in message and "openslide: " in message and "image: " in message
    assert "backends tried: tiffslide, openslide, image" in message
    assert info.value.backends == ("tiffslide", "openslide", "image")


def _png_claiming(path: Path, width: int, height: int) -> None:
    """A small PNG whose header claims ``width x height`` pixels (a decompression bomb's shape)."""
    Image.fromarray(_pixels(8, 8)).save(path)
    data = bytearray(path.read_bytes())
    header = b"IHDR" + struct.pack(">II", width, height) + bytes(data[24:29])
    data[12:29] = header
    data[29:33] = struct.pack(">I", zlib.crc32(header))
    path.write_bytes(bytes(data))


def test_refusals_name_the_file_and_what_is_allowed(tmp_path: Path, slide_folder: Path) -> None:
    _png_claiming(tmp_path / "bomb.png", 100_000, 100_000)
    with pytest.raises(
        bst.SlideOpenError, match=r"bomb\.png: .*image: it is 100000 x 100000 pixels, more than"
    ):
        bst.open_slide(tmp_path / "bomb.png")
    tifffile.imwrite(tmp_path / "float.tiff", np.zeros((64, 64), np.float32))
    with pytest.raises(
        bst.SlideOpenError, match=r"float\.tiff: .*SampleFormat 3.*allowed: 1-16-bit unsigned"
    ):
        bst.open_slide(tmp_path / "float.tiff")
    tifffile.imwrite(tmp_path / "five.tiff", np.zeros((64, 64, 5), np.uint8), photometric="minisblack",
                     planarconfig="contig", extrasamples=["unspecified"] * 4)  # fmt: skip
    with pytest.raises(bst.SlideOpenError, match=r"five\.tiff: .*5 samples per pixel.*at most 4"):
        bst.open_slide(tmp_path / "five.tiff")
    with pytest.raises(
        bst.SlideOpenError, match=r"synthetic_000\.tiff: .*tiled TIFF.*tiffslide or openslide"
    ):
        bst.open_slide(slide_folder / "synthetic_000.tiff", backend="image")
    with pytest.raises(bst.ConfigError, match="'tiffslide', 'image'"):
        bst.open_slide(tmp_path / "float.tiff", backend="vips")


def test_from_folder_takes_plain_images_with_a_pattern(tmp_path: Path) -> None:
    Image.fromarray(_pixels(300, 400)).save(tmp_path / "a.png")
    Image.fromarray(_pixels(300, 400, seed=1)).save(tmp_path / "b.jpg")
    with pytest.raises(bst.DatasetError, match=r"no file matches pattern '\*\.svs'"):
        bst.Dataset.from_folder(tmp_path)
    dataset = bst.Dataset.from_folder(tmp_path, pattern="*")
    assert [p.id for p in dataset] == ["a", "b"]
    assert {bst.slide_info(p.records["wsi"].path).backend for p in dataset} == {"image"}
