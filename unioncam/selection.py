"""Selection rules: how the pool member to keep is scored.

``beta`` is the paper's rule (confidence gain of the masked input). Other
rules are registered here with the forward passes per image they cost, so a
configuration's price is known before it runs.

A rule is ``fn(cam, x, pool_maps, classes, beta) -> (scores N×P, forwards)``
where ``pool_maps`` is N×P×H×W in [0,1] and ``beta`` the pool's β (N×P).
Higher is better; ties go to the earlier pool member.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["SELECTIONS", "register"]

Rule = Callable[..., tuple[torch.Tensor, int]]
SELECTIONS: dict[str, Rule] = {}


def register(name: str) -> Callable[[Rule], Rule]:
    def deco(fn: Rule) -> Rule:
        SELECTIONS[name] = fn
        return fn

    return deco


@register("beta")
def beta_rule(cam, x, pool_maps, classes, beta) -> tuple[torch.Tensor, int]:
    """The paper's selection: the β already computed for every pool member (no extra forwards)."""
    return beta, 0
