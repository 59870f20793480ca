"""Component CAMs: parity with pytorch-grad-cam, hook hygiene, target layers, bad input."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from unioncam import (
    METHODS,
    EigenCAM,
    EigenGradCAM,
    FinerCAM,
    GradCAM,
    GradCAMElementWise,
    GradCAMPlusPlus,
    HiResCAM,
    LayerCAM,
    ScoreCAM,
    UnionCAM,
    XGradCAM,
    find_target_layer,
    resolve_layer,
)
from unioncam.engine import _CPU_CHUNKS
from unioncam.gradient import denoise_gradient
from unioncam.ops import minmax

STEM = "_swish#0"  # EfficientNet-Lite's root ReLU6, first of its two calls: post-activation, 32 ch


def _hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
               for m in model.modules())


def _sign_corrected(of: str):
    """pytorch-grad-cam's EigenCAM / EigenGradCAM with its own sign correction.

    Its plain ``get_2d_projection`` keeps whatever sign LAPACK's SVD returns (numpy and
    torch disagreed on 1 of 8 test maps), so the reference is the same projection through
    its ``get_2d_projection_with_sign_correction``: the library's functions, our choice
    of which one.
    """
    import pytorch_grad_cam
    from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection_with_sign_correction

    class Corrected(getattr(pytorch_grad_cam, of)):
        def get_cam_image(self, input_tensor, target_layer, target_category, activations,
                          grads, eigen_smooth):
            m = activations if of == "EigenCAM" else grads * activations
            return get_2d_projection_with_sign_correction(m)

    return Corrected


PARITY = pytest.mark.parametrize(("ours", "theirs"), [
    (GradCAM, "GradCAM"), (GradCAMPlusPlus, "GradCAMPlusPlus"), (XGradCAM, "XGradCAM"),
    (LayerCAM, "LayerCAM"), (HiResCAM, "HiResCAM"), (GradCAMElementWise, "GradCAMElementWise"),
    (FinerCAM, "FinerCAM"), (EigenCAM, "EigenCAM~"), (EigenGradCAM, "EigenGradCAM~"),
])


@PARITY
def test_parity_with_pytorch_grad_cam(effnet, photos, ours, theirs):
    """Same maps as pytorch-grad-cam up to where each library normalises.

    pytorch-grad-cam min–max normalises the low-resolution map and then resizes
    (cv2, half-pixel centres like ours); we resize and then normalise. Both are
    affine images of the same bilinear upsample, so after one more min–max
    they must agree.
    """
    _check_parity(effnet, photos[0][:3], ours, theirs)


@pytest.mark.imagenet
@PARITY
def test_parity_with_pytorch_grad_cam_on_imagenet_photos(effnet, imagenet_photos, ours, theirs):
    _check_parity(effnet, imagenet_photos[0][:3], ours, theirs)


def _check_parity(effnet, x, ours, theirs):
    import pytorch_grad_cam
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model = effnet.model
    layer = resolve_layer(model, STEM)
    with ours(model, STEM, chunk_size=8) as cam:
        res = cam(x)
        mine, classes = res.maps, res.target
    # pytorch-grad-cam hooks a module's every call and keeps the last; give it the stem only.
    stem = nn.Sequential(model._conv_stem, model._bn0, layer.module)
    rest = _AfterStem(model)
    wrapped = nn.Sequential(stem, rest).eval()
    make = _sign_corrected(theirs[:-1]) if theirs.endswith("~") else getattr(pytorch_grad_cam, theirs)
    # FinerCAM builds its own contrastive target for the predicted class when given none.
    given = None if theirs == "FinerCAM" else [ClassifierOutputTarget(int(c)) for c in classes]
    with make(wrapped, target_layers=[stem[2]]) as ref_cam:
        ref = ref_cam(x, targets=given)
    ref = minmax(torch.from_numpy(ref))
    torch.testing.assert_close(mine, ref, atol=2e-3, rtol=0)


class _AfterStem(nn.Module):
    """EfficientNet-Lite from its first block on (so the stem can be hooked alone)."""

    def __init__(self, m: nn.Module) -> None:
        super().__init__()
        self.m = m

    def forward(self, x):
        m = self.m
        for block in m._blocks:
            x = block(x)
        x = m._swish(m._bn1(m._conv_head(x)))
        return m._fc(torch.flatten(m._avg_pooling(x), 1))


def test_eigen_projection_sign_is_fixed_and_matches_numpy_up_to_it(effnet, photos):
    """The SVD's sign is arbitrary; the corrected projection is not: negating the maps
    gives the same projection, and it is ±pytorch-grad-cam's ``get_2d_projection``."""
    from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection

    from unioncam.gradient import eigen_projection

    acts = []
    h = effnet.model._blocks[4].register_forward_hook(lambda m, i, o: acts.append(o))
    with torch.no_grad():
        effnet.model.eval()(photos[0][:4])
    h.remove()
    a = acts[0]
    p = eigen_projection(a)
    torch.testing.assert_close(eigen_projection(-a), p, atol=1e-4, rtol=1e-4)
    flat = p.flatten(1)
    assert bool((flat.amax(1) >= flat.amin(1).abs()).all())  # the salient side is positive
    ref = torch.from_numpy(get_2d_projection(a.numpy())).flatten(1)
    sign = torch.where((ref * flat).sum(1, keepdim=True) >= 0, 1.0, -1.0)
    torch.testing.assert_close(flat, sign * ref, atol=1e-3, rtol=1e-3)


