"""Selection rules: how the pool member to keep is scored.

``beta`` is the paper's rule (confidence gain of the masked input). Other
rules are registered in :data:`SELECTION_RULES` with the forward passes they cost, so a
configuration's price is known before it runs (:func:`rule_forwards`).

A rule is ``fn(engine, x, pool_maps, target, beta) -> (scores N×P, forwards)``
where ``pool_maps`` is N×P×H×W in [0,1] and ``beta`` the pool's β (N×P).
Higher is better; ties go to the earlier pool member.

Why more than β: β(L) = p(x ⊙ L) − p(x_b) scores the *whole* map as a soft
mask, so a broad map that keeps most of the image scores high. Users judge
maps by insertion/deletion, which only looks at the *ranking* of pixels; β
chose the broad fused map 35/40 times on EfficientNet-Lite0 and lost to plain
Grad-CAM there. The rules below score members on the ranking instead.

Notation for the rules below (all forwards on the target class c, p = softmax):

* ``top_f(L)`` — the ⌊f·H·W⌋ pixels of highest L, ties broken by lower flat
  index (:func:`unioncam.ops.pixel_ranks`) — exactly the
  ordering of :func:`unioncam.metrics.insertion_deletion`, so a rule's probes
  are the very inputs that metric would build at those fractions.
* ``b = blur(x)`` — Gaussian blur, kernel 11, σ 5, zero padding (the metric's
  insertion baseline); ``0`` — zeros of the normalised space (its deletion
  baseline, the dataset mean colour).
* ``ins_f(L) = p(x on top_f(L), b elsewhere)``; ``del_f(L) = p(0 on top_f(L), x elsewhere)``.

Registered rules (forwards = ``per_member · N · P + per_image · N``):

=====================  ==========================================================  ==========  =========
name                   score of member L                                           per member  per image
=====================  ==========================================================  ==========  =========
``beta``               p(x ⊙ L) − p(x_b)  (the paper; β comes free with the pool)  0           0
``beta-blur``          p(x ⊙ L + b ⊙ (1 − L)) − p(b)                               1           1
``drop-<pct>``         p(x) − del_f(L), f = pct/100                                1           1
``keep-remove-<pct>``  ins_f(L) − del_f(L), f = pct/100                            2           0
``insdel-<S>``         S-step RISE: AUC(ins) − AUC(del) at f = k/S, k = 0..S       2(S − 1)    3
=====================  ==========================================================  ==========  =========

A constant map (a component that came out flat, e.g. Group-CAM with every
group scored 0) has no ranking: a ranking rule would score the raster order
its ties fall back to, which once scored +0.23 and won. So under the
ranking rules (``drop``, ``keep-remove``, ``insdel``) such a member's score is
−inf: it is kept only when every member is constant. ``beta`` and
``beta-blur`` score the map as a mask and need no such guard.

``insdel-<S>`` is *exactly* :func:`unioncam.metrics.insertion_deletion`'s
insertion − deletion with ``step = H·W / S`` when S divides H·W (trapezoid
rule, endpoints p(b), p(x), p(0) computed once per image): selecting by it is
selecting by a coarse version of the metric users report, which is why its
benefit must also be checked on measures it does not optimise.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from unioncam.engine import Engine
from unioncam.ops import gaussian_blur, is_flat, pixel_ranks
from unioncam.registry import Registry

__all__ = ["SELECTION_RULES", "rule_forwards"]

Rule = Callable[..., tuple[torch.Tensor, int]]
#: name -> rule; info: ``per_member`` and ``per_image`` forwards (see :func:`rule_forwards`).
SELECTION_RULES: Registry[Rule] = Registry("selection rule")

INSDEL_STEPS = (2, 3, 4, 6, 8, 12, 16)
PERCENTS = (5, 10, 20, 30, 50)


def rule_forwards(name: str, n_images: int, pool_size: int) -> int:
    """Forward passes the rule ``name`` spends on ``n_images`` images with a pool of ``pool_size``."""
    info = SELECTION_RULES.info(name)
    return n_images * (info["per_member"] * pool_size + info["per_image"])


# ----------------------------------------------------------------------------- helpers
def _unranked(scores: torch.Tensor, pool_maps: torch.Tensor) -> torch.Tensor:
    """−inf for flat members: a ranking rule has no ranking to score in a constant map."""
    return scores.masked_fill(is_flat(pool_maps), float("-inf"))


def _probes(engine: Engine, x: torch.Tensor, pool_maps: torch.Tensor, target: torch.Tensor,
            counts: list[int], kinds: list[str], blurred: torch.Tensor | None) -> torch.Tensor:
    """p_c of Q perturbations of every (image, member): N×P×Q, in one chunked job queue.

    Probe q switches the top ``counts[q]`` pixels of the member's map:
    ``kinds[q] == "ins"`` puts them back onto the blurred image,
    ``"del"`` replaces them by 0 in the clean image. Inputs are built one
    chunk at a time from the int32 ranks, never as an N×P×Q×C×H×W tensor.
    """
    n, p, h, w = pool_maps.shape
    q = len(counts)
    rank = pixel_ranks(pool_maps)
    count_t = torch.tensor(counts, device=x.device, dtype=torch.int32)
    is_ins = torch.tensor([k == "ins" for k in kinds], device=x.device)

    def make_inputs(j: torch.Tensor) -> torch.Tensor:
        img, mem, qi = j // (p * q), (j // q) % p, j % q
        mask = (rank[img, mem] < count_t[qi].view(-1, 1, 1)).unsqueeze(1)
        xi = x[img]
        if blurred is None:
            return torch.where(mask, torch.zeros_like(xi), xi)
        ins = is_ins[qi].view(-1, 1, 1, 1)
        kept = torch.where(mask, xi, blurred[img])
        removed = torch.where(mask, torch.zeros_like(xi), xi)
        return torch.where(ins, kept, removed)

    probs = engine.probs(n * p * q, make_inputs, target.repeat_interleave(p * q), x.device)
    return probs.view(n, p, q)


def _pixels(fraction: float, h: int, w: int) -> int:
    return int(fraction * h * w)


# ----------------------------------------------------------------------------- rules
@SELECTION_RULES.register("beta", per_member=0, per_image=0)
def beta_rule(engine, x, pool_maps, target, beta) -> tuple[torch.Tensor, int]:
    """The paper's selection: the β already computed for every pool member (no extra forwards)."""
    return beta, 0


