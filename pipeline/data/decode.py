"""Reading and decoding images robustly: every input ends as an RGB image or a typed error.

Why this module is strict: explaining 1.28M ImageNet images means meeting every odd file the
dataset holds (CMYK and YCCK JPEGs, PNGs named ``.JPEG``, 16-bit PNG/TIFF, palette images
with transparency, EXIF-rotated photos) and some broken ones. The odd-but-valid ones must be
decoded the same way every time; the broken ones must never be "explained" silently, so each
gets a :class:`Status` and a one-line message naming the URI, which the worker stores per
row. In particular a truncated JPEG is an error here (Pillow's ``LOAD_TRUNCATED_IMAGES`` is
left ``False`` and ``load()`` is forced inside the ``try``): a half-grey image would produce a
confident but meaningless map.

Nothing in this module touches Ray, zarr or the manifest; :func:`load_row` is the one
convenience the worker calls per row.
"""

from __future__ import annotations

import enum
import io
import warnings
import zlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from PIL import Image, ImageFile

from pipeline.data.location import is_local, local_path, redact_uri
from pipeline.data.rgb import ORIENTATION_OPS, to_rgb
from pipeline.data.rgb import orientation as orientation_of
from pipeline.messages import one_line

if TYPE_CHECKING:  # torch is only needed by the caller's preprocess
    from torch import Tensor

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "DRAFT_FACTOR",
    "DecodeError",
    "Status",
    "decode_image",
    "decode_image_with_size",
    "draft_target",
    "load_row",
    "read_bytes",
    "redact_uri",
]

#: Pillow's own hard limit (2 x ``Image.MAX_IMAGE_PIXELS``): about 13.4k x 13.4k pixels.
DEFAULT_MAX_PIXELS = 178_956_970

#: Longest error message kept (messages are stored per row in the Zarr ``error`` array).
MAX_MESSAGE_CHARS = 300

# Never accept truncated files: a partially decoded image is worse than an error.
ImageFile.LOAD_TRUNCATED_IMAGES = False
# We enforce our own explicit limit (``max_pixels``) and report it as Status.TOO_LARGE, so
# Pillow's warning between 1x and 2x its limit is noise (and would escape as a warning).
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


class Status(enum.IntEnum):
    """Per-image outcome, stored as uint8 in the Zarr ``status`` array.

    ``PENDING`` (255) is the array's fill value: a row nobody has written yet.
    """

    OK = 0
    MISSING = 1  # the URI does not exist
    EMPTY = 2  # zero bytes
    CORRUPT = 3  # recognised format, undecodable data
    TRUNCATED = 4  # data ends before the image does
    UNSUPPORTED = 5  # not an image format we decode (HEIC, SVG, PDF, text, ...)
    TOO_LARGE = 6  # more pixels than max_pixels (decompression-bomb guard)
    READ_ERROR = 7  # I/O failure other than "missing" (permissions, network, directory)
    MODEL_ERROR = 8  # decoded fine but the model/explainer failed on it (set by the worker)
    PENDING = 255  # not processed yet (the store's fill value)


class DecodeError(Exception):
    """A row that cannot become an RGB image; ``status`` says why, ``str()`` is one line."""

    def __init__(self, status: Status, message: str) -> None:
        self.status = Status(status)
        self.message = one_line(message, MAX_MESSAGE_CHARS)
        super().__init__(self.message)

    def __reduce__(self) -> tuple[Any, ...]:  # picklable across Ray/multiprocessing
        return (type(self), (self.status, self.message))


class Preprocess(Protocol):
    """What :func:`load_row` needs from ``unioncam.models.Preprocessing`` (duck-typed)."""

    def __call__(self, img: Image.Image) -> tuple[Tensor, tuple[float, float, float, float]]: ...


def _err(status: Status, uri: str | None, what: str) -> DecodeError:
    return DecodeError(status, f"{redact_uri(uri)}: {what}")


