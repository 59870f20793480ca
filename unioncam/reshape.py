"""Feature maps that are not N×C×H×W: the one reshape step every method shares.

Why one step: every method here (gradient, region and UnionCAM) reads the target layer as
an N×K×h×w map, K channels over an h×w grid of the image. Vision transformers do not
produce that: a ViT/DeiT block outputs a token sequence N×T×C (class and register tokens
first, then one token per patch), and Swin's stages are channels-last, N×H×W×C. A reshape
turns such an output into N×C×h×w. It is applied to the captured output *and* to its
gradient (both have the output's shape), right after the gradient pass, so the methods
themselves never see anything but N×K×h×w, and a region method's masks are the reshaped
grid's channels upsampled to the input like any CNN's.

A reshape is any callable ``tensor -> tensor`` (the signature of pytorch-grad-cam's
``reshape_transform``, so those functions work here unchanged), passed as ``reshape=`` to
any CAM. Without one, :func:`auto_reshape` picks it from the model:

* a model with ``num_prefix_tokens`` and a ``patch_embed`` (timm's ViT, DeiT, EVA, BEiT,
  ...): :class:`TokenGrid` drops the class/register/distillation tokens and lays the rest
  on the patch grid;
* a model whose features are channels-last (timm's ``output_fmt == "NHWC"``: Swin):
  :class:`ChannelsLast`, except at a convolution (its output is N×C×H×W already);
* anything else: no reshape (CNNs).

:func:`default_layer` is the matching automatic target layer for those families (see its
docstring for the choice and why); ``None`` lets the CNN rule of
:func:`unioncam.hooks.find_target_layer` decide.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["Reshape", "TokenGrid", "ChannelsLast", "auto_reshape", "default_layer"]

#: The reshape step's type: the layer's output (or its gradient) in, N×C×h×w out.
Reshape = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class TokenGrid:
    """N×T×C tokens → N×C×h×w: drop the first ``prefix_tokens``, lay the rest on the grid.

    The grid is square (h = w = √(T − prefix)) unless ``grid`` is given and matches the
    token count; a 4-D input passes through (a ViT's patch-embedding convolution). A layer
    whose T tokens are the grid alone (CaiT's blocks, which get the class token only
    later) is taken whole.
    """

    prefix_tokens: int = 1
    grid: tuple[int, int] | None = None

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.dim() != 3:
            return tokens
        n, t, c = tokens.shape
        for prefix in (self.prefix_tokens, 0):
            hw = self._grid(t - prefix)
            if hw is not None:
                return tokens[:, prefix:].reshape(n, *hw, c).permute(0, 3, 1, 2)
        raise ValueError(f"reshape: {t} tokens minus {self.prefix_tokens} prefix tokens do not "
                         "form a square patch grid; pass reshape= with the grid")

    def _grid(self, patches: int) -> tuple[int, int] | None:
        if self.grid is not None and self.grid[0] * self.grid[1] == patches:
            return self.grid
        side = math.isqrt(max(patches, 0))
        return (side, side) if patches > 0 and side * side == patches else None


@dataclass(frozen=True)
class ChannelsLast:
    """N×H×W×C → N×C×H×W (Swin's stages); anything not 4-D passes through."""

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        return features.permute(0, 3, 1, 2) if features.dim() == 4 else features


def _is_token_model(model: nn.Module) -> bool:
    return isinstance(getattr(model, "num_prefix_tokens", None), int) and hasattr(model, "patch_embed")


def _is_channels_last_model(model: nn.Module) -> bool:
    return str(getattr(model, "output_fmt", "")).upper() == "NHWC"


def auto_reshape(model: nn.Module, layer: nn.Module) -> Reshape | None:
    """The reshape for ``layer`` of ``model`` by the model's family (module docstring)."""
    if _is_token_model(model):
        grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
        grid = tuple(int(g) for g in grid) if grid is not None and len(grid) == 2 else None
        return TokenGrid(int(model.num_prefix_tokens), grid)
    if _is_channels_last_model(model) and not isinstance(layer, nn.Conv2d):
        return ChannelsLast()
    return None


def default_layer(model: nn.Module) -> str | None:
    """The automatic target layer of a transformer family, or ``None`` (not one).

    * ViT-like (``blocks`` and ``num_prefix_tokens``): the last block's ``norm1``, i.e. the
      normalised tokens that enter the last attention. Not the last block's output: when
      the head reads the class token, the patch tokens after the last attention reach the
      logits by no path, so their gradient is exactly zero and every gradient CAM is flat
      there. At ``norm1`` every patch token still reaches the class token through that
      attention (pytorch-grad-cam recommends the same layer for ViTs).
    * Swin-like (channels-last ``layers``): the last stage's output, the N×H×W×C map the
      head pools, as ``layer4`` is for a ResNet.
    """
    blocks = getattr(model, "blocks", None)
    if _is_token_model(model) and isinstance(blocks, nn.Sequential | nn.ModuleList) and len(blocks):
        last = f"blocks.{len(blocks) - 1}"
        return f"{last}.norm1" if isinstance(getattr(blocks[-1], "norm1", None), nn.Module) else last
    layers = getattr(model, "layers", None)
    if _is_channels_last_model(model) and isinstance(layers, nn.Sequential | nn.ModuleList) \
            and len(layers):
        return f"layers.{len(layers) - 1}"
    return None
