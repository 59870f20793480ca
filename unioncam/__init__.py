"""unioncam: UnionCAM and its component CAMs as a batched, exact, device-agnostic PyTorch library.

Pure PyTorch: no Ray, no Zarr, no files. The dataset pipeline lives in ``pipeline``.

Every CAM is used the same way and returns the same :class:`CAMResult`::

    with UnionCAM(model, "layer4") as cam:        # or GradCAM, ScoreCAM, make_cam("groupcam", …)
        res = cam(x)                                # res.maps: N×H×W in [0, 1]
"""

from unioncam.cam import BaseCAM, CAMResult
from unioncam.engine import Engine
from unioncam.fusion import FusionCAM
from unioncam.gradient import (
    GRADIENT_METHODS,
    DenoisedCAM,
    EigenCAM,
    EigenGradCAM,
    FinerCAM,
    GradCAM,
    GradCAMElementWise,
    GradCAMPlusPlus,
    GradientCAM,
    HiResCAM,
    LayerCAM,
    XGradCAM,
)
from unioncam.hooks import TargetLayer, find_target_layer, resolve_layer
from unioncam.models import LoadedModel, Preprocessing, load_model
from unioncam.perturbation import AblationCAM
from unioncam.region import REGION_METHODS, GroupCAM, RegionCAM, ScoreCAM
from unioncam.registry import METHODS
from unioncam.reshape import ChannelsLast, TokenGrid
from unioncam.selection import SELECTION_RULES
from unioncam.union import DEFAULT_PRESET, PRESETS, UnionCAM, UnionCAMConfig

__version__ = "0.3.0"


def make_cam(method: str, model, layer=None, **kwargs) -> BaseCAM:
    """A CAM by its name in :data:`METHODS` (``gradcam``, ``scorecam``, ``unioncam``, …).

    ``kwargs`` go to the class: e.g. ``groups=`` for ``groupcam``, ``config=`` (a preset name
    or :class:`UnionCAMConfig`) for ``unioncam``, ``chunk_size=``/``autocast=`` for any.
    """
    return METHODS[method](model, layer, **kwargs)


__all__ = [
    "make_cam",
    "METHODS",
    "GRADIENT_METHODS",
    "REGION_METHODS",
    "SELECTION_RULES",
    "CAMResult",
    "BaseCAM",
    "Engine",
    "UnionCAM",
    "FusionCAM",
    "UnionCAMConfig",
    "PRESETS",
    "DEFAULT_PRESET",
    "GradientCAM",
    "GradCAM",
    "GradCAMPlusPlus",
    "XGradCAM",
    "LayerCAM",
    "DenoisedCAM",
    "HiResCAM",
    "GradCAMElementWise",
    "EigenCAM",
    "EigenGradCAM",
    "FinerCAM",
    "AblationCAM",
    "RegionCAM",
    "ScoreCAM",
    "GroupCAM",
    "TargetLayer",
    "resolve_layer",
    "find_target_layer",
    "TokenGrid",
    "ChannelsLast",
    "load_model",
    "LoadedModel",
    "Preprocessing",
]
