"""Find the target layer and capture its activation during one forward pass.

Why a dedicated module: every CAM needs the same three things — the layer's
output tensor for the clean images, the gradient of a class score with respect
to it, and the guarantee that nothing is left attached to the user's model.
Getting those right once (hook lifecycle, repeated module calls, train/eval
state) keeps the methods themselves short.

A module may be *called several times* in one forward pass: EfficientNet-Lite
applies its root ``_swish`` (ReLU6) after the stem and again after the head,
torchvision's ``Bottleneck`` calls ``relu`` three times. A plain forward hook
would then silently keep whichever call came last or first. Here a layer is a
``(module, call)`` pair: ``"name"`` means the last call, ``"name#k"`` the k-th
(0-based; negative counts from the end).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from unioncam.reshape import default_layer

__all__ = ["TargetLayer", "ActivationHook", "resolve_layer", "find_target_layer", "eval_mode"]

_CALL_RE = re.compile(r"^(?P<name>.*?)(?:#(?P<call>-?\d+))?$")


@dataclass(frozen=True)
class TargetLayer:
    """A module of the model and which of its calls within one forward to use."""

    name: str
    module: nn.Module
    call: int = -1

    def __str__(self) -> str:
        return self.name if self.call == -1 else f"{self.name}#{self.call}"


def resolve_layer(model: nn.Module, target_layer: str | nn.Module | TargetLayer | None,
                  example: torch.Tensor | None = None) -> TargetLayer:
    """Turn a dotted name, a module or ``None`` (automatic) into a :class:`TargetLayer`.

    An unknown name is an error listing a few valid names, because a typo in a
    job that runs for a day should fail in the first second.
    """
    if isinstance(target_layer, TargetLayer):
        return target_layer
    if target_layer is None:
        if example is None:
            raise ValueError("layer=None needs an example input to find the layer")
        return find_target_layer(model, example)
    if isinstance(target_layer, nn.Module):
        for name, module in model.named_modules():
            if module is target_layer:
                return TargetLayer(name, module)
        raise ValueError("layer: the given module is not a submodule of the model")
    if not isinstance(target_layer, str):
        raise ValueError(f"layer must be a str, a module or None, not {type(target_layer).__name__}")
    match = _CALL_RE.match(target_layer)
    assert match is not None
    name, call = match.group("name"), int(match.group("call") or -1)
    modules = dict(model.named_modules())
    if name not in modules or name == "":
        candidates = [n for n, m in model.named_modules() if n and len(list(m.children())) == 0]
        hint = ", ".join(candidates[-5:])
        raise ValueError(f"layer: no module named {name!r} in the model (last leaf modules: {hint})")
    return TargetLayer(name, modules[name], call)


def find_target_layer(model: nn.Module, example: torch.Tensor) -> TargetLayer:
    """The model family's layer for transformers, else the last 4-D multi-position output.

    Vision transformers (timm's ViT/DeiT family, Swin) get the layer of
    :func:`unioncam.reshape.default_layer`: their token and channels-last outputs are not
    what the CNN rule below looks for. Otherwise: the last module output with a 4-D shape
    and more than one spatial position, the conventional CAM layer (the last feature map
    before global pooling). Among the modules that produced that very tensor (a block and
    its last ReLU return the same object) the outermost is chosen, so ResNets give
    ``layer4`` rather than ``layer4.2.relu#2``.
    """
    family = default_layer(model)
    if family is not None:
        return resolve_layer(model, family)
    records: list[tuple[str, nn.Module, int, torch.Tensor]] = []
    counts: dict[int, int] = {}
    handles = []

    def make_hook(name: str):
        def hook(module: nn.Module, _inp, out) -> None:
            k = counts.get(id(module), 0)
            counts[id(module)] = k + 1
            if isinstance(out, torch.Tensor) and out.dim() == 4 and out.shape[-1] * out.shape[-2] > 1:
                records.append((name, module, k, out))

        return hook

    for name, module in model.named_modules():
        if name:
            handles.append(module.register_forward_hook(make_hook(name)))
    try:
        with torch.no_grad(), eval_mode(model):
            model(example[:1])
    finally:
        for h in handles:
            h.remove()
    if not records:
        raise ValueError("layer: the model has no module with a 4-D spatial output; name one")
    last = records[-1][3]
    same = [r for r in records if r[3] is last]
    # Hooks fire innermost first, so the outermost producer of the tensor comes last.
    name, module, k, _ = same[-1]
    call = -1 if counts[id(module)] == k + 1 else k
    return TargetLayer(name, module, call)


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put the model in eval mode and restore every submodule's own flag on exit.

    Restoring per submodule (not just ``model.train(was_training)``) matters
    for models deliberately kept in mixed states, e.g. frozen BatchNorm.
    """
    states = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in states:
            m.training = training


class ActivationHook:
    """Keep the output of one call of one module, from registration to :meth:`remove`.

    Only the tensor itself is kept (no ``retain_grad``), so gradients are taken
    with ``torch.autograd.grad(score, hook.activation)`` and no parameter
    gradients are ever computed. A CAM registers one for its gradient pass and removes
    it right after, so masked forwards and other CAMs on the model are never captured.
    """

    def __init__(self, layer: TargetLayer) -> None:
        self.layer = layer
        self._calls: list[torch.Tensor] = []
        self._handle = layer.module.register_forward_hook(self._hook)

    def _hook(self, _module: nn.Module, _inp, out) -> None:
        self._calls.append(out)

    @property
    def calls(self) -> int:
        """How many times the module ran since registration."""
        return len(self._calls)

    @property
    def activation(self) -> torch.Tensor:
        if not self._calls:
            raise RuntimeError(f"target layer {self.layer} was not called in the forward pass")
        try:
            out = self._calls[self.layer.call]
        except IndexError:
            raise ValueError(
                f"layer {self.layer}: the module was called {len(self._calls)} time(s)"
            ) from None
        if not isinstance(out, torch.Tensor):
            raise ValueError(f"layer {self.layer}: output must be a tensor, got "
                             f"{type(out).__name__}")
        return out  # any shape: the CAM's reshape step makes it N×K×h×w

    def remove(self) -> None:
        self._handle.remove()
        self._calls = []
