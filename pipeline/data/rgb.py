"""Any decoded PIL image to 8-bit RGB as the model expects it: EXIF orientation, CMYK
through its ICC profile, transparency on white, 16-bit and float modes rescaled.

Why apart from :mod:`pipeline.data.decode`: these are pixel conversions with no failure
statuses of their own (a mode with no conversion returns ``None`` and the decoder names it
``UNSUPPORTED``), while the decoder is about bytes, formats and what went wrong.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

__all__ = ["ORIENTATION_OPS", "orientation", "to_rgb"]

#: EXIF orientation -> the transpose that makes the image upright.
ORIENTATION_OPS: dict[int, Image.Transpose] = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def orientation(img: Image.Image) -> int:
    """EXIF orientation (1..8), 1 when absent or unreadable (pixels are still fine then)."""
    try:
        value = int(img.getexif().get(0x0112, 1))
    except Exception:  # malformed EXIF must not cost us a valid image
        return 1
    return value if value in ORIENTATION_OPS else 1


def _cmyk_to_rgb(img: Image.Image) -> Image.Image:
    """CMYK -> RGB, colour-managed when the file embeds an ICC profile and LittleCMS exists.

    Pillow already undoes Adobe's inverted CMYK and decodes YCCK to CMYK; the naive
    conversion is used when there is no profile (or if colour management fails).
    """
    icc = img.info.get("icc_profile")
    if icc:
        try:
            from PIL import ImageCms

            src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            dst = ImageCms.createProfile("sRGB")
            out = ImageCms.profileToProfile(img, src, dst, outputMode="RGB")
            if out is not None:
                return out
        except Exception:  # a broken profile is not a broken image
            pass
    return img.convert("RGB")


def _on_white(img: Image.Image) -> Image.Image:
    """Composite an image with alpha over white (transparent pixels must not become black)."""
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    background.alpha_composite(rgba)
    return background.convert("RGB")


def _high_depth_to_rgb(img: Image.Image) -> Image.Image:
    """16-bit / 32-bit integer and float single-channel images -> 8-bit RGB.

    Pillow's ``convert("L")`` clips 16-bit values at 255 (a nearly white image), so the
    range is rescaled explicitly: integer modes are taken as 16-bit (0..65535), float mode
    as 0..1 when its maximum is <= 1, otherwise as 0..255.
    """
    arr = np.asarray(img)
    if img.mode == "F":
        arr = arr.astype(np.float64)
        finite = arr[np.isfinite(arr)]
        scale = 255.0 if finite.size and finite.max() <= 1.0 else 1.0
        arr = np.nan_to_num(arr * scale, nan=0.0, posinf=255.0, neginf=0.0)
    else:
        arr = np.clip(arr.astype(np.float64), 0, 65535) / 257.0
    gray = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
    return Image.fromarray(gray, "L").convert("RGB")


def to_rgb(img: Image.Image) -> Image.Image | None:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "CMYK":
        return _cmyk_to_rgb(img)
    if mode.startswith("I") or mode == "F":
        return _high_depth_to_rgb(img)
    if mode == "P":
        return _on_white(img) if "transparency" in img.info else img.convert("RGB")
    if mode in ("RGBA", "RGBa", "LA", "La", "PA"):
        return _on_white(img)
    if mode in ("L", "1", "YCbCr", "LAB", "HSV"):
        return img.convert("RGB")
    if mode in ("RGBX",):
        return img.convert("RGB")
    return None  # a pixel mode with no RGB conversion: the caller says UNSUPPORTED
