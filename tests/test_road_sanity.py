"""ROAD (noisy linear imputation) against pytorch-grad-cam's, and the randomisation check."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from unioncam.road import impute, removal_counts, road
from unioncam.sanity import cascading_randomization, randomization_steps, spearman, ssim


def _small_cnn(classes: int = 5) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, classes)).eval()


@pytest.mark.parametrize("size", [17, 40])
@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.9])
def test_imputation_equals_pytorch_grad_cams_direct_solve(size, fraction):
    from pytorch_grad_cam.metrics.road import NoisyLinearImputer

    g = torch.Generator().manual_seed(size)
    x = torch.randn(3, size, size, generator=g)
    cam = torch.rand(size, size, generator=g)
    thr = np.percentile(cam.numpy(), 100 * (1 - fraction))
    keep = torch.from_numpy(np.float32(cam.numpy() < thr))  # what grad-cam keeps (MoRF)
    ref = NoisyLinearImputer(noise=0.0)(x, keep)
    removed = keep == 0
    assert int(removed.sum()) == removal_counts([fraction], size * size)[0]
    mine = impute(x[None], removed[None], noise=0.0)[0]
    torch.testing.assert_close(mine, ref, atol=2e-3, rtol=0)
    assert torch.equal(mine[:, ~removed], x[:, ~removed])  # known pixels untouched


@pytest.mark.parametrize("fraction", [0.1, 0.9])
def test_imputation_of_one_large_blob_equals_the_direct_solve(fraction):
    """A CAM removes one smooth blob, the hard case for plain CG (hundreds of iterations):
    the multigrid-preconditioned solve matches grad-cam's sparse direct solve closely."""
    import torch.nn.functional as F
    from pytorch_grad_cam.metrics.road import NoisyLinearImputer

    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 96, 96, generator=g)
    cam = F.interpolate(torch.rand(1, 1, 4, 4, generator=g), size=(96, 96), mode="bilinear",
                        align_corners=False)[0, 0]  # fmt: skip
    thr = np.percentile(cam.numpy(), 100 * (1 - fraction))
    keep = torch.from_numpy(np.float32(cam.numpy() < thr))
    ref = NoisyLinearImputer(noise=0.0)(x, keep)
    mine = impute(x[None], (keep == 0)[None], noise=0.0)[0]
    torch.testing.assert_close(mine, ref, atol=5e-4, rtol=0)


def test_road_equals_pytorch_grad_cam_on_the_same_maps():
    """MoRF/LeRF per fraction with a softmax target, noise off on both sides."""
    from pytorch_grad_cam.metrics.perturbation_confidence import (
        PerturbationConfidenceMetric,
        RemoveLeastRelevantFirst,
        RemoveMostRelevantFirst,
    )
    from pytorch_grad_cam.metrics.road import NoisyLinearImputer
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    model = _small_cnn()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 3, 24, 24, generator=g)
    maps = torch.rand(3, 24, 24, generator=g)
    fractions = (0.2, 0.5, 0.8)
    mine = road(model, x, maps, fractions=fractions, noise=0.0, chunk_size=4, return_curves=True)
    with torch.no_grad():
        base = model(x).softmax(1)
    tgt = [ClassifierOutputSoftmaxTarget(int(c)) for c in mine.target]
    for j, f in enumerate(fractions):
        pct = round(100 * (1 - f))
        imp = NoisyLinearImputer(noise=0.0)
        morf = PerturbationConfidenceMetric(RemoveMostRelevantFirst(pct, imp))(
            x, maps.numpy(), tgt, model)
        lerf = PerturbationConfidenceMetric(RemoveLeastRelevantFirst(pct, imp))(
            x, maps.numpy(), tgt, model)
        clean = base.gather(1, mine.target[:, None])[:, 0].numpy()
        np.testing.assert_allclose(mine.morf_curve[:, j].numpy(), morf + clean, atol=1e-3)
        np.testing.assert_allclose(mine.lerf_curve[:, j].numpy(), lerf + clean, atol=1e-3)