def _exc_text(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------
def read_bytes(uri: str, storage_options: dict[str, Any] | None = None) -> bytes:
    """All bytes of one image file: a local path, ``file://``, ``s3://``, ``gs://``, ...

    Local files are read with plain ``open`` (no fsspec overhead per image); remote ones
    through fsspec with ``storage_options``. Errors become :class:`DecodeError`
    (``MISSING`` or ``READ_ERROR``) naming the URI (credentials never appear: the URI is
    redacted and ``storage_options`` is never formatted). A zero-byte file is returned as
    ``b""``; :func:`decode_image` turns it into ``EMPTY``.
    """
    if is_local(uri):
        path = local_path(uri)
        try:
            with open(path, "rb") as fh:
                return fh.read()
        except FileNotFoundError:
            raise _err(Status.MISSING, uri, "no such file") from None
        except IsADirectoryError:
            raise _err(Status.READ_ERROR, uri, "is a directory, not a file") from None
        except PermissionError:
            raise _err(Status.READ_ERROR, uri, "permission denied") from None
        except OSError as exc:
            raise _err(Status.READ_ERROR, uri, _exc_text(exc)) from None
    try:
        import fsspec

        fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    except (ImportError, ValueError) as exc:
        scheme = uri.split("://", 1)[0]
        raise _err(
            Status.READ_ERROR, uri, f"no filesystem for '{scheme}://' ({_exc_text(exc)})"
        ) from None
    try:
        return bytes(fs.cat_file(path))
    except FileNotFoundError:
        raise _err(Status.MISSING, uri, "no such object") from None
    except IsADirectoryError:
        raise _err(Status.READ_ERROR, uri, "is a directory, not a file") from None
    except PermissionError:
        raise _err(Status.READ_ERROR, uri, "access denied") from None
    except Exception as exc:  # network, throttling, auth: all a READ_ERROR for this row
        raise _err(Status.READ_ERROR, uri, _exc_text(exc)) from None


# ---------------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------------
#: Formats we let Pillow open. An allowlist on purpose: Pillow also opens EPS (by running
#: Ghostscript), FITS, HDF5 stubs, TGA (no magic number: random bytes can "be" a TGA) ...
_ALLOWED_FORMATS = (
    "JPEG", "PNG", "GIF", "BMP", "DIB", "TIFF", "WEBP", "PPM", "ICO", "JPEG2000", "AVIF",
)  # fmt: skip
Image.init()
_OPEN_FORMATS = tuple(f for f in _ALLOWED_FORMATS if f in Image.OPEN)

#: Signatures of formats we decode: if one of these fails to open, the file is CORRUPT.
_KNOWN_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"\x00\x00\x00\x0cjP  ", "JPEG2000"),
    (b"\xff\x4f\xff\x51", "JPEG2000"),
)
#: Recognisable formats we do not decode: reported by name as UNSUPPORTED.
_UNSUPPORTED_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"%PDF", "PDF"),
    (b"%!PS", "PostScript/EPS"),
    (b"8BPS", "PSD"),
    (b"\xff\x0a", "JPEG XL"),
    (b"\x00\x00\x00\x0cJXL ", "JPEG XL"),
    (b"PK\x03\x04", "ZIP"),
    (b"\x1f\x8b", "gzip"),
)
_HEIF_BRANDS = (b"heic", b"heix", b"hevc", b"hevx", b"mif1", b"msf1", b"heim", b"heis")


def _sniff(data: bytes) -> tuple[str | None, str | None]:
    """(known decodable format, known undecodable format) from the first bytes."""
    head = data[:32]
    for sig, name in _KNOWN_SIGNATURES:
        if head.startswith(sig):
            return name, None
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP", None
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in (b"avif", b"avis"):
            return ("AVIF", None) if "AVIF" in _OPEN_FORMATS else (None, "AVIF")
        if brand in _HEIF_BRANDS:
            return None, "HEIF/HEIC"
        return None, f"ISO media ({brand.decode('latin-1')!r})"
    for sig, name in _UNSUPPORTED_SIGNATURES:
        if head.startswith(sig):
            return None, name
    stripped = head.lstrip()
    if stripped.startswith(b"<"):
        return None, "SVG/XML/HTML text"
    return None, None


def _check_png_chunks(data: bytes, uri: str | None) -> None:
    """Walk a PNG's chunks and verify every CRC.

    Why: Pillow does not check the CRC of image-data chunks, and a damaged deflate stream
    can still fill the image with garbage without any error; the CRCs catch that bit-rot.
    A chunk that runs past the end of the data means the file was cut: TRUNCATED.
    """
    pos, n = 8, len(data)
    while pos < n:
        if pos + 8 > n:
            raise _err(Status.TRUNCATED, uri, f"truncated PNG (chunk header cut at byte {pos})")
        length = int.from_bytes(data[pos : pos + 4], "big")
        kind = data[pos + 4 : pos + 8]
        end = pos + 12 + length
        if not kind.isalpha() or (pos == 8 and kind != b"IHDR"):
            raise _err(Status.CORRUPT, uri, f"corrupt PNG (invalid chunk at byte {pos})")
        if length > 0x7FFFFFFF:
            raise _err(Status.CORRUPT, uri, f"corrupt PNG (chunk length {length} at byte {pos})")
        if end > n:
            name = kind.decode("latin-1", "replace")
            raise _err(Status.TRUNCATED, uri, f"truncated PNG (chunk {name!r} cut at byte {n})")
        crc = int.from_bytes(data[end - 4 : end], "big")
        if zlib.crc32(data[pos + 4 : end - 4]) != crc:
            name = kind.decode("latin-1", "replace")
            raise _err(Status.CORRUPT, uri, f"corrupt PNG (CRC mismatch in chunk {name!r})")
        pos = end
        if kind == b"IEND":
            return