def test_denoise_gradient_thresholds_per_channel():
    g = torch.arange(20, dtype=torch.float32).view(1, 2, 2, 5)  # channel 0: 0..9, channel 1: 10..19
    out = denoise_gradient(g, theta=25.0)  # 25th percentile of 0..9 is 2.25
    assert out[0, 0].flatten().tolist() == [0, 0, 0, 3, 4, 5, 6, 7, 8, 9]
    assert out[0, 1].flatten().tolist() == [0, 0, 0] + list(range(13, 20))


def _maker(name: str):
    """Every registered method, small enough for the tiny model (groups=2, "fast")."""
    from unioncam import make_cam

    kw = {"groups": 2} if name in ("groupcam", "unioncam", "fusioncam") else {}
    if name in ("unioncam", "fusioncam"):
        kw["config"] = "fast"

    def make(m, layer):
        return make_cam(name, m, layer, chunk_size=4, **kw)

    return make


# Generated from the registry: a method added there is checked here without a word.
ALL_METHODS = [pytest.param(_maker(name), id=name) for name in METHODS]


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 6, 3, padding=1),
        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5))
    model.train()
    model[1].eval()  # a deliberately mixed train/eval state must come back as it was
    return model


@pytest.mark.parametrize("make", ALL_METHODS)
def test_no_hook_survives_and_state_is_restored(tiny, make):
    x = torch.randn(2, 3, 8, 8)
    before = _hook_count(tiny)
    with make(tiny, "4") as cam:
        out = cam(x)
    assert _hook_count(tiny) == before
    assert tiny.training and not tiny[1].training and tiny[3].training
    assert out is not None

    with pytest.raises(ValueError, match="target of image 1"), make(tiny, "4") as cam:
        cam(x, targets=[0, 7])
    assert _hook_count(tiny) == before

    class Boom(Exception):
        pass

    def explode(*_):
        raise Boom

    h = tiny[3].register_forward_hook(explode)
    with pytest.raises(Boom), make(tiny, "4") as cam:
        cam(x)
    h.remove()
    assert _hook_count(tiny) == before
    assert tiny.training and not tiny[1].training


def test_target_layer_resolution(effnet, photos):
    model = effnet.model
    x, _ = photos
    auto = find_target_layer(model, x[:1])
    assert (auto.name, auto.call) == ("_swish", -1)  # the head's ReLU6, not the stem's
    assert str(resolve_layer(model, "_swish#0")) == "_swish#0"
    assert resolve_layer(model, model._blocks[15]).name == "_blocks.15"
    with pytest.raises(ValueError, match="no module named '_blocks.99'"):
        resolve_layer(model, "_blocks.99")
    resnet = torchvision.models.resnet18(weights=None).eval()
    assert find_target_layer(resnet, torch.randn(1, 3, 64, 64)).name == "layer4"


def test_reused_module_calls_are_told_apart(effnet, photos):
    """The stem call (48×48 at 96 px) and the head call (3×3) of the same module."""
    x, _ = photos
    with GradCAM(effnet.model, "_swish#0") as stem, GradCAM(effnet.model, "_swish") as head:
        assert stem(x[:1]).raw.shape[-2:] == (48, 48)
        assert head(x[:1]).raw.shape[-2:] == (3, 3)
    with pytest.raises(ValueError, match="called 2 time"), GradCAM(effnet.model, "_swish#5") as cam:
        cam(x[:1])


@pytest.mark.parametrize(("bad", "message"), [
    (torch.randn(3, 96, 96), "N×C×H×W"),
    (torch.randn(1, 1, 96, 96), "3 channels"),
    (torch.zeros(1, 3, 96, 96, dtype=torch.uint8), "floating-point"),
    (torch.randn(0, 3, 96, 96), "empty batch"),
])
def test_bad_inputs_are_one_line_errors(effnet, bad, message):
    with pytest.raises(ValueError, match=message), UnionCAM(effnet.model, "_blocks.4") as cam:
        cam(bad)