@SELECTION_RULES.register("beta-blur", per_member=1, per_image=1)
def beta_blur_rule(engine, x, pool_maps, target, beta) -> tuple[torch.Tensor, int]:
    """β against the blurred image: p(x ⊙ L + b ⊙ (1 − L)) − p(b).

    Unlike β with zeros, masked-out regions keep their low frequencies, so a
    broad map is no longer rewarded just for avoiding out-of-distribution gray.
    """
    n, p = pool_maps.shape[:2]
    b = gaussian_blur(x)
    base = engine.probs_of(b, target)
    flat = pool_maps.flatten(0, 1)

    def make_inputs(j: torch.Tensor) -> torch.Tensor:
        m = flat[j][:, None]
        img = j // p
        return x[img] * m + b[img] * (1 - m)

    probs = engine.probs(n * p, make_inputs, target.repeat_interleave(p), x.device)
    return probs.view(n, p) - base[:, None], n * p + n


def _make_drop(pct: int) -> Rule:
    def rule(engine, x, pool_maps, target, beta) -> tuple[torch.Tensor, int]:
        n, p, h, w = pool_maps.shape
        clean = engine.probs_of(x, target)
        probs = _probes(engine, x, pool_maps, target, [_pixels(pct / 100, h, w)], ["del"], None)
        return _unranked(clean[:, None] - probs[..., 0], pool_maps), n * p + n

    rule.__doc__ = (f"Drop of p_c when the top {pct}% of the map's pixels are set to 0: "
                    f"p(x) − del_{pct / 100:g}(L). One forward per member, one per image.")
    return rule


def _make_keep_remove(pct: int) -> Rule:
    def rule(engine, x, pool_maps, target, beta) -> tuple[torch.Tensor, int]:
        n, p, h, w = pool_maps.shape
        m = _pixels(pct / 100, h, w)
        probs = _probes(engine, x, pool_maps, target, [m, m], ["ins", "del"], gaussian_blur(x))
        return _unranked(probs[..., 0] - probs[..., 1], pool_maps), 2 * n * p

    rule.__doc__ = (f"Keep the top {pct}% on the blurred image minus remove it from the clean "
                    f"one: ins_f(L) − del_f(L), f = {pct / 100:g}. Two forwards per member.")
    return rule


def _make_insdel(steps: int) -> Rule:
    def rule(engine, x, pool_maps, target, beta) -> tuple[torch.Tensor, int]:
        n, p, h, w = pool_maps.shape
        b = gaussian_blur(x)
        counts = [(k * h * w) // steps for k in range(1, steps)]
        probs = _probes(engine, x, pool_maps, target, counts + counts,
                        ["ins"] * (steps - 1) + ["del"] * (steps - 1), b)
        ends = engine.probs_of(torch.cat([b, x, torch.zeros_like(x)]), target.repeat(3)).view(3, n)
        p_blur, p_clean, p_zero = ends[0, :, None], ends[1, :, None], ends[2, :, None]
        ins_mid, del_mid = probs[..., : steps - 1].sum(-1), probs[..., steps - 1:].sum(-1)
        ins = (ins_mid + 0.5 * (p_blur + p_clean)) / steps
        dele = (del_mid + 0.5 * (p_clean + p_zero)) / steps
        return _unranked(ins - dele, pool_maps), 2 * (steps - 1) * n * p + 3 * n

    rule.__doc__ = (f"{steps}-step insertion − deletion AUC (RISE, trapezoid): "
                    f"2·{steps - 1} forwards per member, 3 per image.")
    return rule


for _pct in PERCENTS:
    SELECTION_RULES.add(f"drop-{_pct}", _make_drop(_pct), per_member=1, per_image=1)
    SELECTION_RULES.add(f"keep-remove-{_pct}", _make_keep_remove(_pct), per_member=2, per_image=0)
for _s in INSDEL_STEPS:
    SELECTION_RULES.add(f"insdel-{_s}", _make_insdel(_s), per_member=2 * (_s - 1), per_image=3)
