"""Faithfulness and localisation metrics for saliency maps, batched in pure PyTorch.

Implemented metrics (all device-agnostic: they run where ``x`` lives):

* :func:`insertion_deletion` - RISE insertion / deletion curves and their AUC
  (Petsiuk, Das & Saenko, BMVC 2018).
* :func:`average_drop_increase` - average drop and increase in confidence
  (Chattopadhay et al., Grad-CAM++, WACV 2018).
* :func:`pointing_game` - hit if the saliency maximum lies within a tolerance of a
  ground-truth box (Zhang et al., IJCV 2018, "Top-down neural attention by
  excitation backprop").
* :func:`energy_pointing_game` - fraction of the saliency mass inside the boxes
  (Wang et al., Score-CAM, CVPRW 2020).

Why this module is written the way it is: insertion/deletion needs
``2 * N * M * n_steps`` forward passes, far more than fit in memory at once. So every
(image, map, step) input is a *job* with a flat index in the one forward engine's queue
(:class:`unioncam.engine.Engine`); jobs are materialised lazily, a chunk at a time,
regardless of which image or map they belong to. Pass a CAM (an engine) as ``model`` to
score with its tuned chunk size, memory format and precision; a bare ``nn.Module`` gets
an engine with ``chunk_size`` (default 64) in the model's own memory format. A job's
input depends only on its own image, map and step, so results do not depend on the chunk
size or on which batch an image arrives in (up to the model's own batch-size numerics).
No host synchronisation happens inside the chunk loops (no ``.item()``/``.cpu()``); the
only synchronising checks are input validation, done once before the loops.

Conventions shared by all functions:

* ``x`` is ``N x C x H x W`` in the model's (normalised) input space.
* ``saliency`` is ``N x H x W`` (one map per image) or ``N x M x H x W`` (``M`` maps per
  image, e.g. several methods at once); results are then ``N`` or ``N x M``.
* ``targets`` is ``None`` (the model's predicted class on ``x``), a sequence of ``N`` ints,
  or an integer tensor of shape ``N``.
* The model must return logits ``B x K``; it runs in eval mode and is given back as it came.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from unioncam.engine import Engine, check_autocast, model_format
from unioncam.ops import gaussian_blur, pixel_ranks

__all__ = [
    "InsDelResult",
    "auc",
    "average_drop_increase",
    "energy_pointing_game",
    "insertion_deletion",
    "pointing_game",
    "softmax_prob",
]

Targets = Tensor | Sequence[int] | None
Baseline = str | Tensor
DEFAULT_CHUNK = 64


# --------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------


def auc(curve: Tensor) -> Tensor:
    """Trapezoidal area under ``curve[..., 0..S]`` sampled at ``0, 1/S, ..., 1``.

    ``(sum(curve) - (curve[0] + curve[-1]) / 2) / S``; lies in ``[0, 1]`` for probabilities.
    """
    s = curve.shape[-1] - 1
    if s < 1:
        raise ValueError(f"auc: curve needs at least 2 points, got {curve.shape[-1]}")
    return (curve.sum(-1) - 0.5 * (curve[..., 0] + curve[..., -1])) / s


def _shape(t) -> str:
    return "x".join(map(str, t.shape)) if isinstance(t, Tensor) else type(t).__name__


def _check_pos_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def as_engine(model: nn.Module | Engine, chunk_size: int | None, autocast: str | None) -> Engine:
    """The engine to score with: the CAM's own (shared state), or one for a bare model."""
    if chunk_size is not None:
        _check_pos_int(chunk_size, "chunk_size")
    check_autocast(autocast)
    if isinstance(model, Engine):
        return model
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module or an Engine, got {type(model).__name__}")
    return Engine(model, chunk_size=chunk_size or DEFAULT_CHUNK, autocast=autocast,
                  channels_last=model_format(model) == torch.channels_last)


def check_images(x) -> None:
    if not isinstance(x, Tensor) or x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"x must be a float N x C x H x W tensor, got {_shape(x)}")
    if x.shape[0] == 0:
        raise ValueError("x is empty (N = 0)")