def test_nan_image_is_named(effnet, photos):
    x, _ = photos
    x = x[:3].clone()
    x[2, 0, 5, 5] = float("nan")
    with pytest.raises(ValueError, match="image 2 contains NaN"), UnionCAM(effnet.model) as cam:
        cam(x)


def test_class_out_of_range_and_non_4d_layer(effnet, photos):
    x, _ = photos
    with pytest.raises(ValueError, match=r"target of image 0 is 1000, outside \[0, 1000\)"), \
            UnionCAM(effnet.model, "_blocks.4", "fast", groups=2) as cam:
        cam(x[:2], targets=torch.tensor([1000, 3]))
    with pytest.raises(ValueError, match="output must be N×K×h×w"), \
            GradCAM(effnet.model, "_fc") as cam:
        cam(x[:1])
    with pytest.raises(ValueError, match="theta"):
        UnionCAM(effnet.model, theta=-1)


def test_used_outside_context_manager_is_an_error(effnet, photos):
    x, _ = photos
    cam = GradCAM(effnet.model, "_blocks.4")
    with pytest.raises(RuntimeError, match="context manager"):
        cam(x[:1])


def test_autotune_picks_a_setting_and_is_exact(effnet, photos):
    x, _ = photos
    with UnionCAM(effnet.model, "_blocks.4", "fast", groups=4, chunk_size=8,
                  channels_last=False) as cam:
        fixed = cam(x[:2])
    with UnionCAM(effnet.model, "_blocks.4", "fast", groups=4) as cam:
        tuned = cam(x[:2])
        assert cam.chunk_size in _CPU_CHUNKS and cam.channels_last in (True, False)
    torch.testing.assert_close(tuned.maps, fixed.maps, atol=1e-4, rtol=0)
    assert effnet.model._conv_stem.weight.is_contiguous()


def test_bf16_autocast_is_close_to_fp32(effnet, photos):
    """bf16 is an option, never the default: outputs stay fp32 and the maps stay close.

    The deviation on 224-px photos is measured in the benchmark; this pins the contract
    (fp32 outputs in [0, 1], same classes, maps strongly correlated).
    """
    x, _ = photos
    # The paper's pool: with a 7-member pool bf16 noise flips near-tied selections, so
    # whole maps change and a correlation says nothing about autocast itself.
    with UnionCAM(effnet.model, "_blocks.4", "paper", chunk_size=8) as cam:
        ref = cam(x[:3])
    with UnionCAM(effnet.model, "_blocks.4", "paper", chunk_size=8, autocast="bf16") as cam:
        low = cam(x[:3])
    assert low.maps.dtype == torch.float32 and low.selection_score.dtype == torch.float32
    assert float(low.maps.min()) >= 0 and float(low.maps.max()) <= 1
    assert torch.equal(low.target, ref.target)
    a, b = low.maps.flatten(1).double(), ref.maps.flatten(1).double()
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    corr = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))
    assert bool((corr > 0.85).all()), corr
    print("bf16 vs fp32: corr", corr.tolist(), "max dev", float((low.maps - ref.maps).abs().max()))


def test_prepare_tunes_ahead_and_changes_no_result(effnet, photos, monkeypatch):
    """``prepare`` (what a pipeline actor calls before pulling work) only moves the tuning."""
    import unioncam.engine as engine

    x, _ = photos
    monkeypatch.setattr(engine, "_TUNED", {})  # other tests' cached choices must not hide it
    calls = []
    measure = engine.Engine._measure
    monkeypatch.setattr(engine.Engine, "_measure",
                        lambda self, ex: calls.append(tuple(ex.shape)) or measure(self, ex))
    with UnionCAM(effnet.model, "_blocks.4", "fast", groups=4, chunk_size=8) as cam:
        assert cam.channels_last is None and cam.layer is None
        cam.prepare(torch.zeros(1, *x.shape[1:], dtype=torch.float64))
        assert calls == [(1, *x.shape[1:])]  # tuned now, in fp32 like a call
        assert cam.channels_last in (True, False) and cam.layer is not None
        ahead = cam(x[:2])
        assert len(calls) == 1  # ... and not again on the first real batch
        with pytest.raises(ValueError, match="3 channels"):
            cam.prepare(torch.zeros(1, 1, *x.shape[2:]))
        chosen = cam.channels_last
    with UnionCAM(effnet.model, "_blocks.4", "fast", groups=4, chunk_size=8,
                  channels_last=chosen) as cam:
        plain = cam(x[:2])
    torch.testing.assert_close(ahead.maps, plain.maps, atol=1e-5, rtol=0)
    assert effnet.model._conv_stem.weight.is_contiguous()


