"""The network after a layer: logits as a function of that layer's output alone.

Why: Ablation-CAM scores every channel of a layer by the logit with that channel zeroed,
K forwards per image. Everything before the layer is the same in all K of them, so only
the part after it (the *tail*) needs to run. How the tail is found, in order:

1. **torch.fx**: the model is traced symbolically; the node that calls the layer's
   module (its ``call``-th call, as :class:`~unioncam.hooks.TargetLayer` counts) becomes
   the tail's one input, and every node that depends on it, and on nothing computed
   before it, is copied (the input's batch size, ``inputs.size(0)``, is read off the
   layer's output instead). This covers torchvision's models, the built-in EfficientNet-Lite
   and most timm CNNs: anything traceable, whatever its forward looks like. A tail that
   needs a value from before the layer (the layer sits inside a residual block whose skip
   comes from its input) does not exist, and the model is not traced when its forward has
   data-dependent control flow.
2. **timm's ``forward_head``**, for a layer whose output is ``forward_features``'s.

A candidate tail is used only after it reproduced the model's logits on the clean images
of the first batch of each input size (fp32, rtol = atol = 1e-3); otherwise the next is
tried, and with none the caller falls back to whole-network forwards.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import fx, nn

from unioncam.hooks import TargetLayer

__all__ = ["Tail", "fx_tail", "timm_head_tail", "find_tail"]

Tail = Callable[[torch.Tensor], torch.Tensor]


def fx_tail(model: nn.Module, layer: TargetLayer) -> Tail | None:
    """The traced part of ``model`` after ``layer``, or ``None`` (untraceable, no tail)."""
    class Tracer(fx.Tracer):  # the layer stays one call, even a custom block
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return m is layer.module or super().is_leaf_module(m, qualname)

    try:
        traced = fx.GraphModule(model, Tracer().trace(model))
    except Exception:  # noqa: BLE001 - any tracing failure means "no traced tail"
        return None
    calls = [n for n in traced.graph.nodes if n.op == "call_module" and n.target == layer.name]
    try:
        start = calls[layer.call]
    except IndexError:
        return None
    graph = fx.Graph()
    activation = graph.placeholder("activation")
    env: dict[fx.Node, fx.Node] = {start: activation}
    after = False
    for node in traced.graph.nodes:
        if node is start:
            after = True
            continue
        if not after:
            continue
        deps = node.all_input_nodes
        for d in deps:  # constants and parameters read before the layer are free to copy
            if d not in env and d.op == "get_attr":
                env[d] = graph.node_copy(d, env.__getitem__)
            elif d not in env and _is_batch_size(d):  # the layer's output has the same
                env[d] = graph.call_method("size", (activation, 0))
        if node.op == "output":
            if any(d not in env for d in deps):
                return None  # the logits need a value from before the layer
            graph.node_copy(node, env.__getitem__)
        elif all(d in env for d in deps) and node.op != "placeholder":
            env[node] = graph.node_copy(node, env.__getitem__)
    tail = fx.GraphModule(traced, graph)
    tail.graph.eliminate_dead_code()
    tail.recompile()
    return tail


def _is_batch_size(node: fx.Node) -> bool:
    """``inputs.size(0)`` (EfficientNet's ``bs``): the batch size, read off the input."""
    return (node.op == "call_method" and node.target == "size" and len(node.args) == 2
            and isinstance(node.args[0], fx.Node) and node.args[0].op == "placeholder"
            and node.args[1] == 0 and not node.kwargs)


def timm_head_tail(model: nn.Module, layer: TargetLayer) -> Tail | None:
    """timm's ``forward_head``: the tail when the layer's output is ``forward_features``'s."""
    head = getattr(model, "forward_head", None)
    if not callable(head) or not callable(getattr(model, "forward_features", None)):
        return None
    return head


_FINDERS: tuple[Callable[[nn.Module, TargetLayer], Tail | None], ...] = (fx_tail, timm_head_tail)


@torch.no_grad()
def find_tail(model: nn.Module, layer: TargetLayer, activation: torch.Tensor,
              logits: torch.Tensor) -> tuple[str, Tail] | None:
    """The first tail that maps ``activation`` back to ``logits`` (N×C), with its finder."""
    for finder in _FINDERS:
        tail = finder(model, layer)
        if tail is None:
            continue
        try:
            out = tail(activation)
        except Exception:  # noqa: BLE001 - a tail that cannot run is no tail
            continue
        if (isinstance(out, torch.Tensor) and out.shape == logits.shape
                and torch.allclose(out.float(), logits.float(), rtol=1e-3, atol=1e-3)):
            return finder.__name__.removesuffix("_tail"), tail
    return None
