"""Weights from a local checkpoint file, loaded safely, with one line for every way it can
not fit.

Why its own module: every model source (torchvision names, ``package.module:factory``,
timm) takes the same files, and a checkpoint is where a day-long run most often fails for
a reason the user can fix in a minute (a training wrapper's key prefix, another
architecture, a pickled ``nn.Module``). Each such case is one ``ValueError`` line that
names the file, before any image is read.

Formats: ``.safetensors`` (tensors only by construction) and torch files read with
``torch.load(weights_only=True)``, so no code from a file ever runs. The usual wrappers
are unwrapped (``{"state_dict": ...}``, ``{"model": ...}``, ``{"model_state_dict": ...}``,
``{"state_dict_ema": ...}`` last) and the usual prefixes stripped when every key carries
them and the model's own names do not (``module.`` from DataParallel/DDP, ``_orig_mod.``
from ``torch.compile``, ``model.`` from Lightning-style wrappers; a model that itself wraps
its network as ``self.model`` keeps the prefix).
"""

from __future__ import annotations

import hashlib
import os
import pickle
from collections.abc import Iterable

import torch
from torch import nn

__all__ = ["read_state_dict", "strip_prefixes", "load_checkpoint", "file_sha256"]

_WRAPPERS = ("state_dict", "model", "model_state_dict", "state_dict_ema")
_PREFIXES = ("module.", "_orig_mod.", "model.")
_SAFETENSORS_MAX_HEADER = 100_000_000


def file_sha256(path: str) -> str:
    """Hex SHA-256 of a file (the weights' identity in a store's provenance)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _is_safetensors(path: str) -> bool:
    """By name, or by content: an 8-byte little-endian header length, then a JSON object."""
    if path.endswith(".safetensors"):
        return True
    with open(path, "rb") as fh:
        head = fh.read(9)
    if len(head) < 9:
        return False
    n = int.from_bytes(head[:8], "little")
    return 0 < n < _SAFETENSORS_MAX_HEADER and head[8:9] == b"{"


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0].strip() if text else type(e).__name__


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file, unwrapped (key prefixes as in the file)."""
    if os.path.isdir(path):
        raise ValueError(f"weights: {path!r} is a directory (give the checkpoint file)")
    if not os.path.isfile(path):
        raise ValueError(f"weights: no such file {path!r}")
    if _is_safetensors(path):
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise ValueError(f"weights: {path!r} is a .safetensors file, which needs the "
                             "safetensors package (pip install 'unioncam[timm]')") from None
        try:
            state = load_file(path, device="cpu")
        except Exception as e:  # noqa: BLE001 - one line, whatever is wrong in the file
            raise ValueError(f"weights: cannot read {path!r} as safetensors: {_one_line(e)}") from None
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001
            if isinstance(e, pickle.UnpicklingError) or "Weights only load failed" in str(e):
                raise ValueError(
                    f"weights: {path!r} is not a weights-only checkpoint (it pickles Python "
                    "objects, not only tensors, and is not loaded because that could run code "
                    "from the file); save model.state_dict() with torch.save, or a .safetensors"
                ) from None
            raise ValueError(f"weights: cannot load checkpoint {path!r}: {_one_line(e)}") from None
    for key in _WRAPPERS:
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not state \
            or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"weights: {path!r} does not hold a state dict (name -> tensor)")
    return state


def strip_prefixes(state: dict[str, torch.Tensor], own: Iterable[str] = ()
                   ) -> dict[str, torch.Tensor]:
    """``state`` without the training wrappers' prefixes that the model's names ``own`` lack."""
    own = list(own)
    for prefix in _PREFIXES:
        if all(k.startswith(prefix) for k in state) and not (own and all(
                k.startswith(prefix) for k in own)):
            state = {k.removeprefix(prefix): v for k, v in state.items()}
    return state


def load_checkpoint(model: nn.Module, path: str, what: str = "the model",
                    state: dict[str, torch.Tensor] | None = None) -> None:
    """Load ``path`` (or its already-read ``state``) into ``model``, every tensor or none.

    ``what`` names the model in the message (``timm:vit_small_patch16_224``). Shapes are
    compared before loading, so a checkpoint of another architecture is one line, not
    PyTorch's list of every mismatch.
    """
    own = model.state_dict()
    state = strip_prefixes(read_state_dict(path) if state is None else state, own)
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing and len(missing) == len(own) and unexpected:
        raise ValueError(f"weights: {path!r} does not fit {what}: none of its {len(state)} "
                         f"tensor names is the model's (file e.g. {unexpected[:2]}, model e.g. "
                         f"{missing[:2]}); a checkpoint of another architecture?")
    if shapes:
        k = shapes[0]
        raise ValueError(f"weights: {path!r} does not fit {what}: {len(shapes)} tensors have "
                         f"another shape (e.g. {k}: file {tuple(state[k].shape)}, model "
                         f"{tuple(own[k].shape)}); a checkpoint of another architecture or size?")
    if missing or unexpected:
        raise ValueError(f"weights: {path!r} does not fit {what}: {len(missing)} missing "
                         f"tensors (e.g. {missing[:2]}), {len(unexpected)} unexpected "
                         f"(e.g. {unexpected[:2]})")
    model.load_state_dict(state, strict=True)