@pytest.mark.parametrize("given, run_cl", [("channels_last", False), ("contiguous", True)])
def test_the_model_comes_back_in_its_own_memory_format(effnet, photos, given, run_cl):
    """Whatever format the CAM runs in, the user's model is returned as it was given."""
    x, _ = photos
    model = effnet.model
    fmt = torch.channels_last if given == "channels_last" else torch.contiguous_format
    model.to(memory_format=fmt)
    try:
        with UnionCAM(model, "_blocks.4", "fast", groups=4, chunk_size=8,
                      channels_last=run_cl) as cam:
            cam(x[:1])
            w = model._conv_stem.weight
            assert w.is_contiguous(memory_format=torch.channels_last if run_cl
                                   else torch.contiguous_format)
        assert model._conv_stem.weight.is_contiguous(memory_format=fmt)
        assert model._conv_stem.weight.is_contiguous() == (given == "contiguous")
    finally:
        model.to(memory_format=torch.contiguous_format)


def test_gradient_cams_cost_no_tuning(effnet, photos, monkeypatch):
    """A Grad-CAM runs no masked forwards, so it must never pay for tuning them."""
    import unioncam.engine as engine

    x, _ = photos
    monkeypatch.setattr(engine, "_TUNED", {})
    calls = []
    monkeypatch.setattr(engine.Engine, "_measure", lambda self, ex: calls.append(1) or (4, False))
    with GradCAM(effnet.model, "_blocks.4") as cam:
        cam.prepare(x[:1])
        res = cam(x[:2])
    assert calls == [] and cam.chunk_size is None and cam.channels_last is None
    assert res.forwards == 2 and res.maps.shape == (2, *x.shape[-2:])
    with ScoreCAM(effnet.model, "_blocks.4") as cam:  # a region method does tune, once
        cam(x[:1])
        cam(x[:1])
    assert calls == [1]


def test_metrics_scored_with_the_cam_keep_its_memory_format(effnet, photos):
    """Scoring maps through the CAM (its engine) keeps the format the CAM runs in.

    The pipeline's ``--metrics`` used to score with its own copy of the model state and put
    the model back to contiguous after the first batch while the CAM believed it ran in
    channels_last: results equal, speed lost. One engine owns the state now.
    """
    from unioncam.metrics import average_drop_increase, insertion_deletion

    x, _ = photos
    model = effnet.model
    with UnionCAM(model, "_blocks.4", "fast", groups=4, chunk_size=8, channels_last=True) as cam:
        res = cam(x[:2])
        assert model._conv_stem.weight.is_contiguous(memory_format=torch.channels_last)
        insertion_deletion(cam, x[:2], res.maps, res.target, step=96 * 96 // 4)
        average_drop_increase(cam, x[:2], res.maps, res.target)
        assert cam.channels_last is True
        assert model._conv_stem.weight.is_contiguous(memory_format=torch.channels_last)
        again = cam(x[:2])
    torch.testing.assert_close(again.maps, res.maps, atol=1e-6, rtol=0)
    assert model._conv_stem.weight.is_contiguous()  # given back as it came


def test_every_method_is_made_by_name_and_returns_one_result_type(tiny):
    from unioncam import CAMResult, make_cam

    x = torch.randn(2, 3, 8, 8)
    assert set(METHODS) == {"gradcam", "gradcam++", "xgradcam", "layercam", "denoised",
                            "scorecam", "groupcam", "unioncam", "hirescam",
                            "gradcam-elementwise", "eigencam", "eigengradcam", "finercam",
                            "ablationcam", "fusioncam"}
    for name in METHODS:
        kw = {"groups": 2} if name in ("groupcam", "unioncam", "fusioncam") else {}
        with make_cam(name, tiny, "4", chunk_size=4, **kw) as cam:
            res = cam(x)
        assert isinstance(res, CAMResult), name
        assert res.maps.shape == (2, 8, 8) and res.target.shape == (2,) and res.forwards >= 2
        assert not hasattr(cam, "last")
    with pytest.raises(ValueError, match="unknown method 'gradcam2'; choose from gradcam"):
        make_cam("gradcam2", tiny)


def test_tuning_cache_is_keyed_weakly_on_the_model():
    """A freed model takes its tuned setting with it: ``id()`` is reused by the next
    object at that address, a weak key is not."""
    import gc
    import weakref

    import unioncam.engine as engine

    x = torch.randn(1, 3, 8, 8)
    tiny = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5))
    with ScoreCAM(tiny, "4") as cam:
        cam(x)
        chosen = (cam.chunk_size, cam.channels_last)
    assert isinstance(engine._TUNED, weakref.WeakKeyDictionary) and tiny in engine._TUNED
    assert chosen in engine._TUNED[tiny].values()
    gone = weakref.ref(tiny)
    before = len(engine._TUNED)
    del tiny, cam
    gc.collect()
    # its entry left with it (other tests' freed models may leave at this collection too)
    assert gone() is None and len(engine._TUNED) <= before - 1
