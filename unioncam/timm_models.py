"""timm models for ``load_model("timm:<name>", weights=...)``: build, weights, preprocessing.

Why separate from :mod:`unioncam.models`: timm is an optional extra (``unioncam[timm]``),
so it is imported only here, only when a ``timm:`` name is asked for; ``import unioncam``
never imports it.

Weights (``weights=``):

* ``None`` — timm's random initialisation.
* a file path — a local checkpoint (:mod:`unioncam.checkpoint`: ``.safetensors`` or a
  weights-only torch file). A checkpoint whose classifier has another number of classes
  (a fine-tuned head) builds the model with that many classes.
* ``"pretrained"`` — timm's own weights for the name (``resnet50.a1_in1k`` picks a tag),
  only if they are already in the local Hugging Face cache (``HF_HUB_CACHE``, else
  ``HF_HOME/hub``, else ``~/.cache/huggingface/hub``). Nothing is ever downloaded: a job
  on a cluster node without network must fail in its first second, not hang on a retry
  loop.

The preprocessing is the model's own data config (``timm.data.resolve_model_data_config``):
mean, std, input size, crop fraction (resize = ⌊size / crop_pct⌋, timm's rule) and
interpolation, applied as a center crop.
"""

from __future__ import annotations

import difflib
import math
import os
from typing import Any

from torch import nn

from unioncam.checkpoint import file_sha256, load_checkpoint, read_state_dict, strip_prefixes
from unioncam.preprocessing import INTERPOLATIONS, TIMM_PREFIX, LoadedModel, Preprocessing

__all__ = ["load_timm", "PRETRAINED"]

#: The ``weights`` value that asks for timm's own pretrained weights from the local cache.
PRETRAINED = "pretrained"
_HUB_FILES = ("model.safetensors", "pytorch_model.bin")


def _timm():
    try:
        import timm
    except ImportError:
        raise ValueError("model: timm: names need the timm package "
                         "(pip install 'unioncam[timm]')") from None
    return timm


def load_timm(name: str, weights: str | None) -> LoadedModel:
    """Build ``timm:<name>`` with ``weights`` (module docstring); eval mode, on the CPU."""
    timm = _timm()
    full = f"{TIMM_PREFIX}{name}"
    if not name or not timm.is_model(name):
        close = difflib.get_close_matches(name.split(".")[0], timm.list_models(), n=3)
        hint = f" (close: {', '.join(close)})" if close else ""
        raise ValueError(f"model: timm has no model {name!r}{hint}; "
                         "timm.list_models('*vit*') lists them")
    digest = None
    if weights is None:
        model = _create(timm, name, pretrained=False)
    elif weights == PRETRAINED:
        path = _cached_pretrained(timm, name)
        model = _create(timm, name, pretrained=True, pretrained_cfg_overlay={"file": path})
    elif os.path.isfile(weights):
        state = read_state_dict(weights)
        kwargs = {}
        classes = _checkpoint_classes(timm, name, strip_prefixes(state))
        if classes is not None:
            kwargs["num_classes"] = classes
        model = _create(timm, name, pretrained=False, **kwargs)
        load_checkpoint(model, weights, full, state)
        digest = file_sha256(weights)
    else:
        raise ValueError(f"weights: {weights!r} is neither a file nor {PRETRAINED!r} "
                         f"(timm's own weights for {name}, from the local cache)")
    return LoadedModel(model.eval(), full, weights, _preprocessing(timm, model),
                       num_classes=int(getattr(model, "num_classes", 1000) or 1000),
                       weights_sha256=digest)


def _create(timm, name: str, **kwargs: Any) -> nn.Module:
    """``timm.create_model``, with ``dynamic_img_size=True`` where the model takes it.

    A dynamic ViT/Swin resamples its position embedding only when the input is not its
    native size, so at the native size it computes exactly what the static model does;
    elsewhere it lets ``--image-size`` work for transformers as it does for CNNs.
    """
    try:
        return timm.create_model(name, dynamic_img_size=True, **kwargs)
    except TypeError as e:
        if "dynamic_img_size" not in str(e):
            raise
    return timm.create_model(name, **kwargs)


def _checkpoint_classes(timm, name: str, state: dict) -> int | None:
    """The class count of the checkpoint's classifier, when it names timm's classifier."""
    cfg = timm.models.get_pretrained_cfg(name)
    head = getattr(cfg, "classifier", None) if cfg is not None else None
    if isinstance(head, tuple | list):
        head = head[0] if head else None
    weight = state.get(f"{head}.weight") if head else None
    return int(weight.shape[0]) if weight is not None and weight.dim() >= 1 else None


def _hub_cache_dir() -> str | None:
    """The Hugging Face hub cache as the environment says now (None: the library's default)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return None


def _cached_pretrained(timm, name: str) -> str:
    """The local file of timm's pretrained weights for ``name``; one line if not cached."""
    cfg = timm.models.get_pretrained_cfg(name)
    hub_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not hub_id:
        raise ValueError(f"weights: timm has no Hugging Face weights for {name!r}; "
                         "pass a checkpoint file")
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        raise ValueError("weights: 'pretrained' needs huggingface_hub (it comes with timm)") from None
    repo, _, revision = hub_id.partition("@")
    files = (cfg.hf_hub_filename,) if getattr(cfg, "hf_hub_filename", None) else _HUB_FILES
    cache = _hub_cache_dir()
    for filename in files:
        path = try_to_load_from_cache(repo, filename, cache_dir=cache, revision=revision or None)
        if isinstance(path, str) and os.path.isfile(path):
            return path
    where = cache or "~/.cache/huggingface/hub"
    raise ValueError(f"weights: timm's pretrained weights for {name} ({repo}) are not in the "
                     f"local Hugging Face cache ({where}) and are never downloaded here; "
                     f"fetch them once where there is network (timm.create_model({name!r}, "
                     "pretrained=True)) or pass a checkpoint file")


def _preprocessing(timm, model: nn.Module) -> Preprocessing:
    """The model's data config as a :class:`Preprocessing` (timm's eval transform)."""
    cfg = timm.data.resolve_model_data_config(model)
    size = int(cfg["input_size"][-1])
    crop_pct = float(cfg.get("crop_pct") or 0.875)
    interpolation = cfg.get("interpolation", "bilinear")
    if interpolation not in INTERPOLATIONS:
        interpolation = "bilinear"
    mean, std = (tuple(float(v) for v in cfg[k]) for k in ("mean", "std"))
    return Preprocessing(math.floor(size / crop_pct), size, mean, std, interpolation)
