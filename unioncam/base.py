"""The one base class that owns the model while a CAM is computed.

It registers the activation hook, puts the model in eval mode, optionally
switches it to channels_last, and undoes all three on ``__exit__`` — also when
the body raised — so a CAM can never leave a user's model altered.

It also owns the two kinds of forward pass every method here is made of:

* one forward + ``torch.autograd.grad`` on the hooked activation for the clean
  images (gradients w.r.t. the activation only: no parameter gradients);
* many masked forwards whose only output is one class probability each. These
  are flattened across the whole batch (image × mask) and pushed through the
  model in chunks of ``chunk_size`` with the hook switched off, writing into a
  preallocated buffer. Chunking changes speed, never results.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from unioncam.hooks import ActivationHook, TargetLayer, eval_mode, resolve_layer

__all__ = ["BaseCAM", "Forward", "validate_inputs", "AUTOCAST_DTYPES"]

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

# Candidate chunk sizes for auto-tuning. On a 2-core CPU EfficientNet-Lite0 at
# 224 px runs fastest around 2-8 images per forward (32 ran at half the speed,
# so it is not tried); GPUs want hundreds.
_CPU_CHUNKS = (2, 4, 8, 16)
_GPU_CHUNKS = (32, 64, 128, 256, 512)
_TUNE_ROUNDS = 3
_TUNE_MIN_IMAGES = 16  # per candidate per round on CPU: ~0.3 s
_TUNED: dict[tuple, tuple[int, bool]] = {}


class Forward:
    """What one gradient pass over the clean images gives every method."""

    __slots__ = ("activation", "gradient", "classes", "probs", "logits")

    def __init__(self, activation, gradient, classes, probs, logits) -> None:
        self.activation = activation  # N×K×h×w, detached
        self.gradient = gradient  # N×K×h×w, d logit_c / d activation
        self.classes = classes  # N int64
        self.probs = probs  # N float32
        self.logits = logits  # N×C float32


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


class BaseCAM:
    """Hook lifecycle, gradient pass and chunked masked forwards.

    Args:
        model: any ``nn.Module`` classifier returning N×C logits.
        target_layer: dotted module name (``"layer4"``, ``"_blocks.15"``,
            ``"_swish#1"`` for the 2nd call of a reused module), a module, or
            ``None`` for the last 4-D feature map before global pooling.
        chunk_size: masked inputs per forward pass; ``None`` measures the
            fastest on the first batch (per device, input size and precision).
        channels_last: run the model in channels_last; ``None`` chooses with
            the chunk size by measuring. Exact either way.
        autocast: ``None`` (fp32, default), ``"bf16"`` or ``"fp16"`` for the
            forward passes; probabilities are always taken in fp32.
    """

    def __init__(self, model: nn.Module, target_layer: str | nn.Module | TargetLayer | None = None,
                 *, chunk_size: int | None = None, channels_last: bool | None = None,
                 autocast: str | None = None) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
        if autocast is not None and autocast not in AUTOCAST_DTYPES:
            raise ValueError(f"autocast must be None, 'bf16' or 'fp16', got {autocast!r}")
        self.model = model
        self._target_spec = target_layer
        self.layer: TargetLayer | None = None
        self.chunk_size = chunk_size
        self.channels_last = channels_last
        self.autocast = autocast
        self._hook: ActivationHook | None = None
        self._eval = None
        self._restore_format: bool = False
        self._orig_format: torch.memory_format | None = None  # the model's, while entered
        self._entered = 0

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self):
        if self._entered == 0:
            self._eval = eval_mode(self.model)
            self._eval.__enter__()
        self._entered += 1
        return self

    def __exit__(self, *exc) -> None:
        self._entered -= 1
        if self._entered > 0:
            return None
        try:
            if self._hook is not None:
                self._hook.remove()
                self._hook = None
            if self._restore_format:
                self.model.to(memory_format=self._orig_format or torch.contiguous_format)
                self._restore_format = False
            self._orig_format = None
        finally:
            if self._eval is not None:
                self._eval.__exit__(None, None, None)
                self._eval = None
        return None  # never swallow the body's exception

    def close(self) -> None:
        """Remove hooks and restore the model when not used as a context manager."""
        while self._entered > 0:
            self.__exit__(None, None, None)

    def prepare(self, example: torch.Tensor) -> None:
        """Resolve the layer, register the hook and auto-tune now, for inputs like ``example``.

        The first call does this anyway; calling it ahead keeps the one-off tuning (seconds)
        out of the first real batch, e.g. in a pipeline actor before it pulls work, where
        it would otherwise be charged to the first unit. Only ``example``'s shape and device
        matter (a call runs in fp32 whatever the input dtype, and so does the tuning).
        """
        validate_inputs(example, None)
        self._prepare(example.float())  # as a call would see it (UnionCAM runs in fp32)

    def _prepare(self, x: torch.Tensor) -> None:
        """Resolve the layer, register the hook and pick the memory format (first call)."""
        if self._entered == 0:
            raise RuntimeError(f"use {type(self).__name__} as a context manager: `with ... as cam:`")
        if self._hook is None:
            self.layer = resolve_layer(self.model, self._target_spec, x)
            self._hook = ActivationHook(self.layer)
        if self._orig_format is None:
            self._orig_format = model_format(self.model)
        if self.chunk_size is None or self.channels_last is None:
            self._autotune(x)
        want = torch.channels_last if self.channels_last else torch.contiguous_format
        if want != self._orig_format and not self._restore_format:
            # run in the chosen format (either way), give the model back as it came
            self.model.to(memory_format=want)
            self._restore_format = True

    def _amp(self, device: torch.device):
        if self.autocast is None:
            return nullcontext()
        return torch.autocast(device_type=device.type, dtype=AUTOCAST_DTYPES[self.autocast])

    def _format(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    # ------------------------------------------------------------------ passes
    def gradient_pass(self, x: torch.Tensor, targets=None, need_grad: bool = True) -> Forward:
        """One forward of the clean images and d(logit_c)/d(activation).

        Summing the N selected logits gives every image its own gradient in a
        single backward, because images do not interact in eval mode. Methods
        that need no gradient (Score-CAM alone) skip the backward.
        """
        self._prepare(x)
        assert self._hook is not None
        self._hook.reset()
        self._hook.enabled = True
        try:
            with torch.set_grad_enabled(need_grad), self._amp(x.device):
                logits = self.model(self._format(x))
                if logits.dim() != 2:
                    raise ValueError(f"model output must be N×classes logits, got {tuple(logits.shape)}")
                act = self._hook.activation
                logits = logits.float()
                classes = self._resolve_targets(targets, logits)
                grad = None
                if need_grad:
                    if not act.requires_grad:
                        raise ValueError(
                            f"target_layer {self.layer}: its output does not depend on the input")
                    score = logits.gather(1, classes[:, None]).sum()
                    (grad,) = torch.autograd.grad(score, act)
        finally:
            self._hook.reset()
        probs = softmax_gather(logits.detach(), classes)
        grad = grad.detach().float() if grad is not None else None
        return Forward(act.detach().float(), grad, classes, probs, logits.detach())

    def _resolve_targets(self, targets, logits: torch.Tensor) -> torch.Tensor:
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

    @torch.no_grad()
    def masked_probs(self, count: int, make_inputs: Callable[[torch.Tensor], torch.Tensor],
                     classes: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Softmax probability of ``classes[j]`` for ``make_inputs(j)``, j in [0, count).

        ``make_inputs`` receives a 1-D index tensor for one chunk and returns
        that chunk's inputs; nothing bigger than one chunk is ever built.
        """
        out = torch.empty(count, device=device, dtype=torch.float32)
        if count == 0:
            return out
        assert self._hook is not None
        self._hook.enabled = False
        try:
            step = self.chunk_size or 1
            for start in range(0, count, step):
                idx = torch.arange(start, min(start + step, count), device=device)
                with self._amp(device):
                    logits = self.model(self._format(make_inputs(idx)))
                out[start:start + idx.numel()] = softmax_gather(logits, classes[idx])
        finally:
            self._hook.enabled = True
        return out

    @torch.no_grad()
    def class_probs(self, x: torch.Tensor) -> torch.Tensor:
        """Softmax over all classes (N×C, fp32) of one small batch, hook off."""
        assert self._hook is not None
        self._hook.enabled = False
        try:
            with self._amp(x.device):
                return self.model(self._format(x)).float().softmax(1)
        finally:
            self._hook.enabled = True

    @torch.no_grad()
    def probs_of(self, x: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """Class probabilities of a ready batch of inputs, chunked like the masked passes."""
        return self.masked_probs(x.shape[0], lambda i: x[i], classes, x.device)

    # ------------------------------------------------------------------ tuning
    @torch.no_grad()
    def _autotune(self, x: torch.Tensor) -> None:
        """Measure forward throughput per chunk size and memory format; keep the fastest.

        Done once per (model, device, input size, precision) and cached,
        because the best setting differs by an order of magnitude between a
        2-core CPU (small chunks, channels_last) and a GPU (large chunks).

        Why rounds and a minimum: one short timing per candidate is at the
        mercy of the machine (a 2-core CPU showed ±30% between repeats of the
        same setting, and a first-run slowdown of up to 2× per new shape), and
        a single timing picked contiguous/4 while channels_last/8 ran the same
        UnionCAM in 0.74 of the time. So every candidate gets a warm-up forward, then is timed over
        at least ``_TUNE_MIN_IMAGES`` images (on a GPU: two forwards) in each of
        ``_TUNE_ROUNDS`` interleaved rounds, and scored by its best round (interference only
        ever slows a run down). Candidates far behind after a round are
        dropped, which keeps the first call's overhead to seconds.
        """
        key = (id(self.model), x.device.type, x.device.index, tuple(x.shape[1:]), self.autocast,
               self.chunk_size, self.channels_last)
        if key not in _TUNED:
            _TUNED[key] = self._measure_settings(x)
        self.chunk_size, self.channels_last = _TUNED[key]

    def _measure_settings(self, x: torch.Tensor) -> tuple[int, bool]:
        cuda = x.device.type == "cuda"
        sizes = (self.chunk_size,) if self.chunk_size else (_GPU_CHUNKS if cuda else _CPU_CHUNKS)
        formats = (self.channels_last,) if self.channels_last is not None else (False, True)
        if len(sizes) == 1 and len(formats) == 1:
            return sizes[0], formats[0]
        min_images = 0 if cuda else _TUNE_MIN_IMAGES
        before = model_format(self.model)
        best: dict[tuple[int, bool], float] = {(s, f): float("inf") for f in formats for s in sizes}
        hook_on = self._hook.enabled if self._hook else False
        if self._hook:
            self._hook.enabled = False

        def run(batch: torch.Tensor, reps: int) -> float:
            if cuda:
                torch.cuda.synchronize(x.device)
            t0 = time.perf_counter()
            for _ in range(reps):
                with self._amp(x.device):
                    self.model(batch)
            if cuda:
                torch.cuda.synchronize(x.device)
            return (time.perf_counter() - t0) / (reps * batch.shape[0])

        try:
            for rnd in range(_TUNE_ROUNDS):
                order = formats if rnd % 2 == 0 else formats[::-1]
                for cl in order:
                    fmt = torch.channels_last if cl else torch.contiguous_format
                    live = [s for s in sizes if (s, cl) in best]
                    if not live:
                        continue
                    self.model.to(memory_format=fmt)
                    for size in live:
                        batch = x[:1].expand(size, *x.shape[1:]).contiguous(memory_format=fmt)
                        try:
                            if rnd == 0:
                                run(batch, 1)  # warm-up: allocator, kernel selection
                            reps = max(2 if cuda else 1, -(-min_images // size))
                            best[(size, cl)] = min(best[(size, cl)], run(batch, reps))
                        except torch.cuda.OutOfMemoryError:  # (torch.OutOfMemoryError: 2.4+)
                            # Too big for this device: drop it and every larger size.
                            for s in sizes:
                                if s >= size:
                                    best.pop((s, cl), None)
                            if cuda:
                                torch.cuda.empty_cache()
                            break
                if not best:
                    raise RuntimeError("auto-tuning: even the smallest chunk ran out of memory; "
                                       "pass a smaller chunk_size")
                lead = min(best.values())
                slack = 2.0 if rnd == 0 else 1.3
                best = {c: t for c, t in best.items() if t <= slack * lead}
        finally:
            self.model.to(memory_format=before)
            if self._hook:
                self._hook.enabled = hook_on
        return min(best, key=best.__getitem__)


def model_format(model: nn.Module) -> torch.memory_format:
    """channels_last if the model's 4-D weights are laid out so, else contiguous.

    Looks for a weight whose two layouts differ (a 1×1 kernel is both), so a
    channels_last model is recognised whatever its first layer is.
    """
    for q in model.parameters():
        if q.dim() == 4 and not q.is_contiguous():
            if q.is_contiguous(memory_format=torch.channels_last):
                return torch.channels_last
            break
    return torch.contiguous_format


def softmax_gather(logits: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """Probability of ``classes`` under softmax of ``logits`` (fp32)."""
    return F.softmax(logits.float(), dim=1).gather(1, classes[:, None])[:, 0]
