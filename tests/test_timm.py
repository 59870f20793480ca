"""timm models, vision transformers and checkpoints (issue 18), on small random-weight models.

Parity: Grad-CAM and Grad-CAM++ on a timm ViT and a Swin equal pytorch-grad-cam's with its
``reshape_transform`` (the functions from its tutorial), after the common normalisation of
the CNN parity tests. Equivalence: timm's ResNet-18 and torchvision's, loaded from one
checkpoint file, give the same logits and maps. Region methods on a ViT are checked against
the masks built by hand from the token grid. Every bad checkpoint is one line.

Kept fast: ViT-Tiny and a narrowed Swin-Tiny at 96 px, random weights, a few photos.
"""

from __future__ import annotations

import hashlib

import pytest
import torch
from torch import nn

timm = pytest.importorskip("timm")
safetensors_torch = pytest.importorskip("safetensors.torch")

from unioncam import (  # noqa: E402
    ChannelsLast,
    GradCAM,
    GradCAMPlusPlus,
    GroupCAM,
    ScoreCAM,
    TokenGrid,
    UnionCAM,
    find_target_layer,
    load_model,
)
from unioncam.checkpoint import load_checkpoint  # noqa: E402
from unioncam.ops import minmax, upsample  # noqa: E402

SIZE = 96
GRID = SIZE // 16  # ViT-Tiny/16 at 96 px: a 6×6 patch grid


@pytest.fixture(scope="module")
def vit() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", img_size=SIZE, pretrained=False).eval()


@pytest.fixture(scope="module")
def swin() -> nn.Module:
    """Swin-Tiny's architecture, narrowed (fewer, thinner blocks) and at 96 px: windows of 3
    tile the 24, 12, 6 and 3 token grids of its four stages."""
    torch.manual_seed(0)
    return timm.create_model("swin_tiny_patch4_window7_224", img_size=SIZE, window_size=3,
                             embed_dim=48, depths=(1, 1, 2, 1), num_heads=(2, 4, 8, 16),
                             pretrained=False).eval()


@pytest.fixture(scope="module")
def x(photos) -> torch.Tensor:
    return photos[0][:3]


def vit_reshape(t: torch.Tensor, height: int = GRID, width: int = GRID) -> torch.Tensor:
    """pytorch-grad-cam's ViT ``reshape_transform`` (its tutorial), verbatim."""
    result = t[:, 1:, :].reshape(t.size(0), height, width, t.size(2))
    return result.transpose(2, 3).transpose(1, 2)


def swin_reshape(t: torch.Tensor) -> torch.Tensor:
    """pytorch-grad-cam's Swin transform for timm >= 0.9, whose stages are N×H×W×C."""
    return t.permute(0, 3, 1, 2)


def _spread(maps: torch.Tensor) -> torch.Tensor:
    flat = maps.flatten(1)
    return flat.amax(1) - flat.amin(1)


@pytest.mark.parametrize("family", ["vit", "swin"])
@pytest.mark.parametrize(("ours", "theirs"), [(GradCAM, "GradCAM"),
                                              (GradCAMPlusPlus, "GradCAMPlusPlus")])
