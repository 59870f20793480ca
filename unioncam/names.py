"""The names a user types for a method, from the registry to a report's table.

One vocabulary: every registered method (:data:`unioncam.registry.METHODS`: ``gradcam``,
``scorecam``, ``unioncam``, …), UnionCAM's presets spelled ``unioncam:<preset>``
(``unioncam`` alone is :data:`unioncam.union.DEFAULT_PRESET`, so ``unioncam:faithful`` is
written ``unioncam``), and UnionCAM's fused maps by their pool-member name
``fused:<gradient>+<region>`` (``fused:denoised+scorecam`` is the paper's L_fused) — the
name :attr:`UnionCAMConfig.pool` gives them, which is also what a store calls them. An
unknown name, or a name of the old report vocabulary (``faithful``, ``fused``), is one line
that says what to write instead.
"""

from __future__ import annotations

from unioncam.fusion import FusionCAM  # noqa: F401  (registers "fusioncam")
from unioncam.gradient import GRADIENT_METHODS
from unioncam.perturbation import AblationCAM  # noqa: F401  (registers "ablationcam")
from unioncam.region import REGION_METHODS
from unioncam.registry import METHODS
from unioncam.union import DEFAULT_PRESET, PRESETS, UnionCAMConfig

__all__ = ["PRESET_LABELS", "check_method", "method_config", "method_label", "method_names",
           "member_label", "split_fused"]

#: How a report titles each preset's UnionCAM (the registry's labels are the other methods').
PRESET_LABELS = {
    "faithful": "UnionCAM (faithful preset, the default)",
    "paper": "UnionCAM (paper)",
    "faithful-fast": "UnionCAM (faithful-fast preset)",
    "fast": "UnionCAM (fast preset)",
}

#: Names of the report vocabulary before this one: what each is now called.
_RENAMED = {
    "faithful": "unioncam (the default preset; unioncam:paper is the paper's configuration)",
    "fused": "fused:denoised+scorecam (the paper's L_fused)",
    "unioncam:faithful": "unioncam",
}


def method_names() -> tuple[str, ...]:
    """Every method name, in the registry's order, then ``unioncam:<preset>`` for every
    preset but the default (``unioncam`` is that one). Fused members are not listed (there
    is one per gradient × region pair); :func:`check_method` accepts them."""
    return (*METHODS.names(), *(f"unioncam:{p}" for p in PRESETS if p != DEFAULT_PRESET))


def split_fused(name: str) -> tuple[str, str] | None:
    """``("denoised", "scorecam")`` for ``fused:denoised+scorecam``; ``None`` if not fused."""
    kind, _, what = name.partition(":")
    if kind != "fused":
        return None
    g, plus, r = what.partition("+")
    if not plus or g not in GRADIENT_METHODS or r not in REGION_METHODS:
        raise ValueError(f"unknown fused map {name!r}; write fused:<gradient>+<region> with a "
                         f"gradient method of {', '.join(GRADIENT_METHODS)} and a region "
                         f"method of {', '.join(REGION_METHODS)}")
    return g, r


def check_method(name: str) -> str:
    """``name`` in its one spelling (``unioncam:faithful`` → ``unioncam``), else a one-line
    ``ValueError`` naming the choices (and the new spelling of an old name)."""
    if name == f"unioncam:{DEFAULT_PRESET}":
        return "unioncam"
    if name in METHODS or name in method_names():
        return name
    if name in _RENAMED:
        raise ValueError(f"method {name!r} is now spelled {_RENAMED[name]}")
    if split_fused(name):
        return name
    raise ValueError(f"unknown method {name!r}; choose from {', '.join(method_names())} or "
                     "fused:<gradient>+<region> (e.g. fused:denoised+scorecam)")


def method_config(name: str) -> UnionCAMConfig | None:
    """The preset a UnionCAM name stands for (``unioncam`` → the default), else ``None``."""
    name = check_method(name)
    if name == "unioncam":
        return PRESETS[DEFAULT_PRESET]
    if name.startswith("unioncam:"):
        return PRESETS[name.partition(":")[2]]
    return None


def member_label(member: str) -> str:
    """A pool member's title (``region:scorecam`` → ``Score-CAM``; the paper's fused map →
    ``Fused (L_fused)``)."""
    kind, _, what = member.partition(":")
    if kind in ("region", "gradient") and what in METHODS:
        return METHODS.info(what)["label"]
    if kind == "fused":
        if member in PRESETS["paper"].pool:
            return "Fused (L_fused)"
        g, r = split_fused(member) or (what, "")
        return f"Fused ({_title(g)} + {_title(r)})"
    return member


def _title(name: str) -> str:
    return METHODS.info(name)["label"] if name in METHODS else name


def method_label(name: str) -> str:
    """A method's title: the registry's label, a preset's (:data:`PRESET_LABELS`), or a fused
    member's (:func:`member_label`)."""
    name = check_method(name)
    if name == "unioncam":
        return PRESET_LABELS[DEFAULT_PRESET]
    if name.startswith("unioncam:"):
        return PRESET_LABELS[name.partition(":")[2]]
    if name.startswith("fused:"):
        return member_label(name)
    return METHODS.info(name)["label"]
