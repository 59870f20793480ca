"""Ablation-CAM: parity with pytorch-grad-cam, the network tail, chunk invariance."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from test_cams import STEM, _AfterStem, _hook_count
from torch import nn

from unioncam import AblationCAM, resolve_layer
from unioncam.ops import minmax
from unioncam.perturbation import WHOLE_NETWORK
from unioncam.tail import find_tail, fx_tail


def test_parity_with_pytorch_grad_cam_ablationcam(effnet, photos):
    """Same maps as pytorch-grad-cam's AblationCAM at the stem's ReLU6 (its minimum is 0,
    where both libraries zero the channel), up to where each normalises (see test_cams)."""
    from pytorch_grad_cam import AblationCAM as TheirAblationCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model = effnet.model
    x = photos[0][:2]
    with AblationCAM(model, STEM, chunk_size=16) as cam:
        res = cam(x)
        assert cam.tail == "fx"
    layer = resolve_layer(model, STEM)
    # Its AblationCAM caches the *last* call of the hooked module, so it gets the stem's
    # ReLU6 as a module of its own (no parameters: the same function).
    stem = nn.Sequential(model._conv_stem, model._bn0, copy.deepcopy(layer.module))
    wrapped = nn.Sequential(stem, _AfterStem(model)).eval()
    with TheirAblationCAM(wrapped, target_layers=[stem[2]], batch_size=32) as ref_cam:
        ref = ref_cam(x, targets=[ClassifierOutputTarget(int(c)) for c in res.target])
    assert isinstance(wrapped[0][2], type(layer.module))  # their ablation layer was put back
    torch.testing.assert_close(res.maps, minmax(torch.from_numpy(ref)), atol=2e-3, rtol=0)
    acts = []
    h = stem.register_forward_hook(lambda m, i, o: acts.append(o))
    with torch.no_grad():
        wrapped(x)
    h.remove()
    live = int(acts[0].flatten(2).ne(0).any(2).sum())  # channels not zero everywhere
    assert res.forwards == 2 + live


def test_parity_at_a_layer_with_negative_values(effnet, photos):
    """At _blocks.15 (a linear bottleneck: half of its values are negative)
    pytorch-grad-cam fills ``min − 1e7``; with its documented ``ablation_layer=`` hook set
    to fill 0, as the paper does, it gives our maps. This pins that Ablation-CAM's weak
    scores at this layer in docs/faithfulness.md are the method's, not a bug of ours."""
    from pytorch_grad_cam import AblationCAM as TheirAblationCAM
    from pytorch_grad_cam.ablation_layer import AblationLayer
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    class ZeroFill(AblationLayer):
        def __call__(self, x, **_kwargs):  # the block is called with drop_connect_rate=
            out = self.activations
            for i in range(out.size(0)):
                out[i, self.indices[i], :] = 0
            return out

    model = effnet.model
    x = photos[0][:1]
    with AblationCAM(model, "_blocks.15", chunk_size=64) as cam:
        res = cam(x)
    layer = resolve_layer(model, "_blocks.15")
    with TheirAblationCAM(model, target_layers=[layer.module], batch_size=64,
                          ablation_layer=ZeroFill()) as ref_cam:  # fmt: skip
        ref = ref_cam(x, targets=[ClassifierOutputTarget(int(c)) for c in res.target])
    assert resolve_layer(model, "_blocks.15").module is layer.module  # put back
    torch.testing.assert_close(res.maps, minmax(torch.from_numpy(ref)), atol=2e-3, rtol=0)
    assert bool((res.mask_scores < 0).any())  # ablating some channels raises the logit


def test_tail_equals_whole_network_and_chunks_change_nothing(effnet, photos):
    """At _blocks.15 (negative values, 320 channels): the traced tail gives the weights
    that whole-network forwards with the output replaced give, at any chunk size."""
    x = photos[0][:2]
    with AblationCAM(effnet.model, "_blocks.15", chunk_size=5) as cam:
        small = cam(x)
        assert cam.tail == "fx"
    with AblationCAM(effnet.model, "_blocks.15", chunk_size=64) as cam:
        big = cam(x)
    with AblationCAM(effnet.model, "_blocks.15", chunk_size=64, find_tail=False) as cam:
        whole = cam(x[1:])  # 320 whole-network forwards: one image is enough
        assert cam.tail == WHOLE_NETWORK
    torch.testing.assert_close(small.mask_scores, big.mask_scores, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(big.mask_scores[1:], whole.mask_scores, atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(big.maps[1:], whole.maps, atol=1e-4, rtol=0)
    assert small.forwards == big.forwards == 2 + 2 * 320  # no channel of this layer is all 0
    assert bool((big.mask_scores != 0).any())


def test_no_tail_inside_a_residual_block_falls_back_exactly(effnet, photos):
    """_blocks.14._bn2 feeds the block's skip sum: the logits need the block's input too,
    so there is no tail; the whole-network path runs and matches a plain reference."""
    model = effnet.model
    x = photos[0][:1]
    layer = resolve_layer(model, "_blocks.14._bn2")
    assert fx_tail(model, layer) is None
    before = _hook_count(model)
    with AblationCAM(model, "_blocks.14._bn2", chunk_size=32) as cam:
        res = cam(x)
        assert cam.tail == WHOLE_NETWORK
    assert _hook_count(model) == before
    # Reference: one channel at a time, the layer's output zeroed by a hook.
    k = 5
    with torch.no_grad():
        c = int(res.target[0])
        z = model(x)[0, c]

        def zero(_m, _i, out):
            out = out.clone()
            out[:, k] = 0
            return out

        h = layer.module.register_forward_hook(zero)
        zk = model(x)[0, c]
        h.remove()
    torch.testing.assert_close(res.mask_scores[0, k], (z - zk) / z, atol=1e-4, rtol=1e-3)


def test_tail_found_for_torchvision_and_checked():
    """torchvision's ResNet: a tail at layer4 and at layer3 (which runs layer4 too), each
    reproducing the model's logits; a wrong activation is rejected, not used."""
    torch.manual_seed(0)
    resnet = torchvision.models.resnet18(weights=None).eval()
    x = torch.randn(2, 3, 64, 64)
    for name in ("layer4", "layer3"):
        layer = resolve_layer(resnet, name)
        acts: list[torch.Tensor] = []
        h = layer.module.register_forward_hook(lambda m, i, o, acts=acts: acts.append(o))
        with torch.no_grad():
            logits = resnet(x)
        h.remove()
        found = find_tail(resnet, layer, acts[0], logits)
        assert found is not None and found[0] == "fx", name
        assert find_tail(resnet, layer, acts[0] + 1, logits) is None
    with AblationCAM(resnet, "layer4", chunk_size=64) as cam:
        res = cam(x)
        assert cam.tail == "fx"
    assert res.maps.shape == (2, 64, 64) and res.forwards == 2 + int(res.mask_scores.ne(0).sum())


def test_timm_forward_head_is_a_tail():
    timm = pytest.importorskip("timm")
    from unioncam.tail import timm_head_tail

    model = timm.create_model("resnet18", pretrained=False, num_classes=10).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        feats = model.forward_features(x)
        logits = model(x)
    tail = timm_head_tail(model, resolve_layer(model, "layer4"))
    assert tail is not None
    torch.testing.assert_close(tail(feats), logits)