def test_parity_with_pytorch_grad_cam_and_its_reshape_transform(request, x, family, ours, theirs):
    import pytorch_grad_cam
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model = request.getfixturevalue(family)
    layer, their_reshape = ((model.blocks[-1].norm1, vit_reshape) if family == "vit"
                            else (model.layers[-1], swin_reshape))
    with ours(model) as cam:  # layer and reshape chosen automatically
        res = cam(x)
    with getattr(pytorch_grad_cam, theirs)(model, target_layers=[layer],
                                           reshape_transform=their_reshape) as ref_cam:
        ref = ref_cam(x, targets=[ClassifierOutputTarget(int(c)) for c in res.target])
    torch.testing.assert_close(res.maps, minmax(torch.from_numpy(ref)), atol=2e-3, rtol=0)
    assert (_spread(res.maps) > 0.5).any(), "flat maps would make the comparison empty"
    assert res.raw.shape[-2:] == ((GRID, GRID) if family == "vit" else (SIZE // 32,) * 2)


def test_token_grid_drops_the_prefix_tokens_or_takes_a_bare_grid_whole():
    t = torch.arange(2 * 21 * 3, dtype=torch.float32).reshape(2, 21, 3)  # 1 + 4 registers + 4×4
    grid = TokenGrid(5)(t)
    assert grid.shape == (2, 3, 4, 4) and torch.equal(grid[:, :, 0, 1], t[:, 6])
    assert torch.equal(TokenGrid(1)(t[:, 5:]), grid)  # a layer without its prefix tokens
    with pytest.raises(ValueError, match="18 tokens minus 1 prefix tokens do not form a square"):
        TokenGrid(1)(t[:, :18])


def test_layer_and_reshape_are_chosen_by_family_and_the_user_can_override_them(vit, swin, x):
    cnn = timm.create_model("resnet18", pretrained=False)
    assert str(find_target_layer(vit, x)) == "blocks.11.norm1"
    assert str(find_target_layer(swin, x)) == "layers.3"
    assert str(find_target_layer(cnn, x)) == "layer4"
    with GradCAM(vit) as auto, GradCAM(vit, "blocks.11.norm1", reshape=vit_reshape) as given:
        a, b = auto(x), given(x)
    assert auto.reshape == TokenGrid(1, (GRID, GRID)) and given.reshape is vit_reshape
    torch.testing.assert_close(a.maps, b.maps)
    with GradCAM(swin) as cam:
        cam(x[:1])
    assert cam.reshape == ChannelsLast()
    # The stem convolution of a Swin is already N×C×H×W: no reshape there.
    with GradCAM(swin, "patch_embed.proj") as cam:
        assert cam(x[:1]).raw.shape[-2:] == (SIZE // 4, SIZE // 4)
    assert cam.reshape is None


def test_why_not_the_last_blocks_output(vit, x):
    """The head reads the class token: after the last attention no patch token reaches the
    logits, so their gradient is zero and Grad-CAM is flat (hence ``norm1``, the default)."""
    with GradCAM(vit, "blocks.11") as cam:
        res = cam(x)
    assert float(res.raw.abs().max()) == 0.0
    with GradCAM(vit) as cam:
        assert (_spread(cam(x).raw) > 0).all()


def test_a_reshape_that_does_not_give_a_map_is_one_line(vit, x):
    with pytest.raises(ValueError, match=r"blocks.11.norm1: output must be N×K×h×w, got "
                                         r"\(1, 37, 192\) after the reshape step; choose another layer or pass reshape="
                       ) as e, GradCAM(vit, "blocks.11.norm1", reshape=lambda t: t) as cam:
        cam(x[:1])
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="reshape must be a callable"):
        GradCAM(vit, reshape="tokens")


def test_score_cam_masks_are_the_token_grid_upsampled(x):
    """Score-CAM's every mask score, recomputed by hand from the tokens a plain hook saw.

    (A 4-block ViT-Tiny at 64 px: Score-CAM runs one forward per channel, 192 here.)
    """
    torch.manual_seed(4)
    vit = timm.create_model("vit_tiny_patch16_224", img_size=64, depth=4, pretrained=False).eval()
    img = torch.nn.functional.interpolate(x[:1], size=64, mode="bilinear", antialias=True)
    with ScoreCAM(vit, chunk_size=64) as cam:
        res = cam(img)
    assert str(cam.layer) == "blocks.3.norm1"
    seen = []
    handle = vit.blocks[-1].norm1.register_forward_hook(lambda m, i, o: seen.append(o))
    with torch.no_grad():
        vit(img)
    handle.remove()
    grid = seen[0][:, 1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)  # 1×192×4×4
    assert res.mask_scores.shape == (1, grid.shape[1]) and res.forwards == 1 + 192
    for k in (0, 57, 191):
        mask = minmax(upsample(grid[:, k:k + 1], (64, 64))[:, 0])
        with torch.no_grad():
            p = vit(img * mask[:, None]).softmax(1)[0, res.target[0]]
        torch.testing.assert_close(res.mask_scores[0, k], p, atol=1e-5, rtol=1e-4)
    raw = (res.mask_scores[0, :, None, None] * grid[0]).sum(0)
    torch.testing.assert_close(res.raw[0], raw, atol=1e-5, rtol=1e-4)


def test_group_cam_and_unioncam_run_on_a_swin(swin, x):
    with GroupCAM(swin, groups=4, chunk_size=16) as cam:
        g = cam(x[:2])
    assert g.mask_scores.shape == (2, 4) and g.forwards == 2 + 2 * 4 + 2
    assert (_spread(g.maps) > 0.5).all()
    with UnionCAM(swin, config="fast", groups=4, chunk_size=16) as cam:
        u = cam(x[:2])
    assert u.maps.shape == (2, SIZE, SIZE) and (_spread(u.maps) > 0.5).all()
    assert cam.reshape == ChannelsLast() and str(cam.layer) == "layers.3"


# ------------------------------------------------------------------ loading and checkpoints
def _save(state: dict, path) -> str:
    safetensors_torch.save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return str(path)


def test_timm_resnet_from_a_checkpoint_equals_torchvision_with_the_same_weights(tmp_path, x):
    import torchvision

    torch.manual_seed(1)
    tv = torchvision.models.resnet18()
    for m in tv.modules():  # BatchNorm statistics that are not the identity
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    path = _save(tv.state_dict(), tmp_path / "resnet18.safetensors")
    ours = load_model("timm:resnet18.tv_in1k", weights=path)
    ref = load_model("resnet18", weights=path)
    assert ours.preprocess == ref.preprocess  # timm's tv_in1k config is torchvision's
    digest = hashlib.sha256(open(path, "rb").read()).hexdigest()
    assert ours.weights_sha256 == ref.weights_sha256 == digest
    with torch.no_grad():
        torch.testing.assert_close(ours.model(x), ref.model(x), atol=1e-4, rtol=1e-4)
    with GradCAM(ours.model) as a, GradCAM(ref.model) as b:
        ra, rb = a(x), b(x)
    assert str(a.layer) == str(b.layer) == "layer4"
    assert torch.equal(ra.target, rb.target)
    torch.testing.assert_close(ra.maps, rb.maps, atol=1e-4, rtol=0)


def test_preprocessing_is_timms_own_eval_transform(sample_dir, sample_labels):
    from PIL import Image

    loaded = load_model("timm:vit_tiny_patch16_224")
    pre = loaded.preprocess
    assert (pre.crop_size, pre.resize_size, pre.interpolation) == (224, 248, "bicubic")
    cfg = timm.data.resolve_model_data_config(loaded.model)
    theirs = timm.data.create_transform(**cfg)
    with Image.open(sample_dir / sample_labels[0]["file"]) as img:
        mine = pre(img)[0]
        ref = theirs(img.convert("RGB"))
    torch.testing.assert_close(mine, ref, atol=1e-5, rtol=0)


def test_wrapped_and_prefixed_checkpoints_and_a_fine_tuned_head_load(tmp_path, x):
    torch.manual_seed(2)
    model = timm.create_model("vit_tiny_patch16_224", num_classes=10, dynamic_img_size=True,
                              pretrained=False).eval()
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    path = tmp_path / "trained.pt"
    torch.save({"epoch": 3, "state_dict": state}, path)
    loaded = load_model("timm:vit_tiny_patch16_224", weights=str(path))
    assert loaded.num_classes == 10 and loaded.name == "timm:vit_tiny_patch16_224"
    # A model whose own names start with "model." keeps the prefix of its checkpoint.
    wrapper = nn.Sequential()
    wrapper.model = nn.Linear(2, 2)
    torch.save(wrapper.state_dict(), tmp_path / "wrapper.pt")
    load_checkpoint(wrapper, str(tmp_path / "wrapper.pt"))
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x[:1]), model(x[:1]), atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def vit_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(3)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False).state_dict()


