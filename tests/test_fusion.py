"""Fusion-CAM against a plain per-image reading of the paper's description."""

from __future__ import annotations

import pytest
import torch
from test_unioncam import LAYER, _minmax, reference_unioncam

from unioncam import FusionCAM, UnionCAM


def reference_fusioncam(model, layer_module, x: torch.Tensor) -> dict:
    """ONE image: UnionCAM's steps 1–4 (the naive reference), then the similarity fusion
    written as plainly as the paper states it."""
    ref = reference_unioncam(model, layer_module, x)
    b_reg, b_fused = ref["scores"]
    l1 = b_fused * ref["fused"]
    l2 = b_reg * ref["reg"]
    sim = torch.clamp(1.0 - torch.abs(l1 - l2), 0.0, 1.0)
    out = sim * torch.max(l1, l2) + (1.0 - sim) * 0.5 * (l1 + l2)
    return {"maps": _minmax(out), "class": ref["class"], "beta": (b_reg, b_fused)}


def test_matches_per_image_reference_on_real_photos(effnet, photos):
    x = photos[0][:2]
    layer = dict(effnet.model.named_modules())[LAYER]
    with FusionCAM(effnet.model, LAYER, chunk_size=16, channels_last=False) as cam:
        res = cam(x)
    assert res.pool == ("region:scorecam", "fused:denoised+scorecam") and res.selected is None
    for i in range(2):
        ref = reference_fusioncam(effnet.model, layer, x[i:i + 1])
        assert int(res.target[i]) == ref["class"]
        torch.testing.assert_close(res.beta[i], torch.tensor(ref["beta"]), atol=1e-4, rtol=0)
        torch.testing.assert_close(res.maps[i], ref["maps"], atol=1e-4, rtol=0)
    with UnionCAM(effnet.model, LAYER, "paper", chunk_size=16, channels_last=False) as cam:
        union = cam(x)
    assert res.forwards == union.forwards  # the paper's cost: nothing is added
    torch.testing.assert_close(res.beta, union.beta)


def test_pairs_one_gradient_with_one_region_map(effnet, photos):
    with pytest.raises(ValueError, match="one gradient map with one region map"):
        FusionCAM(effnet.model, LAYER, "faithful")
    x = photos[0][:2]
    with FusionCAM(effnet.model, LAYER, "fast", groups=4, chunk_size=16) as cam:
        res = cam(x)
    assert res.pool == ("region:groupcam", "fused:denoised+groupcam")
    assert res.maps.shape == (2, *x.shape[-2:]) and float(res.maps.amax()) <= 1.0
