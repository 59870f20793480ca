"""Ablation-CAM: each channel scored by the logit lost when it is zeroed.

Ablation-CAM (Desai & Ramaswamy, WACV 2020), as pytorch-grad-cam computes it: with z_c
the target logit of the clean image and z_c^k the logit with channel k of the layer's
output set to 0,

    w_k = (z_c − z_c^k) / z_c,    L = ReLU(Σ_k w_k A_k),

upsampled and min–max normalised like every map here. K forwards per image, so the
cost is in how much of the network each of them runs:

* The activation is computed once (the gradient pass, without its backward), and only
  the network *after* the layer runs per ablated channel, found by
  :func:`unioncam.tail.find_tail` (torch.fx for torchvision, timm and the built-in
  EfficientNet-Lite; timm's ``forward_head``) and checked against the model's own logits.
  At EfficientNet-Lite0's head that is the classifier alone.
* When no tail is found (an untraceable model, a layer inside a residual block) every
  ablation runs the whole network, with a forward hook that replaces the layer's output
  by the ablated one: exact, and as slow as pytorch-grad-cam. ``cam.tail`` says which
  (``"fx"``, ``"timm_head"`` or ``"whole network"``).

The (image, channel) pairs of the batch form one queue of the engine, ablated activations
are built per chunk on the device, and channels that are zero everywhere are skipped
(zeroing them changes nothing, and w_k · A_k = 0 whatever w_k): the one host sync, as in
Score-CAM. Two differences from pytorch-grad-cam, both on purpose: channels are always
set to 0 (it fills ``min − 1e7`` instead when the activation's minimum is not exactly 0,
and that fill grows by another 1e7 with each row of its batch, so its maps depend on its
``batch_size``); and the layer's output must be N×K×h×w (no reshape step).
"""

from __future__ import annotations

import torch

from unioncam.cam import BaseCAM, CAMResult, Forward
from unioncam.ops import minmax, upsample
from unioncam.registry import METHODS
from unioncam.tail import Tail, find_tail

__all__ = ["AblationCAM", "WHOLE_NETWORK"]

#: ``AblationCAM.tail`` when every ablation runs the whole network.
WHOLE_NETWORK = "whole network"


@METHODS.register("ablationcam", label="Ablation-CAM")
class AblationCAM(BaseCAM):
    """Ablation-CAM, batched: ``with AblationCAM(model, "_blocks.15") as cam: res = cam(x)``.

    ``res.mask_scores`` holds every channel's weight w_k (0 for skipped channels),
    ``res.forwards`` counts the gradient pass plus one (tail) forward per ablated channel.
    ``find_tail=False`` forces whole-network forwards (the reference the tail is tested
    against).
    """

    needs_gradient = False

    def __init__(self, model, layer=None, *, find_tail: bool = True, **kwargs) -> None:
        super().__init__(model, layer, **kwargs)
        self.find_tail = find_tail
        self.tail: str | None = None  # how the last batch ran (see the module docstring)
        self._tails: dict[tuple[int, ...], tuple[str, Tail] | None] = {}

    def _tail_for(self, fwd: Forward) -> tuple[str, Tail] | None:
        key = tuple(fwd.activation.shape[1:])
        if key not in self._tails:
            found = None
            if self.find_tail and self.reshape is None:
                assert self.layer is not None
                with torch.autocast(fwd.activation.device.type, enabled=False):
                    found = find_tail(self.model, self.layer, fwd.activation[:1],
                                      fwd.logits[:1])
            self._tails[key] = found
        return self._tails[key]

    def explain(self, x: torch.Tensor, targets) -> CAMResult:
        fwd = self.gradient_pass(x, targets, need_grad=False)
        if self.reshape is not None:
            raise ValueError(f"layer {self.layer}: Ablation-CAM needs an N×K×h×w output, "
                             "not one through a reshape step")
        act, target = fwd.activation, fwd.target
        n, k = act.shape[:2]
        live = act.flatten(2).ne(0).any(2).flatten()
        pairs = live.nonzero()[:, 0]  # the one host sync: how many forwards to schedule
        image_of, channel_of = pairs // k, pairs % k
        found = self._tail_for(fwd)

        def ablated(j: torch.Tensor) -> torch.Tensor:
            a = act[image_of[j]]
            a[torch.arange(j.numel(), device=a.device), channel_of[j]] = 0
            return a

        if found is not None:
            self.tail = found[0]
            logits = self.probs(pairs.numel(), ablated, target[image_of], x.device,
                                forward=found[1], logit=True)
        else:
            self.tail = WHOLE_NETWORK
            logits = self._whole_network(x, fwd, pairs, image_of, ablated)
        base = fwd.logits.gather(1, target[:, None])[:, 0]
        weights = torch.zeros(n * k, device=x.device, dtype=torch.float32)
        weights[pairs] = (base[image_of] - logits) / base[image_of]
        weights = weights.view(n, k)
        raw = (weights[:, :, None, None] * act).sum(1).clamp_min(0)
        return CAMResult(maps=minmax(upsample(raw, x.shape[-2:])), target=target,
                         prob=fwd.prob, forwards=n + int(pairs.numel()), raw=raw,
                         mask_scores=weights)

    def _whole_network(self, x, fwd: Forward, pairs, image_of, ablated) -> torch.Tensor:
        """Every ablation through the whole model; a hook swaps in the ablated output."""
        assert self.layer is not None
        want = self.layer.call if self.layer.call >= 0 else fwd.calls + self.layer.call
        state: dict[str, object] = {"calls": 0, "out": None}

        def replace(_module, _inp, out):
            call = state["calls"]
            state["calls"] = call + 1
            return state["out"] if call == want else out

        def inputs(j: torch.Tensor) -> torch.Tensor:
            state["calls"], state["out"] = 0, self.format_input(ablated(j))
            return x[image_of[j]]

        handle = self.layer.module.register_forward_hook(replace)
        try:
            return self.probs(pairs.numel(), inputs, fwd.target[image_of], x.device,
                              logit=True)
        finally:
            handle.remove()
