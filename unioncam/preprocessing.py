"""What a model is fed and what it comes with: the preprocessing and the loaded model.

Why its own module: both :mod:`unioncam.models` (built-in and torchvision models) and
:mod:`unioncam.timm_models` (the optional timm extra) build these, and the timm loader must
not import the model loader that imports it (they were an import cycle).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
from PIL import Image
from torch import nn

__all__ = ["Preprocessing", "LoadedModel", "INTERPOLATIONS", "IMAGENET_MEAN", "IMAGENET_STD",
           "TIMM_PREFIX"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: ``Preprocessing.interpolation`` names and the PIL filters they stand for (timm's names).
INTERPOLATIONS = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC,
                  "nearest": Image.NEAREST, "lanczos": Image.LANCZOS, "box": Image.BOX,
                  "hamming": Image.HAMMING}
TIMM_PREFIX = "timm:"


@dataclass(frozen=True)
class Preprocessing:
    """Resize the short side, center-crop, normalise — and say where the crop came from.

    ``__call__`` returns the normalised 3×S×S tensor and the crop box
    ``(left, top, right, bottom)`` in the *original* image's pixels.
    """

    resize_size: int = 256
    crop_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    #: The resize filter (torchvision's weights: bilinear; most timm weights: bicubic).
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, "
                             f"got {self.interpolation!r}")

    def with_size(self, crop_size: int) -> Preprocessing:
        """Same normalisation at another crop size, resize scaled in proportion."""
        resize = max(crop_size, round(self.resize_size * crop_size / self.crop_size))
        return replace(self, resize_size=resize, crop_size=crop_size)

    def crop_box(self, width: int, height: int) -> tuple[int, int, int, int]:
        """The center crop's box in original pixels (torchvision's Resize/CenterCrop rounding)."""
        new_w, new_h = self._resized(width, height)
        left = int(round((new_w - self.crop_size) / 2.0))
        top = int(round((new_h - self.crop_size) / 2.0))
        sx, sy = width / new_w, height / new_h
        return (round(left * sx), round(top * sy), round((left + self.crop_size) * sx),
                round((top + self.crop_size) * sy))

    def _resized(self, width: int, height: int) -> tuple[int, int]:
        if width <= height:
            return self.resize_size, int(self.resize_size * height / width)
        return int(self.resize_size * width / height), self.resize_size

    def __call__(self, image: Image.Image) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
        """Resize, center-crop and normalise in numpy; only the result becomes a tensor.

        Why numpy: this runs in a pipeline actor's decode threads, and a torch op big enough
        to go parallel makes each such thread start its own OpenMP team, after which the
        model in the main thread ran 1.45x slower for the rest of the process (measured on
        2 cores: 5.3 -> 3.6 images/s). The float32 operations and their order are those of
        ``(t.float() / 255 - mean) / std``, so the values are the same.
        """
        if image.mode != "RGB":
            image = image.convert("RGB")
        w, h = image.size
        new_w, new_h = self._resized(w, h)
        img = image.resize((new_w, new_h), INTERPOLATIONS[self.interpolation],
                           reducing_gap=None)
        left = int(round((new_w - self.crop_size) / 2.0))
        top = int(round((new_h - self.crop_size) / 2.0))
        a = np.asarray(img)[top:top + self.crop_size, left:left + self.crop_size]
        a = a.astype(np.float32) / np.float32(255)
        a = (a - np.asarray(self.mean, dtype=np.float32)) / np.asarray(self.std, dtype=np.float32)
        return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1))), self.crop_box(w, h)


@dataclass
class LoadedModel:
    """A model ready for CAMs, with what is needed to feed it and to record provenance."""

    model: nn.Module
    name: str
    weights: str | None
    preprocess: Preprocessing
    target_layer: str | None = None  # default layer for CAMs; None = automatic
    num_classes: int = 1000
    weights_sha256: str | None = None  # SHA-256 of the checkpoint file, when one was loaded
