"""Decoding: every odd-but-valid image becomes upright RGB; every broken one a typed error.

All inputs are generated for real with Pillow / OpenCV / tifffile from a real photo JPEG
(the suite's photo folder, row 0; no hand-written stand-ins): CMYK and YCCK JPEGs, 16-bit
PNG/TIFF, palette+transparency, alpha, grayscale, EXIF orientation 6, a PNG named .JPEG, a
6000x4500 photo, and truncated / corrupt / empty / unsupported / decompression-bomb files.
"""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from pipeline.data.decode import (
    DecodeError,
    Status,
    decode_image,
    decode_image_with_size,
    load_row,
    read_bytes,
)
from pipeline.data.location import redact_uri
from pipeline.data.manifest import Row


@pytest.fixture(scope="module")
def photo(sample_dir: Path, sample_labels) -> Path:
    """A real 500x375 RGB JPEG."""
    return sample_dir / sample_labels[0]["file"]


@pytest.fixture(scope="module")
def jpeg_bytes(photo: Path) -> bytes:
    return photo.read_bytes()


@pytest.fixture(scope="module")
def rgb(jpeg_bytes: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(jpeg_bytes))
    img.load()
    return img.convert("RGB")


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _arr(img: Image.Image) -> np.ndarray:
    return np.asarray(img).astype(np.int32)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_claiming(width: int, height: int) -> bytes:
    """A syntactically valid PNG whose header claims width x height (data is tiny)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", ihdr)
        + _chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + _chunk(b"IEND", b"")
    )


# ------------------------------------------------------------------------------ valid inputs
def test_plain_jpeg(jpeg_bytes: bytes, rgb: Image.Image) -> None:
    img = decode_image(jpeg_bytes)
    assert img.mode == "RGB" and img.size == (500, 375)
    assert np.array_equal(_arr(img), _arr(rgb))


def test_cmyk_jpeg(rgb: Image.Image) -> None:
    data = _save(rgb.convert("CMYK"), "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    img = decode_image(data)
    assert img.mode == "RGB" and img.size == rgb.size
    assert np.abs(_arr(img) - _arr(rgb)).mean() < 6  # colours survive (not inverted)


def test_ycck_jpeg(rgb: Image.Image) -> None:
    # Encode (Y, Cb, Cr, K=0) as the 4 components of an Adobe JPEG and flag it transform=2
    # (YCCK): libjpeg then decodes YCC->RGB->CMYK, i.e. exactly what a YCCK file is.
    ycc = np.asarray(rgb.convert("YCbCr"))
    four = np.dstack([ycc, np.zeros(ycc.shape[:2], np.uint8)])
    data = bytearray(_save(Image.fromarray(four, "CMYK"), "JPEG", quality=95))
    adobe = data.find(b"Adobe")
    assert adobe > 0 and data[adobe + 11] == 0
    data[adobe + 11] = 2
    raw = Image.open(io.BytesIO(bytes(data)))
    assert raw.mode == "CMYK" and raw.info.get("adobe_transform") == 2
    img = decode_image(bytes(data))
    assert img.mode == "RGB"
    assert np.abs(_arr(img) - _arr(rgb)).mean() < 6


def test_16bit_gray_png_is_rescaled_not_clipped() -> None:
    ramp = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (16, 1))
    data = _save(Image.fromarray(ramp), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    img = decode_image(data)
    out = _arr(img)
    assert img.mode == "RGB" and out.shape == (16, 64, 3)
    assert np.abs(out[..., 0] - np.rint(ramp / 257.0)).max() <= 1
    assert out[..., 0].min() == 0 and out[..., 0].max() == 255 and len(np.unique(out)) > 50


def test_16bit_rgb_png_and_tiff() -> None:
    cv2 = pytest.importorskip("cv2")
    tifffile = pytest.importorskip("tifffile")
    rng = np.random.default_rng(0)
    rgb16 = rng.integers(0, 65536, size=(20, 30, 3), dtype=np.uint16)
    ok, png = cv2.imencode(".png", rgb16[..., ::-1])  # OpenCV is BGR
    assert ok
    buf = io.BytesIO()
    tifffile.imwrite(buf, rgb16, photometric="rgb")
    gray_buf = io.BytesIO()
    tifffile.imwrite(gray_buf, rgb16[..., 0])
    for data in (png.tobytes(), buf.getvalue()):
        out = _arr(decode_image(data))
        assert out.shape == (20, 30, 3)
        assert np.abs(out - (rgb16 >> 8)).max() <= 1
    gray = _arr(decode_image(gray_buf.getvalue()))
    assert np.abs(gray[..., 0] - np.rint(rgb16[..., 0] / 257.0)).max() <= 1


def test_palette_with_transparency_goes_on_white(rgb: Image.Image) -> None:
    pal = rgb.resize((40, 30)).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    index = pal.getpixel((0, 0))
    data = _save(pal, "PNG", transparency=index)
    reopened = Image.open(io.BytesIO(data))
    assert reopened.mode == "P" and "transparency" in reopened.info
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Pillow's "convert to RGBA" warning must not escape
        img = decode_image(data)
    out = np.asarray(img)
    mask = np.asarray(pal) == index
    assert img.mode == "RGB" and mask.any()
    assert (out[mask] == 255).all()
    # Opaque pixels keep their palette colour.
    opaque = np.asarray(pal.convert("RGB"))[~mask]
    assert np.array_equal(out[~mask], opaque)


def test_alpha_and_grayscale(rgb: Image.Image) -> None:
    rgba = rgb.resize((32, 24)).convert("RGBA")
    a = np.asarray(rgba).copy()
    a[:, :16, 3] = 0  # left half fully transparent
    out = np.asarray(decode_image(_save(Image.fromarray(a, "RGBA"), "PNG")))
    assert (out[:, :16] == 255).all()
    assert np.array_equal(out[:, 16:], a[:, 16:, :3])
    la = _save(rgb.resize((32, 24)).convert("LA"), "PNG")
    assert decode_image(la).mode == "RGB"
    gray = decode_image(_save(rgb.convert("L"), "JPEG"))
    g = np.asarray(gray)
    assert gray.mode == "RGB" and (g[..., 0] == g[..., 1]).all() and (g[..., 1] == g[..., 2]).all()


def test_exif_orientation_is_applied(rgb: Image.Image) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    rotated = _save(rgb, "JPEG", quality=90, exif=exif.tobytes())
    plain = _save(rgb, "JPEG", quality=90)
    img, (h, w) = decode_image_with_size(rotated)
    assert img.size == (375, 500)  # (width, height): shape swapped
    assert (h, w) == (500, 375)
    expected = decode_image(plain).transpose(Image.Transpose.ROTATE_270)
    assert np.array_equal(np.asarray(img), np.asarray(expected))


def test_png_named_jpeg(tmp_path: Path, rgb: Image.Image) -> None:
    path = tmp_path / "really_a_png.JPEG"
    path.write_bytes(_save(rgb, "PNG"))
    img = decode_image(read_bytes(str(path)), uri=str(path))
    assert np.array_equal(np.asarray(img), np.asarray(rgb))


def test_very_large_jpeg_draft(rgb: Image.Image) -> None:
    big = _save(rgb.resize((6000, 4500), Image.Resampling.BILINEAR), "JPEG", quality=80)
    full, size = decode_image_with_size(big)
    assert full.size == (6000, 4500) and size == (4500, 6000)
    small, size = decode_image_with_size(big, target_size=256)
    # 1/8 scale would give 750x563 -> still >= 256 on the short side, so the draft applies.
    assert small.size == (750, 563) and size == (4500, 6000)
    with pytest.raises(DecodeError) as e:
        decode_image(big, max_pixels=20_000_000)
    assert e.value.status is Status.TOO_LARGE


# ------------------------------------------------------------------------------ failures
def _fails(data: bytes, status: Status, uri: str = "s3://bucket/dir/img_01.JPEG") -> str:
    with pytest.raises(DecodeError) as e:
        decode_image(data, uri=uri)
    assert e.value.status is status, str(e.value)
    msg = str(e.value)
    assert "\n" not in msg and uri in msg and len(msg) <= 300
    return msg


def test_truncated_jpeg_is_never_accepted(jpeg_bytes: bytes, rgb: Image.Image) -> None:
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    _fails(jpeg_bytes[: len(jpeg_bytes) // 2], Status.TRUNCATED)
    _fails(jpeg_bytes[:-2], Status.TRUNCATED)  # only the EOI marker missing
    progressive = _save(rgb, "JPEG", progressive=True)
    _fails(progressive[: len(progressive) // 2], Status.TRUNCATED)
    png = _save(rgb, "PNG")
    _fails(png[: len(png) // 2], Status.TRUNCATED)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_corrupt_empty_unsupported(jpeg_bytes: bytes, rgb: Image.Image) -> None:
    rng = np.random.default_rng(1)
    _fails(b"", Status.EMPTY)
    _fails(jpeg_bytes[:200] + rng.bytes(len(jpeg_bytes) - 200), Status.CORRUPT)
    _fails(b"\xff\xd8\xff" + rng.bytes(5000), Status.CORRUPT)
    _fails(b"\x89PNG\r\n\x1a\n" + rng.bytes(300), Status.CORRUPT)
    png = bytearray(_save(rgb.resize((64, 48)), "PNG"))
    png[60:70] = b"0123456789"  # inside IDAT: CRC/zlib stream broken
    _fails(bytes(png), Status.CORRUPT)
    _fails(b"<svg xmlns='http://www.w3.org/2000/svg'/>", Status.UNSUPPORTED)
    _fails(b"%PDF-1.7\n" + rng.bytes(100), Status.UNSUPPORTED)
    msg = _fails(b"\x00\x00\x00\x18ftypheic" + rng.bytes(100), Status.UNSUPPORTED)
    assert "HEIF" in msg
    _fails(b"just some text, not an image", Status.UNSUPPORTED)


def test_decompression_bombs() -> None:
    # Beyond Pillow's own hard limit: refused when the header is parsed.
    _fails(_png_claiming(100_000, 100_000), Status.TOO_LARGE)
    # Within Pillow's limit but above ours: refused before any pixel is decoded.
    with pytest.raises(DecodeError) as e:
        decode_image(_png_claiming(3000, 3000), max_pixels=1_000_000)
    assert e.value.status is Status.TOO_LARGE and "9000000" in str(e.value)


def test_read_bytes_errors(tmp_path: Path, photo: Path) -> None:
    missing = tmp_path / "nope.JPEG"
    with pytest.raises(DecodeError) as e:
        read_bytes(str(missing))
    assert e.value.status is Status.MISSING and str(missing) in str(e.value)
    with pytest.raises(DecodeError) as e:
        read_bytes(f"file://{missing}")
    assert e.value.status is Status.MISSING
    with pytest.raises(DecodeError) as e:
        read_bytes(str(tmp_path))
    assert e.value.status is Status.READ_ERROR
    (tmp_path / "zero.JPEG").write_bytes(b"")
    assert read_bytes(str(tmp_path / "zero.JPEG")) == b""
    assert read_bytes(f"file://{photo}") == photo.read_bytes()


def test_redaction_keeps_secrets_out_of_messages() -> None:
    url = "https://user:hunter2@example.com/a/b.jpg?X-Amz-Signature=abc123"
    red = redact_uri(url)
    assert "hunter2" not in red and "abc123" not in red and "example.com/a/b.jpg" in red
    with pytest.raises(DecodeError) as e:
        decode_image(b"", uri=url)
    assert "hunter2" not in str(e.value) and "abc123" not in str(e.value)


def test_decode_error_pickles() -> None:
    import pickle

    err = pickle.loads(pickle.dumps(DecodeError(Status.CORRUPT, "x: bad")))
    assert err.status is Status.CORRUPT and str(err) == "x: bad"


# ------------------------------------------------------------------------------ load_row
def test_load_row_with_real_preprocessing(tmp_path: Path, rgb: Image.Image, photo: Path) -> None:
    from unioncam.models import Preprocessing

    pre = Preprocessing().with_size(112)
    exif = Image.Exif()
    exif[0x0112] = 6
    big = rgb.resize((3200, 2400), Image.Resampling.BILINEAR)
    big_path = tmp_path / "big_rotated.jpg"
    big_path.write_bytes(_save(big, "JPEG", quality=85, exif=exif.tobytes()))

    t, (h, w), box, status, msg = load_row(Row(0, str(photo), 0), pre)
    assert status is Status.OK and msg == "" and tuple(t.shape) == (3, 112, 112)
    assert (h, w) == (375, 500) and box == pre.crop_box(500, 375)

    # Rotated and drafted: sizes and crop box are in ORIGINAL upright pixels.
    t, (h, w), box, status, _ = load_row(Row(1, str(big_path), None), pre)
    assert status is Status.OK and tuple(t.shape) == (3, 112, 112)
    assert (h, w) == (3200, 2400)
    assert box == pre.crop_box(2400, 3200)
    t_full, *_ = load_row(Row(1, str(big_path), None), pre, draft=False)
    assert float((t - t_full).abs().mean()) < 0.05  # the draft changes pixels only slightly

    # Inline bytes win over the uri; failures never raise.
    row = Row(2, "/does/not/exist.jpg", None, data=photo.read_bytes())
    assert load_row(row, pre)[3] is Status.OK
    t, hw, box, status, msg = load_row(Row(3, str(tmp_path / "missing.jpg"), None), pre)
    assert t is None and hw == (-1, -1) and box == (-1, -1, -1, -1)
    assert status is Status.MISSING and "missing.jpg" in msg
    t, *_, status, msg = load_row(Row(4, None, None, data=b"garbage bytes"), pre)
    assert t is None and status is Status.UNSUPPORTED and "row 4" in msg


def test_preprocessing_equals_torchvision_transforms(sample_dir: Path) -> None:
    """The numpy preprocessing is torchvision's Resize/CenterCrop/ToTensor/Normalize.

    It is numpy (not torch) so that decode threads never start OpenMP teams, which slowed
    the model in the main thread by 1.45x for the rest of the process (README, pipeline
    benchmark). Values must not change for it.
    """
    import torch
    from torchvision import transforms as T

    from unioncam.models import Preprocessing

    files = sorted(sample_dir.glob("*.JPEG"))[:6]
    assert files, f"no photos in {sample_dir}"
    for size in (224, 96):
        pre = Preprocessing().with_size(size)
        ref = T.Compose([T.Resize(pre.resize_size), T.CenterCrop(pre.crop_size), T.ToTensor(),
                         T.Normalize(pre.mean, pre.std)])
        for f in files:
            img = Image.open(f).convert("RGB")
            got, box = pre(img)
            assert got.dtype == torch.float32 and got.is_contiguous()
            torch.testing.assert_close(got, ref(img), atol=1e-6, rtol=0)
            assert box == pre.crop_box(*img.size)
