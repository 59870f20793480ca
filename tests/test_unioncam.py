"""UnionCAM against a plain, per-image, loop-by-loop reading of the paper's steps 1–5.

The reference below is deliberately naive: one image at a time, one masked
forward per channel, numpy's percentile, no batching, no skipping tricks
beyond the authors' own ``max == min`` check. The library must agree with it
to 1e-4 on real photos with the real pretrained model, including which pool
member is selected: scikit-image's photos, and ImageNet's in the imagenet tier.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from unioncam import DEFAULT_PRESET, PRESETS, UnionCAM, UnionCAMConfig

LAYER = "_blocks.4"  # 40 channels: keeps the naive Score-CAM loop affordable on 2 cores


def _minmax(t: torch.Tensor) -> torch.Tensor:
    return (t - t.min()) / (t.max() - t.min() + 1e-8)


def _prob(model, x: torch.Tensor, c: int) -> float:
    with torch.no_grad():
        return float(F.softmax(model(x), dim=1)[0, c])


def reference_unioncam(model, layer_module, x: torch.Tensor, theta: float = 10.0):
    """Steps 1–5 for ONE image (1×3×H×W), written as plainly as possible."""
    H, W = x.shape[-2:]
    store = {}
    handle = layer_module.register_forward_hook(lambda m, i, o: store.__setitem__("A", o))
    x_req = x.clone()
    logits = model(x_req)
    handle.remove()
    c = int(logits.argmax(1))
    A = store["A"]
    (G,) = torch.autograd.grad(logits[0, c], A)
    A, G = A[0].detach(), G[0].detach()
    K = A.shape[0]

    # 1. denoising module
    L_den = torch.zeros(A.shape[1:])
    for k in range(K):
        g = G[k].numpy()
        tau = np.percentile(g.reshape(-1), theta)  # linear interpolation
        g_hat = np.where(g >= tau, g, 0.0)
        p = np.maximum(g_hat, 0.0)
        L_den += torch.from_numpy(p / (p.sum() + 1e-8)).float() * A[k]
    L_den = _minmax(F.interpolate(L_den[None, None], (H, W), mode="bilinear", align_corners=False)[0, 0])

    # 2. Score-CAM, as in its authors' code
    acc = torch.zeros(H, W)
    for k in range(K):
        U = F.interpolate(A[k][None, None], (H, W), mode="bilinear", align_corners=False)[0, 0]
        if U.max() == U.min():
            continue
        M = (U - U.min()) / (U.max() - U.min())
        acc += _prob(model, x * M, c) * U
    L_reg = _minmax(F.relu(acc))

    # 3. confidence gain with the all-zeros baseline
    p_base = _prob(model, torch.zeros_like(x), c)

    def beta(L):
        return _prob(model, x * L, c) - p_base

    # 4. union
    b_den, b_reg = beta(L_den), beta(L_reg)
    L_fused = _minmax(b_den * L_den + b_reg * L_reg)
    # 5. selection over {L_reg, L_fused}: fused only when strictly greater
    b_fused = beta(L_fused)
    sel = 1 if b_fused > b_reg else 0
    return {"maps": (L_reg, L_fused)[sel], "selected": sel, "scores": (b_reg, b_fused), "class": c,
            "den": L_den, "reg": L_reg, "fused": L_fused, "p_base": p_base}


@pytest.fixture(scope="module")
def library_result(effnet, photos):
    x, _ = photos
    with UnionCAM(effnet.model, LAYER, "paper", chunk_size=16, channels_last=False, return_components=True) as cam:
        return cam(x)


def test_matches_naive_reference_on_real_photos(effnet, photos, library_result):
    _check_against_reference(effnet, photos[0], library_result)


@pytest.mark.imagenet
def test_matches_naive_reference_on_imagenet_photos(effnet, imagenet_photos):
    x = imagenet_photos[0][:2]
    with UnionCAM(effnet.model, LAYER, "paper", chunk_size=16, channels_last=False,
                  return_components=True) as cam:
        res = cam(x)
    _check_against_reference(effnet, x, res)


def _check_against_reference(effnet, x, res):
    layer = dict(effnet.model.named_modules())[LAYER]
    assert res.pool == ("region:scorecam", "fused:denoised+scorecam")
    for i in range(2):  # the naive loop is slow; two real photos are enough to pin it down
        ref = reference_unioncam(effnet.model, layer, x[i:i + 1])
        assert int(res.target[i]) == ref["class"]
        torch.testing.assert_close(res.components["gradient:denoised"][i], ref["den"], atol=1e-4, rtol=0)
        torch.testing.assert_close(res.components["region:scorecam"][i], ref["reg"], atol=1e-4, rtol=0)
        torch.testing.assert_close(res.components["fused:denoised+scorecam"][i], ref["fused"],
                                   atol=1e-4, rtol=0)
        torch.testing.assert_close(res.selection_score[i], torch.tensor(ref["scores"]), atol=1e-4, rtol=0)
        assert int(res.selected[i]) == ref["selected"]
        torch.testing.assert_close(res.maps[i], ref["maps"], atol=1e-4, rtol=0)
        assert abs(float(res.baseline_prob[i]) - ref["p_base"]) < 1e-6


def test_result_shapes_and_ranges(photos, library_result):
    x, _ = photos
    res = library_result
    n, _, h, w = x.shape
    assert res.maps.shape == (n, h, w) and res.maps.dtype == torch.float32
    assert res.selection_score.shape == (n, 2) and res.selected.shape == (n,)
    assert float(res.maps.min()) >= 0.0 and float(res.maps.max()) <= 1.0 + 1e-6
    assert torch.equal(res.selected, res.selection_score.argmax(1))
    # the selected map is the pool member it names
    for i, name in enumerate(res.selected_names):
        assert torch.equal(res.maps[i], res.components[name][i])
    assert (res.prob > 0).all() and (res.prob <= 1).all()
    # 1 gradient pass + 40 Score-CAM masks (minus constant channels) + baseline + 3 β per image
    assert n * 2 + 1 + 3 * n <= res.forwards <= n * (1 + 40 + 3) + 1


@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_chunk_size_does_not_change_results(effnet, photos, library_result, chunk):
    x, _ = photos
    with UnionCAM(effnet.model, LAYER, "paper", chunk_size=chunk, channels_last=False) as cam:
        res = cam(x[:2])
    torch.testing.assert_close(res.maps, library_result.maps[:2], atol=1e-5, rtol=0)
    torch.testing.assert_close(res.selection_score, library_result.selection_score[:2], atol=1e-5, rtol=0)
    assert torch.equal(res.selected, library_result.selected[:2])


def test_batch_composition_does_not_change_results(effnet, photos, library_result):
    x, _ = photos
    with UnionCAM(effnet.model, LAYER, "paper", chunk_size=16, channels_last=False) as cam:
        alone = cam(x[4:5])
        pair = cam(x[[3, 1]])
    torch.testing.assert_close(alone.maps[0], library_result.maps[4], atol=1e-5, rtol=0)
    torch.testing.assert_close(pair.maps, library_result.maps[[3, 1]], atol=1e-5, rtol=0)
    torch.testing.assert_close(pair.selection_score, library_result.selection_score[[3, 1]], atol=1e-5, rtol=0)


def test_channels_last_is_exact(effnet, photos, library_result):
    x, _ = photos
    with UnionCAM(effnet.model, LAYER, "paper", chunk_size=16, channels_last=True) as cam:
        res = cam(x[:2])
    torch.testing.assert_close(res.maps, library_result.maps[:2], atol=1e-4, rtol=0)
    assert torch.equal(res.selected, library_result.selected[:2])
    # the model is back in its own memory format afterwards
    conv = effnet.model._conv_stem.weight
    assert conv.is_contiguous()


def test_given_targets_are_explained(effnet, photos):
    x, labels = photos
    targets = [int(labels[0]), None]
    with UnionCAM(effnet.model, LAYER, "fast", groups=8, chunk_size=16) as cam:
        res = cam(x[:2], targets=targets)
        pred = cam(x[:2])
    assert int(res.target[0]) == int(labels[0])
    assert int(res.target[1]) == int(pred.target[1])


def test_generalised_pool(effnet, photos):
    x, _ = photos
    cfg = UnionCAMConfig(gradient=("denoised", "gradcam++"), region=("scorecam", "groupcam"),
                         groups=8, include_gradient_maps=True, selection="beta", chunk_size=32,
                         return_components=True)
    with UnionCAM(effnet.model, LAYER, cfg) as cam:
        res = cam(x[:2])
    assert res.pool == ("region:scorecam", "region:groupcam", "fused:denoised+scorecam",
                        "fused:denoised+groupcam", "fused:gradcam+++scorecam",
                        "fused:gradcam+++groupcam", "gradient:denoised", "gradient:gradcam++")
    assert res.selection_score.shape == (2, 8)
    assert torch.equal(res.selected, res.selection_score.argmax(1))
    # every pool member's β is p(x ⊙ L) − p(x_b): recompute one by hand
    i, name = 1, "fused:denoised+groupcam"
    with torch.no_grad():
        p = F.softmax(effnet.model(x[i:i + 1] * res.components[name][i]), 1)[0, res.target[i]]
    j = res.pool.index(name)
    assert abs(float(p - res.baseline_prob[i]) - float(res.beta[i, j])) < 1e-5
    assert torch.equal(res.selection_score, res.beta)  # the paper's rule selects by β


def test_blur_baseline_changes_baseline_probs(effnet, photos, library_result):
    x, _ = photos
    with UnionCAM(effnet.model, LAYER, "fast", baseline="blur", groups=4,
                  chunk_size=16) as cam:
        res = cam(x[:2])
    assert not torch.allclose(res.baseline_prob, library_result.baseline_prob[:2])


def test_config_roundtrip_and_presets(effnet):
    with UnionCAM(effnet.model) as cam:  # no config: the default preset, not the paper's
        assert cam.config == UnionCAMConfig.preset(DEFAULT_PRESET)
    assert UnionCAMConfig() == PRESETS[DEFAULT_PRESET]  # one default: the config's own
    assert UnionCAMConfig().preset_name == DEFAULT_PRESET
    cfg = UnionCAMConfig.preset("paper")
    assert cfg != UnionCAMConfig() and cfg.preset_name == "paper"
    assert UnionCAMConfig.from_dict(cfg.to_dict()) == cfg
    fast = UnionCAMConfig.preset("fast", theta=20)
    assert fast.region == ("groupcam",) and fast.theta == 20
    assert fast.fingerprint() != cfg.fingerprint()
    assert UnionCAMConfig.preset("paper", chunk_size=4).fingerprint() == cfg.fingerprint()
    with pytest.raises(ValueError, match="unknown preset"):
        UnionCAMConfig.preset("nope")
    with pytest.raises(ValueError, match=r"unknown gradient method 'gradcam\+'"):
        UnionCAMConfig(gradient=("gradcam+",))
    with pytest.raises(ValueError, match="theta"):
        UnionCAMConfig(theta=150)
    with pytest.raises(ValueError, match="unknown UnionCAMConfig settings: bogus"):
        UnionCAMConfig.from_dict({"bogus": 1})
