"""Maps as pictures: a colormap, and a map blended onto the photo at the crop the model saw."""

from __future__ import annotations

import io

import numpy as np

__all__ = ["colorize", "overlay_image", "png_bytes"]


def colorize(m: np.ndarray, cmap: str = "jet") -> np.ndarray:
    """A ``H x W`` map in [0,1] -> ``H x W x 3`` uint8 through a matplotlib colormap."""
    m = np.nan_to_num(np.clip(np.asarray(m, dtype=np.float32), 0.0, 1.0))
    try:
        import matplotlib

        rgba = matplotlib.colormaps[cmap](m)
        return (rgba[..., :3] * 255).round().astype(np.uint8)
    except Exception:
        # A simple jet without matplotlib: piecewise-linear R, G, B ramps.
        r = np.clip(1.5 - np.abs(4 * m - 3), 0, 1)
        g = np.clip(1.5 - np.abs(4 * m - 2), 0, 1)
        b = np.clip(1.5 - np.abs(4 * m - 1), 0, 1)
        return (np.stack([r, g, b], -1) * 255).round().astype(np.uint8)


def overlay_image(
    image,
    m: np.ndarray,
    crop_box: tuple[int, int, int, int],
    *,
    alpha: float = 0.5,
    cmap: str = "jet",
):
    """Blend a map onto the original image at the crop box the model saw.

    The map covers only the center crop (``crop_box`` in original pixels); it is resized
    to the box with bilinear interpolation and blended there, the rest of the photo is
    shown unchanged, so the overlay lines up with the photo as the user knows it.
    """
    from PIL import Image

    image = image.convert("RGB")
    left, top, right, bottom = (int(v) for v in crop_box)
    w, h = right - left, bottom - top
    if w <= 0 or h <= 0:
        raise ValueError(f"empty crop box {crop_box}")
    m = np.nan_to_num(np.asarray(m, dtype=np.float32))
    mm = Image.fromarray(m, mode="F").resize((w, h), Image.BILINEAR)
    heat = Image.fromarray(colorize(np.asarray(mm), cmap=cmap), mode="RGB")
    region = image.crop((left, top, right, bottom))
    blended = Image.blend(region, heat, float(alpha))
    out = image.copy()
    out.paste(blended, (left, top))
    return out


def png_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()