def _classify_load_error(exc: BaseException) -> tuple[Status, str]:
    """Map what Pillow raised while decoding pixel data to a Status."""
    if isinstance(exc, Image.DecompressionBombError):
        return Status.TOO_LARGE, _exc_text(exc)
    if isinstance(exc, MemoryError):
        return Status.TOO_LARGE, "out of memory while decoding"
    text = str(exc)
    if isinstance(exc, EOFError) or "truncated" in text.lower():
        return Status.TRUNCATED, f"truncated image data ({_exc_text(exc)})"
    if isinstance(exc, OSError) and ("decoder" in text and "not available" in text):
        return Status.UNSUPPORTED, _exc_text(exc)
    if isinstance(exc, (OSError, SyntaxError, ValueError, zlib.error, IndexError, TypeError)):
        return Status.CORRUPT, f"corrupt image data ({_exc_text(exc)})"
    return Status.CORRUPT, f"undecodable image ({_exc_text(exc)})"


# EXIF orientation -> the transpose that shows the image upright (as ImageOps.exif_transpose).
def _decode(
    data: bytes,
    *,
    max_pixels: int,
    target_size: int | None,
    uri: str | None,
) -> tuple[Image.Image, tuple[int, int]]:
    """Decode to RGB; also return the upright ORIGINAL size (h, w), before any draft."""
    if not data:
        raise _err(Status.EMPTY, uri, "empty file (0 bytes)")
    known, unsupported = _sniff(data)
    if known == "PNG":
        _check_png_chunks(data, uri)
    try:
        img = Image.open(io.BytesIO(data), formats=_OPEN_FORMATS)
    except Image.DecompressionBombError as exc:
        raise _err(Status.TOO_LARGE, uri, _exc_text(exc)) from None
    except Image.UnidentifiedImageError:
        if known is not None:
            raise _err(Status.CORRUPT, uri, f"corrupt {known} (header not decodable)") from None
        if unsupported is not None:
            raise _err(Status.UNSUPPORTED, uri, f"unsupported format: {unsupported}") from None
        raise _err(
            Status.UNSUPPORTED,
            uri,
            f"not a recognised image format (first bytes {data[:8].hex()})",
        ) from None
    except Exception as exc:  # plugins raise assorted types on bad headers
        status, what = _classify_load_error(exc)
        raise _err(status, uri, what) from None

    try:
        width, height = img.size
        if width <= 0 or height <= 0:
            raise _err(Status.CORRUPT, uri, f"invalid image size {width}x{height}")
        if width * height > max_pixels:
            raise _err(
                Status.TOO_LARGE,
                uri,
                f"{width}x{height} = {width * height} pixels exceeds max_pixels={max_pixels}",
            )
        orientation = orientation_of(img)
        if target_size and img.format in ("JPEG", "MPO"):
            # DCT-domain downscale by 1/2, 1/4 or 1/8 while both sides stay >= target_size:
            # a 6000x4000 photo decodes ~8x faster and in 1/64 of the memory.
            img.draft(None, (int(target_size), int(target_size)))
        try:
            img.load()  # forced here: Pillow is lazy, and a truncation shows only now
            rgb = to_rgb(img)
            if rgb is None:
                raise _err(Status.UNSUPPORTED, uri, f"unsupported pixel mode {img.mode!r}")
        except DecodeError:
            raise
        except Exception as exc:
            status, what = _classify_load_error(exc)
            raise _err(status, uri, what) from None
        op = ORIENTATION_OPS.get(orientation)
        if op is not None:
            rgb = rgb.transpose(op)
        upright = (width, height) if orientation < 5 else (height, width)
        if rgb.mode != "RGB":  # defensive: every branch above returns RGB
            rgb = rgb.convert("RGB")
        if rgb is not img:
            img.close()  # the source is no longer needed (the RGB result is a copy)
        return rgb, (upright[1], upright[0])
    except BaseException:
        img.close()
        raise


def decode_image(
    data: bytes,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    target_size: int | None = None,
    uri: str | None = None,
) -> Image.Image:
    """Decode image bytes to an upright 8-bit RGB ``PIL.Image`` (fully loaded).

    Handles CMYK/YCCK JPEG (ICC-managed when a profile is embedded), 16-bit PNG/TIFF
    (rescaled, not clipped), palette and alpha images (composited on white), grayscale,
    EXIF orientation, a PNG named ``.JPEG`` (the content decides, never the name).
    ``target_size``: for JPEGs, decode at a reduced scale whose shorter side is still
    >= ``target_size`` (what the preprocessing resizes to), which makes very large photos
    cheap; ``None`` decodes at full size. ``uri`` only names the image in errors.

    Raises :class:`DecodeError` with ``EMPTY``, ``CORRUPT``, ``TRUNCATED``, ``UNSUPPORTED``
    or ``TOO_LARGE`` (more than ``max_pixels`` declared pixels; Pillow's own limit of
    ``2 * PIL.Image.MAX_IMAGE_PIXELS`` applies on top).
    """
    img, _ = _decode(data, max_pixels=max_pixels, target_size=target_size, uri=uri)
    return img


