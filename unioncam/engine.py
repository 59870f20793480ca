"""THE forward engine: the one owner of the model's state and of every batched forward.

Every method here is made of forward passes whose only output is one class probability:
region masks (Score-CAM, Group-CAM), β and the other selection rules, and the metrics
(insertion/deletion, ROAD-style perturbations, average drop). They all go through
:meth:`Engine.probs`: the inputs of the whole batch are flattened into one job queue
(image × mask × step), built lazily one chunk at a time by a callback, and pushed through
the model in chunks of ``chunk_size`` into a preallocated buffer. Chunking changes speed,
never results, and nothing in the loop syncs with the host.

The engine also owns the model while it is entered: eval mode, the memory format it runs
in (tuned or given) and the autocast precision, all restored on exit, also after an
exception. There is exactly one place that decides the memory format, so a CAM and the
metrics scored with it can never disagree about it (they share the engine).

Tuning (chunk size × memory format) happens the first time masked forwards run, never
for methods that run none (a gradient-only CAM costs no tuning).
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable, MutableMapping
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from unioncam.hooks import eval_mode

__all__ = ["Engine", "AUTOCAST_DTYPES", "check_autocast", "model_format", "softmax_gather"]

#: Autocast precisions by their one name (a string everywhere: configs, CLI, store).
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

# Candidate chunk sizes for tuning. On a 2-core CPU EfficientNet-Lite0 at 224 px runs
# fastest around 2-8 images per forward (32 ran at half the speed, so it is not tried);
# GPUs want hundreds.
_CPU_CHUNKS = (2, 4, 8, 16)
_GPU_CHUNKS = (32, 64, 128, 256, 512)
_TUNE_ROUNDS = 3
_TUNE_MIN_IMAGES = 16  # per candidate per round on CPU: ~0.3 s
# model -> {(device, input size, precision, given settings): (chunk size, channels_last)}.
# Keyed weakly on the model itself: an id() is reused once a model is freed, and a new
# model at the old address would inherit a stale choice.
_TUNED: MutableMapping[nn.Module, dict[tuple, tuple[int, bool]]] = weakref.WeakKeyDictionary()


def check_autocast(autocast: str | None) -> str | None:
    """``autocast`` if it is ``None``, ``"bf16"`` or ``"fp16"``; else one-line ``ValueError``."""
    if autocast is not None and autocast not in AUTOCAST_DTYPES:
        raise ValueError(f"autocast must be None, 'bf16' or 'fp16', got {autocast!r}")
    return autocast


class Engine:
    """Runs a classifier's forwards for the methods and metrics; owns its state meanwhile.

    Args:
        model: any ``nn.Module`` classifier returning N×C logits.
        chunk_size: inputs per forward pass; ``None`` measures the fastest the first time
            masked forwards run (per device, input size and precision).
        channels_last: run the model in channels_last; ``None`` chooses with the chunk size
            by measuring. Exact either way.
        autocast: ``None`` (fp32), ``"bf16"`` or ``"fp16"`` for the forward passes;
            probabilities are always taken in fp32.

    Use as a context manager (re-entrant): ``with Engine(model) as eng: eng.probs_of(x, c)``.
    """

    def __init__(self, model: nn.Module, *, chunk_size: int | None = None,
                 channels_last: bool | None = None, autocast: str | None = None) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                       or chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
        self.model = model
        self.chunk_size = chunk_size
        self.channels_last = channels_last
        self.autocast = check_autocast(autocast)
        self._eval = None
        self._orig_format: torch.memory_format | None = None  # the model's, while entered
        self._entered = 0

    # ------------------------------------------------------------------ model state
    def __enter__(self):
        if self._entered == 0:
            self._eval = eval_mode(self.model)
            self._eval.__enter__()
            self._orig_format = model_format(self.model)
            self._apply_format()
        self._entered += 1
        return self

    def __exit__(self, *exc) -> None:
        self._entered -= 1
        if self._entered > 0:
            return None
        try:
            self._release()
            if self._orig_format is not None and model_format(self.model) != self._orig_format:
                self.model.to(memory_format=self._orig_format)
            self._orig_format = None
        finally:
            if self._eval is not None:
                self._eval.__exit__(None, None, None)
                self._eval = None
        return None  # never swallow the body's exception

    def _release(self) -> None:
        """Subclasses drop what they attached to the model (hooks)."""

    def close(self) -> None:
        """Restore the model when not used as a context manager."""
        while self._entered > 0:
            self.__exit__(None, None, None)

    def _check_entered(self) -> None:
        if self._entered == 0:
            raise RuntimeError(f"use {type(self).__name__} as a context manager: `with ... as cam:`")

    @property
    def memory_format(self) -> torch.memory_format:
        """The format the model runs in while entered (what the engine chose or was given)."""
        if self.channels_last is None:
            return self._orig_format or model_format(self.model)
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def _apply_format(self) -> None:
        if self.channels_last is None:
            return  # untuned: the model runs as it came
        want = torch.channels_last if self.channels_last else torch.contiguous_format
        if model_format(self.model) != want:
            self.model.to(memory_format=want)

    def amp(self, device: torch.device):
        """The autocast context for forwards on ``device`` (a no-op in fp32)."""
        if self.autocast is None:
            return nullcontext()
        return torch.autocast(device_type=device.type, dtype=AUTOCAST_DTYPES[self.autocast])

    def format_input(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    # ------------------------------------------------------------------ forwards
    @torch.no_grad()
    def probs(self, count: int, make_inputs: Callable[[torch.Tensor], torch.Tensor],
              target: torch.Tensor, device: torch.device, *,
              forward: Callable[[torch.Tensor], torch.Tensor] | None = None,
              logit: bool = False) -> torch.Tensor:
        """Softmax probability of ``target[j]`` for input ``make_inputs(j)``, j in [0, count).

        ``make_inputs`` receives a 1-D index tensor for one chunk and returns that chunk's
        inputs; nothing bigger than one chunk is ever built. Tunes on first use.
        ``forward`` replaces the model (Ablation-CAM runs only the network after its layer;
        it has tuned on images before) and ``logit=True`` gives the target's logit instead
        of its probability.
        """
        self._check_entered()
        out = torch.empty(count, device=device, dtype=torch.float32)
        if count == 0:
            return out
        if self.chunk_size is None or self.channels_last is None:
            self.tune(make_inputs(torch.arange(1, device=device)))
        step = self.chunk_size or 1
        run = forward or self.model
        for start in range(0, count, step):
            idx = torch.arange(start, min(start + step, count), device=device)
            with self.amp(device):
                logits = run(self.format_input(make_inputs(idx)))
            out[start:start + idx.numel()] = (
                logits.float().gather(1, target[idx, None])[:, 0] if logit
                else softmax_gather(logits, target[idx]))
        return out

    @torch.no_grad()
    def probs_of(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Class probabilities of a ready batch of inputs, chunked like the masked passes."""
        return self.probs(x.shape[0], lambda i: x[i], target, x.device)

    @torch.no_grad()
    def softmax(self, x: torch.Tensor) -> torch.Tensor:
        """Softmax over all classes (N×C, fp32) of ``x``, in chunks."""
        self._check_entered()
        self.tune(x[:1])
        step = self.chunk_size or x.shape[0]
        out = []
        for start in range(0, x.shape[0], step):
            with self.amp(x.device):
                logits = self.model(self.format_input(x[start:start + step]))
            if logits.dim() != 2:
                raise ValueError(f"model must return N×classes logits, got {tuple(logits.shape)}")
            out.append(logits.float().softmax(1))
        return torch.cat(out)

    # ------------------------------------------------------------------ tuning
    def tune(self, example: torch.Tensor) -> None:
        """Pick chunk size and memory format for inputs like ``example`` (once; cached).

        Done once per (model, device, input size, precision) and cached, because the best
        setting differs by an order of magnitude between a 2-core CPU (small chunks) and a
        GPU (large chunks). Why rounds and a minimum: one short timing per candidate is at
        the mercy of the machine (a 2-core CPU showed ±30 % between repeats of one setting,
        and a first-run slowdown of up to 2× per new shape), and a single timing once picked
        contiguous/4 while channels_last/8 ran the same UnionCAM in 0.74 of the time. So
        every candidate gets a warm-up forward, then is timed over at least
        ``_TUNE_MIN_IMAGES`` images (on a GPU: two forwards) in each of ``_TUNE_ROUNDS``
        interleaved rounds and scored by its best round (interference only ever slows a
        run down). Candidates far behind after a round are dropped.
        """
        if self.chunk_size is not None and self.channels_last is not None:
            return
        self._check_entered()
        key = (example.device.type, example.device.index, tuple(example.shape[1:]),
               self.autocast, self.chunk_size, self.channels_last)
        tuned = _TUNED.setdefault(self.model, {})
        if key not in tuned:
            tuned[key] = self._measure(example)
        self.chunk_size, self.channels_last = tuned[key]
        self._apply_format()

    @torch.no_grad()
    def _measure(self, x: torch.Tensor) -> tuple[int, bool]:
        cuda = x.device.type == "cuda"
        sizes = (self.chunk_size,) if self.chunk_size else (_GPU_CHUNKS if cuda else _CPU_CHUNKS)
        formats = (self.channels_last,) if self.channels_last is not None else (False, True)
        if len(sizes) == 1 and len(formats) == 1:
            return sizes[0], formats[0]
        min_images = 0 if cuda else _TUNE_MIN_IMAGES
        before = model_format(self.model)
        best: dict[tuple[int, bool], float] = {(s, f): float("inf") for f in formats for s in sizes}

        def run(batch: torch.Tensor, reps: int) -> float:
            if cuda:
                torch.cuda.synchronize(x.device)
            t0 = time.perf_counter()
            for _ in range(reps):
                with self.amp(x.device):
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
                        except torch.cuda.OutOfMemoryError:
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


def softmax_gather(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Probability of ``target`` under softmax of ``logits`` (fp32)."""
    return F.softmax(logits.float(), dim=1).gather(1, target[:, None])[:, 0]
