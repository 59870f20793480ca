"""What every CAM shares: the target layer's hook, the gradient pass and the result type.

A CAM *is* an :class:`~unioncam.engine.Engine` (so its masked forwards, the selection
rules and the metrics scored with it share one model state) plus the hook on its target
layer. The hook is on only inside the gradient pass: registered when the pass starts and
removed when it ends, also after an exception, so no other forward (masked inputs, the
metrics, another CAM on the same model) is ever captured, and several CAMs can be entered
on one model at once.

Gradients come from one forward of the clean images and ``torch.autograd.grad`` on the
hooked activation: no parameter gradients, one backward for the whole batch. A layer whose
output is not N×K×h×w (transformer tokens, channels-last stages) goes through the CAM's
reshape step (:mod:`unioncam.reshape`) here, activation and gradient alike, so that every
method downstream sees the same N×K×h×w map.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from unioncam.engine import Engine, softmax_gather
from unioncam.hooks import ActivationHook, TargetLayer, resolve_layer
from unioncam.reshape import Reshape, auto_reshape

__all__ = ["BaseCAM", "CAMResult", "Forward", "Score", "validate_inputs"]

#: What a gradient pass differentiates: fn(logits N×C fp32, target N) -> N scores.
Score = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class CAMResult:
    """One batch's explanation, the same type for every method; tensors stay on the device.

    Fields every method fills: ``maps``, ``target``, ``prob``, ``forwards``. A component CAM
    also gives its low-resolution map (``raw``) and, for region methods, the score of every
    mask (``mask_scores``). UnionCAM fills the pool fields: ``pool``, ``selected``, ``beta``,
    ``selection_score``, ``baseline_prob`` (and ``components`` when asked).
    """

    maps: torch.Tensor  # N×H×W in [0,1]: the map of each image (UnionCAM: the selected one)
    target: torch.Tensor  # N int64: the class explained
    prob: torch.Tensor  # N float32: p(x)_target on the clean image
    forwards: int = 0  # forward passes spent on the batch (the gradient pass: one per image)
    raw: torch.Tensor | None = None  # N×h×w: a component's map before resizing
    mask_scores: torch.Tensor | None = None  # N×K: region methods' score of every mask
    pool: tuple[str, ...] = ()  # UnionCAM: P member names, in selection order
    selected: torch.Tensor | None = None  # N int64: index into pool
    beta: torch.Tensor | None = None  # N×P: confidence gain β of every pool member
    selection_score: torch.Tensor | None = None  # N×P: what the selection rule ranked by
    baseline_prob: torch.Tensor | None = None  # N: p(x_b)_target
    components: dict[str, torch.Tensor] | None = None  # member -> N×H×W, normalised
    components_raw: dict[str, torch.Tensor] | None = None  # member -> map before resizing

    def __len__(self) -> int:
        return self.maps.shape[0]

    @property
    def selected_names(self) -> list[str]:
        """The pool member kept for each image (UnionCAM only)."""
        if self.selected is None:
            return []
        return [self.pool[i] for i in self.selected.tolist()]

    def to(self, device: torch.device | str) -> CAMResult:
        """A copy with every tensor moved (e.g. to the CPU for writing)."""
        def mv(v):
            if isinstance(v, torch.Tensor):
                return v.to(device)
            if isinstance(v, dict):
                return {k: t.to(device) for k, t in v.items()}
            return v

        return CAMResult(**{f.name: mv(getattr(self, f.name)) for f in dataclasses.fields(self)})


class Forward:
    """What one gradient pass over the clean images gives every method."""

    __slots__ = ("activation", "gradient", "target", "prob", "logits", "calls")

    def __init__(self, activation, gradient, target, prob, logits, calls: int = 1) -> None:
        self.activation = activation  # N×K×h×w, detached
        self.gradient = gradient  # N×K×h×w, d logit_target / d activation (None: not asked)
        self.target = target  # N int64
        self.prob = prob  # N float32
        self.logits = logits  # N×C float32
        self.calls = calls  # how many times the layer's module ran in the forward


def validate_inputs(x: torch.Tensor, targets, num_classes: int | None = None) -> None:
    """Reject bad batches with one line that names the image or the setting."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"x must be N×C×H×W, got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError("x is an empty batch (N=0)")
    if x.shape[1] != 3:
        raise ValueError(f"x must have 3 channels, got {x.shape[1]} (shape {tuple(x.shape)})")
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor, got {x.dtype}")
    finite = torch.isfinite(x).flatten(1).all(1)
    if not bool(finite.all()):
        bad = int((~finite).nonzero()[0, 0])
        raise ValueError(f"image {bad} contains NaN or Inf")
    if targets is not None and not isinstance(targets, torch.Tensor):
        for i, t in enumerate(targets):
            if t is not None and not isinstance(t, int | torch.Tensor) or isinstance(t, bool):
                raise ValueError(f"target of image {i} must be an int or None, got {t!r}")
    if targets is not None and len(targets) != x.shape[0]:
        raise ValueError(f"targets has {len(targets)} entries for {x.shape[0]} images")