def decode_image_with_size(
    data: bytes,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    target_size: int | None = None,
    uri: str | None = None,
) -> tuple[Image.Image, tuple[int, int]]:
    """As :func:`decode_image`, plus the upright original size ``(h, w)`` before any draft."""
    return _decode(data, max_pixels=max_pixels, target_size=target_size, uri=uri)


# ---------------------------------------------------------------------------------------------
# One manifest row -> one model input
# ---------------------------------------------------------------------------------------------
#: A JPEG is draft-decoded only down to DRAFT_FACTOR x the preprocessing's resize size.
DRAFT_FACTOR = 2


def draft_target(preprocess: Any) -> int | None:
    """The ``target_size`` :func:`load_row` passes to :func:`decode_image` for ``preprocess``.

    Why twice the resize size: the final resize then stays a >= 2x antialiased downscale, so
    the model input barely changes (typical ImageNet photos are not drafted at all), while a
    4000x3000 photo still decodes at 1/4 or 1/8 scale. Use it to reproduce the pipeline's
    input exactly: ``decode_image(data, target_size=draft_target(pre))``.
    """
    resize = getattr(preprocess, "resize_size", None)
    return DRAFT_FACTOR * int(resize) if resize else None


# ---------------------------------------------------------------------------------------------
_NO_SIZE = (-1, -1)
_NO_BOX = (-1, -1, -1, -1)


def load_row(
    row: Any,
    preprocess: Preprocess | Callable[[Image.Image], Any],
    storage_options: dict[str, Any] | None = None,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    draft: bool = True,
) -> tuple[Tensor | None, tuple[int, int], tuple[int, int, int, int], Status, str]:
    """Read, decode and preprocess one manifest row; never raises for a bad image.

    ``row`` is a :class:`pipeline.data.manifest.Row` (``row_id``, ``uri``, ``data``); inline
    ``data`` wins over ``uri``; a shard row's fetch ``error`` is its status. ``preprocess(img) -> (tensor, crop_box)`` is
    ``unioncam``'s ``Preprocessing``. With ``draft``, a large JPEG is decoded at reduced
    scale down to :func:`draft_target` (twice ``preprocess.resize_size``).

    Returns ``(tensor, (h, w), crop_box, status, message)``. On success: the tensor, the
    upright original size, the crop box in ORIGINAL pixels (for a drafted JPEG,
    ``preprocess.crop_box(w, h)`` of the original size when it exists, else the box scaled
    back), ``Status.OK`` and ``""``. On failure: ``None``, ``(-1, -1)``,
    ``(-1, -1, -1, -1)``, the status and a one-line message naming the URI.
    """
    uri = getattr(row, "uri", None)
    name = uri if uri is not None else f"row {getattr(row, 'row_id', '?')} (inline image)"
    try:
        data = getattr(row, "data", None)
        if data is None:
            if getattr(row, "error", None) is not None:  # a shard row whose fetch failed
                raise row.error
            if uri is None:
                raise DecodeError(Status.MISSING, f"{name}: row has neither uri nor data")
            data = read_bytes(uri, storage_options)
        target = draft_target(preprocess) if draft else None
        img, (orig_h, orig_w) = _decode(data, max_pixels=max_pixels, target_size=target, uri=name)
    except DecodeError as exc:
        return None, _NO_SIZE, _NO_BOX, exc.status, exc.message
    try:
        tensor, box = preprocess(img)
    except Exception as exc:  # preprocessing of a decoded RGB image should not fail
        what = f"{redact_uri(name)}: preprocessing failed ({_exc_text(exc)})"
        return None, _NO_SIZE, _NO_BOX, Status.CORRUPT, one_line(what, MAX_MESSAGE_CHARS)
    if (img.width, img.height) == (orig_w, orig_h):
        crop = tuple(int(round(float(v))) for v in box)
    elif callable(getattr(preprocess, "crop_box", None)):
        # Drafted: the preprocessing's own formula on the original size gives the box
        # exactly as an undrafted decode would (scaling the drafted box is off by ~1 px).
        crop = tuple(int(v) for v in preprocess.crop_box(orig_w, orig_h))
    else:
        sx, sy = orig_w / img.width, orig_h / img.height
        left, top, right, bottom = (float(v) for v in box)
        crop = (round(left * sx), round(top * sy), round(right * sx), round(bottom * sy))
    return tensor, (orig_h, orig_w), crop, Status.OK, ""