def _bad_checkpoint(kind: str, tmp_path, vit_state) -> tuple[str, str, str]:
    """(model name, weights, the words the one line must hold) for each kind of misfit."""
    if kind == "missing-and-extra":
        state = {k: v for k, v in vit_state.items() if k != "head.bias"}
        state["extra.weight"] = torch.zeros(3)
        return ("timm:vit_tiny_patch16_224", _save(state, tmp_path / "c.safetensors"),
                "1 missing tensors (e.g. ['head.bias']), 1 unexpected (e.g. ['extra.weight'])")
    if kind == "other-architecture":
        import torchvision

        state = torchvision.models.resnet18().state_dict()
        return ("timm:vit_tiny_patch16_224", _save(state, tmp_path / "r.safetensors"),
                "none of its 122 tensor names is the model's")
    if kind == "other-size":
        return ("timm:vit_small_patch16_224", _save(vit_state, tmp_path / "t.safetensors"),
                "tensors have another shape (e.g. cls_token: file (1, 1, 192), model (1, 1, 384))")
    if kind == "pickle":
        path = tmp_path / "whole_model.pt"
        torch.save(nn.Linear(2, 2), path)  # a pickled module, not a state dict
        return ("timm:vit_tiny_patch16_224", str(path), "is not a weights-only checkpoint")
    if kind == "not-cached":
        return ("timm:vit_tiny_patch16_224", "pretrained", "are not in the local Hugging Face "
                f"cache ({tmp_path / 'empty-cache'}) and are never downloaded here")
    if kind == "unknown-name":
        return ("timm:vit_tinyy_patch16_224", None, "timm has no model 'vit_tinyy_patch16_224' "
                "(close: vit_tiny_patch16_224")
    assert kind == "no-such-weights"
    return ("timm:vit_tiny_patch16_224", "ckpt.safetensor",
            "'ckpt.safetensor' is neither a file nor 'pretrained'")


BAD = ["missing-and-extra", "other-architecture", "other-size", "pickle", "not-cached",
       "unknown-name", "no-such-weights"]


@pytest.mark.parametrize("kind", BAD)
def test_every_bad_checkpoint_is_one_line(kind, tmp_path, vit_state, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    name, weights, words = _bad_checkpoint(kind, tmp_path, vit_state)
    with pytest.raises(ValueError) as e:
        load_model(name, weights=weights)
    msg = str(e.value)
    assert "\n" not in msg and words in msg, msg
    assert msg.startswith(("weights: ", "model: "))


def test_timms_pretrained_weights_come_from_the_local_cache_only(tmp_path, monkeypatch, vit_state):
    """A Hugging Face cache laid out as huggingface_hub writes it, holding random weights."""
    repo = timm.models.get_pretrained_cfg("vit_tiny_patch16_224").hf_hub_id
    folder = tmp_path / "hub" / ("models--" + repo.replace("/", "--"))
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("0123abc")
    (folder / "snapshots" / "0123abc").mkdir(parents=True)
    _save(vit_state, folder / "snapshots" / "0123abc" / "model.safetensors")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    loaded = load_model("timm:vit_tiny_patch16_224", weights="pretrained")
    assert loaded.weights == "pretrained"
    for k, v in loaded.model.state_dict().items():
        assert torch.equal(v, vit_state[k]), k