def check_saliency(saliency, x: Tensor) -> tuple[Tensor, bool]:
    """Return saliency as ``N x M x H x W`` (float) on x's device and whether M was given."""
    n, _, h, w = x.shape
    if not isinstance(saliency, Tensor) or saliency.dim() not in (3, 4):
        raise ValueError(
            f"saliency must be a N x H x W or N x M x H x W tensor, got {_shape(saliency)}"
        )
    if saliency.shape[0] != n:
        raise ValueError(f"saliency has {saliency.shape[0]} maps for {n} images (x is {_shape(x)})")
    if tuple(saliency.shape[-2:]) != (h, w):
        raise ValueError(
            f"saliency size {saliency.shape[-2]}x{saliency.shape[-1]} does not match "
            f"image size {h}x{w}"
        )
    multi = saliency.dim() == 4
    if multi and saliency.shape[1] == 0:
        raise ValueError("saliency has M = 0 maps per image")
    # Keep the caller's float precision: casting float64 maps to float32 could create ties
    # and so change the pixel order.
    s = saliency.to(device=x.device)
    if not s.is_floating_point():
        s = s.float()
    if not multi:
        s = s.unsqueeze(1)
    bad = ~torch.isfinite(s).flatten(1).all(1)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"saliency of image {i} contains NaN or inf")
    return s, multi


def check_targets(targets: Targets, n: int, device) -> Tensor | None:
    if targets is None:
        return None
    t = targets if isinstance(targets, Tensor) else torch.as_tensor(list(targets))
    if t.dim() != 1 or t.shape[0] != n or t.is_floating_point() or t.dtype == torch.bool:
        raise ValueError(f"targets must be {n} integer class indices, got {_shape(t)} {t.dtype}")
    t = t.to(device=device, dtype=torch.long)
    neg = t < 0
    if bool(neg.any()):
        i = int(neg.nonzero()[0, 0])
        raise ValueError(f"target of image {i} is negative ({int(t[i])})")
    return t


def clean_probs(engine: Engine, x: Tensor, targets: Tensor | None) -> tuple[Tensor, Tensor]:
    """``(target, prob)`` on the clean images; ``targets=None`` picks the argmax class.

    Validates the target range against the model's output once (one host sync), so that
    the long job loops that follow never need to.
    """
    p = engine.softmax(x)
    if targets is None:
        t = p.argmax(1)
    else:
        big = targets >= p.shape[1]
        if bool(big.any()):
            i = int(big.nonzero()[0, 0])
            raise ValueError(f"target of image {i} is {int(targets[i])}, model has {p.shape[1]} classes")
        t = targets
    return t, p.gather(1, t[:, None])[:, 0]


def softmax_prob(
    model: nn.Module | Engine,
    x: Tensor,
    targets: Targets = None,
    chunk_size: int | None = None,
    *,
    autocast: str | None = None,
) -> Tensor:
    """Softmax probability (float32, shape ``N``) of each image's target class.

    ``targets=None`` gives the probability of the predicted (argmax) class.
    """
    check_images(x)
    eng = as_engine(model, chunk_size, autocast)
    t = check_targets(targets, x.shape[0], x.device)
    with eng:
        return clean_probs(eng, x, t)[1]


def _baseline(spec: Baseline, x: Tensor, name: str, blur_kernel: int, blur_sigma: float) -> Tensor:
    """Resolve a baseline spec to a tensor of x's shape (possibly an expanded view)."""
    if isinstance(spec, str):
        if spec == "blur":
            return gaussian_blur(x, blur_kernel, blur_sigma, padding="zeros")
        if spec == "zeros":
            return torch.zeros((), dtype=x.dtype, device=x.device).expand(x.shape)
        raise ValueError(f"{name} must be 'blur', 'zeros' or a tensor, got {spec!r}")
    if not isinstance(spec, Tensor):
        raise ValueError(f"{name} must be 'blur', 'zeros' or a tensor, got {type(spec).__name__}")
    try:
        return spec.to(device=x.device, dtype=x.dtype).expand(x.shape)
    except RuntimeError:
        raise ValueError(
            f"{name} of shape {_shape(spec)} is not broadcastable to x of shape {_shape(x)}"
        ) from None


def _flatten_result(t: Tensor, multi: bool) -> Tensor:
    return t if multi else t.squeeze(1)


# --------------------------------------------------------------------------------------
# Insertion / deletion (RISE)
# --------------------------------------------------------------------------------------


@dataclass
class InsDelResult:
    """Result of :func:`insertion_deletion`.

    ``insertion`` / ``deletion``: AUC per image (``N``) or per image and map (``N x M``).
    Higher insertion and lower deletion mean a more faithful map.
    ``insertion_curve`` / ``deletion_curve``: ``... x (n_steps + 1)`` probabilities, only
    with ``return_curves=True``. ``targets``: the class explained per image.
    """

    insertion: Tensor
    deletion: Tensor
    insertion_curve: Tensor | None = None
    deletion_curve: Tensor | None = None
    targets: Tensor | None = None
    n_steps: int = 0

    @property
    def ins_minus_del(self) -> Tensor:
        """Insertion AUC minus deletion AUC (higher is better), a common single summary."""
        return self.insertion - self.deletion