def test_road_noise_is_seeded_and_chunk_invariant():
    model = _small_cnn()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 20, 20, generator=g)
    maps = torch.rand(2, 2, 20, 20, generator=g)
    a = road(model, x, maps, fractions=(0.3, 0.7), chunk_size=3, return_curves=True)
    b = road(model, x, maps, fractions=(0.3, 0.7), chunk_size=8, return_curves=True)
    torch.testing.assert_close(a.morf_curve, b.morf_curve, atol=1e-6, rtol=0)
    torch.testing.assert_close(a.lerf_curve, b.lerf_curve, atol=1e-6, rtol=0)
    c = road(model, x, maps, fractions=(0.3, 0.7), chunk_size=3, seed=1, return_curves=True)
    assert not torch.allclose(a.morf_curve, c.morf_curve)  # the noise is really there
    assert a.morf.shape == (2, 2) and a.road.shape == (2, 2)


class Corner(nn.Module):
    """Class 0's logit is the (signed) mean of the top-left 8×8 patch: the evidence is known."""

    def forward(self, x):
        e = x[:, :, :8, :8].mean((1, 2, 3)) * 8
        return torch.stack([e, torch.zeros_like(e)], 1)


def test_road_prefers_the_map_on_the_evidence():
    x = torch.zeros(1, 3, 24, 24)
    x[:, :, :8, :8] = 1.0  # the evidence
    right = torch.zeros(1, 24, 24)
    right[:, :8, :8] = 1
    right += torch.linspace(0, 1e-3, 24 * 24).view(1, 24, 24)  # no ties
    wrong = right.flip(-1).flip(-2)
    r = road(Corner(), x, torch.stack([right, wrong], 1), [0], noise=0.0)
    assert float(r.morf[0, 0]) < float(r.morf[0, 1])  # removing the evidence first hurts
    assert float(r.road[0, 0]) > float(r.road[0, 1])


def test_similarity_measures():
    a = torch.rand(2, 16, 16)
    assert torch.allclose(spearman(a, a), torch.ones(2))
    assert torch.allclose(spearman(a, -a), -torch.ones(2))
    assert torch.allclose(ssim(a, a), torch.ones(2), atol=1e-6)
    assert float(ssim(a, torch.rand(2, 16, 16)).max()) < 0.5


def test_randomising_the_model_changes_gradcam_and_the_users_model_is_untouched():
    """Grad-CAM passes the cascading check on a model whose randomisation must change it."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 64, 64)
    steps = randomization_steps(model)
    assert steps[:3] == ["fc", "layer4.1", "layer4.0"]
    res = cascading_randomization(model, x, "gradcam", "layer4", steps=steps[:4])
    assert res.steps == ["original", "fc", "layer4.1", "layer4.0", "layer3.1"]
    assert torch.allclose(res.spearman[:, 0], torch.ones(2))
    assert res.layer_step == 2  # layer4 is read at layer4.1's output
    assert res.passes, res.spearman
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_the_layers_step_is_measured_and_the_cascade_stops_past_it():
    """A head activation is no block of its own: its step is the first block that changes it
    (EfficientNet-Lite0's ``_swish`` follows ``_bn1``), and ``past_layer`` ends the cascade."""
    from unioncam import load_model

    model = load_model("efficientnet-lite0").model
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    res = cascading_randomization(model, x, "gradcam", "_swish", past_layer=1)
    assert res.steps == ["original", "_fc", "_bn1", "_conv_head"]
    assert res.layer_step == 2
    assert res.spearman.shape == (1, 4)
    # _fc leaves the layer's output alone but not Grad-CAM's gradient: the map moves already
    assert float(res.spearman[0, 1]) < 0.99
    with pytest.raises(ValueError, match="past_layer"):
        cascading_randomization(model, x, "gradcam", "_swish", past_layer=-1)
