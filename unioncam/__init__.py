"""unioncam: UnionCAM and its component CAMs as a batched, exact, device-agnostic PyTorch library.

Pure PyTorch: no Ray, no Zarr, no files. The dataset pipeline lives in ``pipeline``.
"""

from unioncam.gradient import (
    DenoisedCAM,
    GradCAM,
    GradCAMPlusPlus,
    GradientCAM,
    LayerCAM,
    XGradCAM,
)
from unioncam.hooks import TargetLayer, find_target_layer, resolve_layer
from unioncam.models import LoadedModel, Preprocessing, load_model
from unioncam.region import GroupCAM, ScoreCAM
from unioncam.union import DEFAULT_PRESET, PRESETS, UnionCAM, UnionCAMConfig, UnionCAMResult

__version__ = "0.1.0"

__all__ = [
    "UnionCAM",
    "UnionCAMConfig",
    "UnionCAMResult",
    "PRESETS",
    "DEFAULT_PRESET",
    "GradientCAM",
    "GradCAM",
    "GradCAMPlusPlus",
    "XGradCAM",
    "LayerCAM",
    "DenoisedCAM",
    "ScoreCAM",
    "GroupCAM",
    "TargetLayer",
    "resolve_layer",
    "find_target_layer",
    "load_model",
    "LoadedModel",
    "Preprocessing",
]