def insertion_deletion(
    model: nn.Module | Engine,
    x: Tensor,
    saliency: Tensor,
    targets: Targets = None,
    *,
    step: int = 224,
    chunk_size: int | None = None,
    insertion_baseline: Baseline = "blur",
    deletion_baseline: Baseline = "zeros",
    blur_kernel: int = 11,
    blur_sigma: float = 5.0,
    return_curves: bool = False,
    autocast: str | None = None,
) -> InsDelResult:
    """RISE insertion and deletion AUC of saliency maps.

    Pixels are ranked by descending saliency, ties broken by lower flat index
    (``row * W + col``) first. Step ``k`` (``k = 0 .. n_steps``, ``n_steps = ceil(H*W/step)``)
    switches the first ``min(k * step, H*W)`` ranked pixels (all channels):

    * insertion: start from ``insertion_baseline`` (default: Gaussian blur of ``x``, kernel
      11, sigma 5, zero padding as in RISE's code) and put back the original pixels;
    * deletion: start from ``x`` and replace pixels by ``deletion_baseline`` (default:
      zeros of the normalised input space, i.e. the dataset mean colour).

    Baselines: ``"blur"``, ``"zeros"`` or a tensor broadcastable to ``x``. The score of a
    step is the softmax probability of the image's target class; the AUC is the trapezoidal
    rule with spacing ``1/n_steps``, in ``[0, 1]``.

    Forward passes: ``N`` (clean images) + ``2N`` (the two baselines, shared by all maps)
    + ``2 * N * M * (n_steps - 1)`` (intermediate steps), through the engine's chunk queue
    (``model`` may be a CAM: its engine is used; ``chunk_size``/``autocast`` then apply only
    to a bare model).
    """
    check_images(x)
    n, c, h, w = x.shape
    sal, multi = check_saliency(saliency, x)
    m = sal.shape[1]
    step = _check_pos_int(step, "step")
    eng = as_engine(model, chunk_size, autocast)
    t = check_targets(targets, n, x.device)
    ins_base = _baseline(insertion_baseline, x, "insertion_baseline", blur_kernel, blur_sigma)
    del_base = _baseline(deletion_baseline, x, "deletion_baseline", blur_kernel, blur_sigma)

    hw = h * w
    n_steps = -(-hw // step)
    n_mid = n_steps - 1  # steps 1 .. n_steps-1 depend on the map; 0 and n_steps do not
    rank = pixel_ranks(sal)  # N x M x H x W: the ordering the selection rules share

    with eng:
        t, p_clean = clean_probs(eng, x, t)

        # One bank of 3N images [insertion baselines | clean images | deletion baselines];
        # every job input is a gather from it, so nothing per-step is ever stored.
        bank = torch.cat([ins_base, x, del_base])

        # Endpoint jobs 0..2N-1: insertion baseline of image i, then deletion baseline of i.
        ends = torch.arange(2 * n, device=x.device)
        p_ends = eng.probs(2 * n, lambda idx: bank[idx + n * (idx >= n)], t[ends % n], x.device)

        # Step jobs, ordered (kind, image, map, k): kind 0 = insertion, 1 = deletion. Switched
        # pixels come from bank[N + img + N*kind] (clean / deletion baseline), the others from
        # bank[img + N*kind] (insertion baseline / clean).
        per_kind = n * m * n_mid
        if per_kind > 0:
            jobs = torch.arange(2 * per_kind, device=x.device)
            job_target = t[(jobs % per_kind) // (m * n_mid)]

            def make_inputs(idx: Tensor) -> Tensor:
                kind = idx // per_kind
                r = idx % per_kind
                k = r % n_mid + 1
                nm = r // n_mid
                img, mp = nm // m, nm % m
                mask = rank[img, mp] < (k * step).view(-1, 1, 1)  # k < n_steps => k*step < hw
                keep = img + n * kind
                return torch.where(mask.unsqueeze(1), bank[keep + n], bank[keep])

            p_mid = eng.probs(2 * per_kind, make_inputs, job_target, x.device).view(2, n, m, n_mid)
        else:
            p_mid = torch.empty(2, n, m, 0, device=x.device)

    def col(v: Tensor) -> Tensor:
        return v.view(n, 1, 1).expand(n, m, 1)

    ins_curve = torch.cat([col(p_ends[:n]), p_mid[0], col(p_clean)], dim=-1)
    del_curve = torch.cat([col(p_clean), p_mid[1], col(p_ends[n:])], dim=-1)
    return InsDelResult(
        insertion=_flatten_result(auc(ins_curve), multi),
        deletion=_flatten_result(auc(del_curve), multi),
        insertion_curve=_flatten_result(ins_curve, multi) if return_curves else None,
        deletion_curve=_flatten_result(del_curve, multi) if return_curves else None,
        targets=t,
        n_steps=n_steps,
    )


# --------------------------------------------------------------------------------------
# Average drop / increase in confidence (Grad-CAM++)
# --------------------------------------------------------------------------------------


def average_drop_increase(
    model: nn.Module | Engine,
    x: Tensor,
    saliency: Tensor,
    targets: Targets = None,
    *,
    chunk_size: int | None = None,
    autocast: str | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-image drop and increase in confidence when the image is masked by its map.

    With ``Y`` the probability of the target class on ``x`` and ``O`` on ``x * saliency``
    (the map, in ``[0, 1]``, multiplies every channel of the *normalised* input, so masked
    pixels go to 0 = the mean colour): ``drop = max(0, Y - O) / Y`` (a fraction, not a
    percentage) and ``increase = O > Y`` (bool). The paper's "Average Drop %" and
    "% Increase in Confidence" are ``100 * drop.mean()`` and ``100 * increase.float().mean()``.
    Shapes: ``N`` for ``N x H x W`` maps, ``N x M`` for ``N x M x H x W`` maps.
    """
    check_images(x)
    n = x.shape[0]
    sal, multi = check_saliency(saliency, x)
    m = sal.shape[1]
    out_of_range = ((sal < 0) | (sal > 1)).flatten(1).any(1)
    if bool(out_of_range.any()):
        i = int(out_of_range.nonzero()[0, 0])
        raise ValueError(f"saliency of image {i} has values outside [0, 1]")
    eng = as_engine(model, chunk_size, autocast)
    t = check_targets(targets, n, x.device)

    def make_inputs(idx: Tensor) -> Tensor:
        img = idx // m
        return x[img] * sal[img, idx % m].unsqueeze(1).to(x.dtype)

    with eng:
        t, y = clean_probs(eng, x, t)
        o = eng.probs(n * m, make_inputs, t.repeat_interleave(m), x.device).view(n, m)
    y = y.view(n, 1)
    drop = (y - o).clamp_min(0) / y
    increase = o > y
    return _flatten_result(drop, multi), _flatten_result(increase, multi)


# --------------------------------------------------------------------------------------
# Pointing game / energy pointing game
# --------------------------------------------------------------------------------------


def _check_boxes(boxes, n: int, device) -> tuple[Tensor, Tensor]:
    """Pad a list of ``K_i x 4`` boxes into ``N x K x 4`` float64 plus a ``N x K`` valid mask."""
    if not isinstance(boxes, Sequence) or isinstance(boxes, str | Tensor) or len(boxes) != n:
        got = len(boxes) if isinstance(boxes, Sequence) else type(boxes).__name__
        raise ValueError(f"boxes must be a list of {n} tensors (one per image), got {got}")
    kmax = 1
    for i, b in enumerate(boxes):
        if not isinstance(b, Tensor) or b.dim() != 2 or b.shape[1] != 4 or b.shape[0] == 0:
            raise ValueError(
                f"boxes of image {i} must be a K x 4 tensor with K >= 1, got {_shape(b)}"
            )
        kmax = max(kmax, b.shape[0])
    padded = torch.zeros(n, kmax, 4, dtype=torch.float64, device=device)
    valid = torch.zeros(n, kmax, dtype=torch.bool, device=device)
    for i, b in enumerate(boxes):
        padded[i, : b.shape[0]] = b.to(device=device, dtype=torch.float64)
        valid[i, : b.shape[0]] = True
    bad = valid & ~(
        torch.isfinite(padded).all(-1)
        & (padded[..., 2] > padded[..., 0])
        & (padded[..., 3] > padded[..., 1])
    )
    if bool(bad.any()):
        i, k = (int(v) for v in bad.nonzero()[0])
        raise ValueError(
            f"box {k} of image {i} is empty or not finite: need x1 > x0 and y1 > y0, "
            f"got {padded[i, k].tolist()}"
        )
    return padded, valid


def _check_map(saliency, name: str) -> tuple[Tensor, bool]:
    if not isinstance(saliency, Tensor) or saliency.dim() not in (3, 4):
        raise ValueError(
            f"{name}: saliency must be a N x H x W or N x M x H x W tensor, got {_shape(saliency)}"
        )
    multi = saliency.dim() == 4
    s = saliency.float() if multi else saliency.float().unsqueeze(1)
    bad = ~torch.isfinite(s).flatten(1).all(1)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"{name}: saliency of image {i} contains NaN or inf")
    return s, multi


def pointing_game(saliency: Tensor, boxes: Sequence[Tensor], *, tolerance: float = 15) -> Tensor:
    """Pointing-game hits (bool, ``N`` or ``N x M``).

    The saliency maximum (first in row-major order on ties) at pixel ``(row, col)`` is a
    hit when its Euclidean distance to the nearest pixel of some box of its image is at most
    ``tolerance`` pixels, i.e. the box grown by ``tolerance`` with rounded corners, as in
    TorchRay's reference implementation of Zhang et al. (15 px). ``tolerance=0`` asks for
    the point inside a box.

    ``boxes``: a list of ``N`` tensors ``K_i x 4`` (``K_i >= 1``) of ``(x0, y0, x1, y1)``
    in pixel coordinates of the map, end-exclusive: pixel ``(row, col)`` is inside when
    ``x0 <= col < x1`` and ``y0 <= row < y1``. Boxes may extend beyond the map.
    """
    s, multi = _check_map(saliency, "pointing_game")
    if not (isinstance(tolerance, int | float) and tolerance >= 0 and math.isfinite(tolerance)):
        raise ValueError(
            f"pointing_game: tolerance must be a finite number >= 0, got {tolerance!r}"
        )
    n, m, h, w = s.shape
    b, valid = _check_boxes(boxes, n, s.device)
    flat = s.flatten(2).argmax(-1)  # N x M, first maximum
    row = (flat // w).double().unsqueeze(-1)  # N x M x 1
    col = (flat % w).double().unsqueeze(-1)
    x0, y0, x1, y1 = (b[:, None, :, j] for j in range(4))  # N x 1 x K
    # Distance to the nearest *pixel index* of the box: pixels x0..x1-1 (integer boxes).
    dx = torch.clamp(torch.maximum(torch.ceil(x0) - col, col - (torch.ceil(x1) - 1)), min=0)
    dy = torch.clamp(torch.maximum(torch.ceil(y0) - row, row - (torch.ceil(y1) - 1)), min=0)
    hit = (dx**2 + dy**2 <= float(tolerance) ** 2) & valid[:, None, :]
    return _flatten_result(hit.any(-1), multi)


def energy_pointing_game(saliency: Tensor, boxes: Sequence[Tensor]) -> Tensor:
    """Fraction of the saliency mass inside the union of an image's boxes (``N`` or ``N x M``).

    ``sum(map * inside) / sum(map)`` as in Score-CAM; maps must be non-negative (clamp signed
    maps first). An all-zero map scores 0 (it puts no energy in the boxes) rather than NaN,
    so that a mean over a dataset stays defined. Box convention as in :func:`pointing_game`.
    """
    s, multi = _check_map(saliency, "energy_pointing_game")
    neg = (s < 0).flatten(1).any(1)
    if bool(neg.any()):
        i = int(neg.nonzero()[0, 0])
        raise ValueError(f"energy_pointing_game: saliency of image {i} has negative values")
    n, m, h, w = s.shape
    b, valid = _check_boxes(boxes, n, s.device)
    cols = torch.arange(w, device=s.device, dtype=torch.float64)
    rows = torch.arange(h, device=s.device, dtype=torch.float64)
    in_x = (cols >= b[..., 0:1]) & (cols < b[..., 2:3]) & valid[..., None]  # N x K x W
    in_y = (rows >= b[..., 1:2]) & (rows < b[..., 3:4])  # N x K x H
    inside = (in_y.unsqueeze(-1) & in_x.unsqueeze(-2)).any(1)  # N x H x W
    s64 = s.double()
    total = s64.sum((-2, -1))
    inner = (s64 * inside.unsqueeze(1)).sum((-2, -1))
    frac = torch.where(total > 0, inner / total.clamp_min(torch.finfo(torch.float64).tiny), 0.0)
    return _flatten_result(frac.float(), multi)