class BaseCAM(Engine):
    """Hook lifecycle and gradient pass on top of the engine.

    Args:
        model: any ``nn.Module`` classifier returning N×C logits.
        layer: dotted module name (``"layer4"``, ``"_blocks.15"``, ``"_swish#1"`` for the 2nd
            call of a reused module), a module, or ``None`` for the last 4-D feature map
            before global pooling (for vision transformers: their family's layer, see
            :func:`unioncam.reshape.default_layer`).
        reshape: a callable turning the layer's output (and its gradient) into N×K×h×w,
            as pytorch-grad-cam's ``reshape_transform``; ``None`` picks it from the model
            (:func:`unioncam.reshape.auto_reshape`: token grids for ViTs, channels-last
            for Swin, nothing for CNNs).
        chunk_size, channels_last, autocast: see :class:`~unioncam.engine.Engine`.
    """

    #: Whether the method needs d logit / d activation (Score-CAM alone does not).
    needs_gradient = True

    def __init__(self, model: nn.Module, layer: str | nn.Module | TargetLayer | None = None, *,
                 reshape: Reshape | None = None, chunk_size: int | None = None,
                 channels_last: bool | None = None, autocast: str | None = None) -> None:
        super().__init__(model, chunk_size=chunk_size, channels_last=channels_last,
                         autocast=autocast)
        if reshape is not None and not callable(reshape):
            raise ValueError(f"reshape must be a callable or None, got {type(reshape).__name__}")
        self._layer_spec = layer
        self._reshape_spec = reshape
        self.layer: TargetLayer | None = None
        self.reshape: Reshape | None = None  # the step in use, known once the layer is

    def prepare(self, example: torch.Tensor) -> None:
        """Resolve the layer, register the hook and tune now, for inputs like ``example``.

        The first call does this anyway; calling it ahead keeps the one-off tuning (seconds)
        out of the first real batch, e.g. in a pipeline actor before it pulls work. Methods
        that run no masked forwards (gradient CAMs) are not tuned: there is nothing to tune.
        """
        validate_inputs(example, None)
        x = example.float()
        self._attach(x)
        if self.runs_masked_forwards:
            self.tune(x[:1])

    #: Whether the method runs masked forwards (and so benefits from tuning).
    runs_masked_forwards = True

    def _attach(self, x: torch.Tensor) -> None:
        """Resolve the layer and the reshape step (once); no hook is registered here."""
        self._check_entered()
        if self.layer is None:
            self.layer = resolve_layer(self.model, self._layer_spec, x)
            self.reshape = self._reshape_spec or auto_reshape(self.model, self.layer.module)

    def _as_map(self, out: torch.Tensor) -> torch.Tensor:
        """The layer's output (or its gradient) as N×K×h×w, through the reshape step."""
        t = self.reshape(out) if self.reshape is not None else out
        if not isinstance(t, torch.Tensor) or t.dim() != 4 or t.shape[0] != out.shape[0]:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            via = " after the reshape step" if self.reshape is not None else ""
            raise ValueError(f"layer {self.layer}: output must be N×K×h×w, got {shape}{via}; "
                             "choose another layer or pass reshape=")
        return t

    def gradient_pass(self, x: torch.Tensor, targets=None, need_grad: bool = True,
                      score: Score | None = None) -> Forward:
        """One forward of the clean images and d(score)/d(activation).

        The score of an image is its target's logit, or ``score(logits, target)`` (N values,
        e.g. FinerCAM's contrast with the nearest classes). Summing the N scores gives every
        image its own gradient in a single backward, because images do not interact in eval
        mode. Methods that need no gradient (Score-CAM, EigenCAM) skip the backward. The
        activation hook exists only during this call.
        """
        self._attach(x)
        if self.runs_masked_forwards:
            self.tune(x[:1])  # before the first pass, so every pass runs in one memory format
        assert self.layer is not None
        hook = ActivationHook(self.layer)
        try:
            with torch.set_grad_enabled(need_grad), self.amp(x.device):
                logits = self.model(self.format_input(x))
                if logits.dim() != 2:
                    raise ValueError(f"model output must be N×classes logits, got {tuple(logits.shape)}")
                out = hook.activation
                calls = hook.calls
                act = self._as_map(out)  # fails here, before any backward, if it cannot
                logits = logits.float()
                target = self._resolve_targets(targets, logits)
                grad = None
                if need_grad:
                    if not out.requires_grad:
                        raise ValueError(
                            f"layer {self.layer}: its output does not depend on the input")
                    picked = (logits.gather(1, target[:, None])[:, 0] if score is None
                              else score(logits, target))
                    # The gradient of the output as captured, then the same reshape: the
                    # reshaped view is not on the path from the output to the score.
                    (grad,) = torch.autograd.grad(picked.sum(), out)
                    grad = self._as_map(grad)
        finally:
            hook.remove()
        prob = softmax_gather(logits.detach(), target)
        grad = grad.detach().float().contiguous() if grad is not None else None
        return Forward(act.detach().float().contiguous(), grad, target, prob, logits.detach(),
                       calls)

    @staticmethod
    def _resolve_targets(targets, logits: torch.Tensor) -> torch.Tensor:
        n, c = logits.shape
        pred = logits.argmax(1)
        if targets is None:
            return pred
        if isinstance(targets, torch.Tensor):
            t = targets.to(device=logits.device, dtype=torch.long).reshape(-1)
            given = torch.ones_like(t, dtype=torch.bool)
        else:
            given = torch.tensor([t is not None for t in targets], device=logits.device)
            t = torch.tensor([int(v) if v is not None else 0 for v in targets], device=logits.device)
        if t.numel() != n:
            raise ValueError(f"targets has {t.numel()} entries for {n} images")
        bad = given & ((t < 0) | (t >= c))
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(f"target of image {i} is {int(t[i])}, outside [0, {c})")
        return torch.where(given, t, pred)

    def __call__(self, x: torch.Tensor, targets=None) -> CAMResult:
        """Explain the batch ``x`` (N×3×H×W, normalised) for ``targets`` (None: predicted)."""
        validate_inputs(x, targets)
        x = x.float() if x.dtype != torch.float32 else x
        return self.explain(x, targets)

    def explain(self, x: torch.Tensor, targets) -> CAMResult:  # pragma: no cover - abstract
        raise NotImplementedError
