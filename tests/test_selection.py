"""Selection rules: shapes, the forward passes they claim, chunk invariance, exactness, behaviour.

Kept fast (64-px inputs, ``_blocks.4``, two images): the expensive question —
which rule gives the most faithful map on real data — lives in
``benchmarks/faithfulness_frontier.py``; here every rule must do what its
docstring says, and the proxy rules must pick the right map where the right
map is known by construction.
"""

from __future__ import annotations

import pytest
import torch
from conftest import load_batch
from torch import nn

from unioncam import UnionCAM, UnionCAMConfig
from unioncam.cam import BaseCAM
from unioncam.metrics import insertion_deletion
from unioncam.ops import gaussian_blur, pixel_ranks
from unioncam.selection import SELECTION_RULES, rule_forwards
from unioncam.union import PRESETS

LAYER = "_blocks.4"
SIZE = 48  # EfficientNet-Lite0 runs at 48 px (6×6 at _blocks.4); H·W = 2304 is divisible by 3, 4


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """48-px inputs gain nothing from 2 threads, and on the shared 2-core CPU OpenMP threads
    competing with other processes made this module 6-8x slower (measured: 224 s vs 29 s)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class ForwardCounter:
    """Counts images through a model's forward (a root forward hook), i.e. real forward passes."""

    def __init__(self, model: nn.Module) -> None:
        self.images = 0
        self._h = model.register_forward_hook(self._hook)

    def _hook(self, _m, inp, _out) -> None:
        self.images += inp[0].shape[0]

    def close(self) -> None:
        self._h.remove()


@pytest.fixture(scope="module")
def small(effnet, sample_dir, sample_labels):
    x, _ = load_batch(effnet, sample_dir, sample_labels, [3, 19], SIZE)
    return x


@pytest.fixture(scope="module")
def pool(effnet, small):
    """A 3-member pool of real maps (Group-CAM side to keep it cheap) and its β."""
    cfg = UnionCAMConfig(gradient=("gradcam",), region=("groupcam",), groups=4,
                         include_gradient_maps=True, selection="beta", chunk_size=8,
                         channels_last=False, return_components=True)
    with UnionCAM(effnet.model, LAYER, cfg) as cam:
        res = cam(small)
    maps = torch.stack([res.components[k] for k in res.pool], 1)
    return maps, res.target, res.beta


def _run_rule(effnet, x, maps, classes, beta, name, chunk=8):
    with BaseCAM(effnet.model, LAYER, chunk_size=chunk, channels_last=False) as cam:
        cam.gradient_pass(x, classes, need_grad=False)  # registers the hook, like UnionCAM does
        counter = ForwardCounter(effnet.model)
        try:
            scores, claimed = SELECTION_RULES[name](cam, x, maps, classes, beta)
        finally:
            counter.close()
    return scores, claimed, counter.images


# One rule of each family is run (the families share their code path); every registered
# name is checked against its family's cost formula below.
RUN = ["beta", "beta-blur", "drop-20", "keep-remove-20", "insdel-3"]


def test_rules_score_every_member_and_cost_what_they_claim(effnet, small, pool):
    maps, classes, beta = pool
    n, p = maps.shape[:2]
    for name in RUN:
        scores, claimed, counted = _run_rule(effnet, small, maps, classes, beta, name)
        assert scores.shape == (n, p), name
        assert torch.isfinite(scores).all(), name
        assert claimed == counted == rule_forwards(name, n, p), (name, claimed, counted)
        assert not torch.equal(scores[0], scores[1]), f"{name}: images got the same scores"


def test_registered_costs_follow_each_family_formula():
    for name in SELECTION_RULES:
        info = SELECTION_RULES.info(name)
        cost = (info["per_member"], info["per_image"])
        family, _, param = name.rpartition("-")
        expected = {"insdel": lambda s: (2 * (int(s) - 1), 3),
                    "keep-remove": lambda _: (2, 0), "drop": lambda _: (1, 1)}
        if family in expected:
            assert cost == expected[family](param), name
        else:
            assert name in ("beta", "beta-blur"), name
    assert rule_forwards("insdel-8", 5, 7) == 5 * (14 * 7 + 3)
    with pytest.raises(ValueError, match="unknown selection rule 'nope'"):
        rule_forwards("nope", 1, 1)


@pytest.mark.parametrize("name", ["insdel-3", "keep-remove-20", "drop-10", "beta-blur"])
def test_chunk_size_does_not_change_scores(effnet, small, pool, name):
    maps, classes, beta = pool
    ref, _, _ = _run_rule(effnet, small, maps, classes, beta, name, chunk=8)
    for chunk in (3, 64):
        got, _, _ = _run_rule(effnet, small, maps, classes, beta, name, chunk=chunk)
        torch.testing.assert_close(got, ref, atol=2e-5, rtol=0)


def test_insdel_rule_is_the_rise_metric_at_that_step(effnet, small, pool):
    """insdel-S = insertion − deletion of unioncam.metrics at step H·W/S, for every member."""
    maps, classes, beta = pool
    scores, _, _ = _run_rule(effnet, small, maps, classes, beta, "insdel-4")
    ref = insertion_deletion(effnet.model, small, maps, classes, step=SIZE * SIZE // 4,
                             chunk_size=8)
    torch.testing.assert_close(scores, ref.ins_minus_del, atol=2e-5, rtol=0)


def test_pixel_ranks_follow_the_metric_ordering():
    """Ties go to the lower flat index, as in insertion_deletion's stable sort."""
    m = torch.tensor([[[[0.5, 1.0], [0.5, 0.0]]]])
    assert pixel_ranks(m).view(-1).tolist() == [1, 0, 2, 3]


def test_union_cam_counts_the_rule_forwards_and_keeps_beta(effnet, small):
    base = dict(gradient=("gradcam",), region=("groupcam",), groups=4, chunk_size=8,
                channels_last=False, include_gradient_maps=True, selection="beta")
    with UnionCAM(effnet.model, LAYER, UnionCAMConfig(**base)) as cam:
        ref = cam(small)
    with UnionCAM(effnet.model, LAYER, UnionCAMConfig(**{**base, "selection": "insdel-3"})) as cam:
        counter = ForwardCounter(effnet.model)
        try:
            res = cam(small)
        finally:
            counter.close()
    n, p = res.selection_score.shape
    assert res.forwards == ref.forwards + rule_forwards("insdel-3", n, p)
    # UnionCAM's count = real forwards (its gradient pass is one forward per image)
    assert counter.images == res.forwards
    torch.testing.assert_close(res.beta, ref.beta, atol=1e-5, rtol=0)
    assert torch.equal(res.selected, res.selection_score.argmax(1))


def test_presets(effnet, small):
    assert PRESETS["paper"] == UnionCAMConfig.preset("paper")  # the paper's method, by name
    assert PRESETS["paper"].selection == "beta" and PRESETS["paper"].region == ("scorecam",)
    assert PRESETS["paper"].gradient == ("denoised",) and not PRESETS["paper"].include_gradient_maps
    for name, cfg in PRESETS.items():
        assert cfg.preset_name == name
        assert cfg.selection in SELECTION_RULES
    assert UnionCAMConfig.preset("paper", theta=20).preset_name is None  # overrides: no name
    assert UnionCAMConfig.preset("paper", chunk_size=4).preset_name == "paper"  # speed only
    # the faithful preset costs what the README says: 143 forwards per image at any layer
    with UnionCAM(effnet.model, LAYER, "faithful", chunk_size=16, channels_last=False) as cam:
        res = cam(small[:1])
    assert len(res.pool) == 7 and res.selection_score.shape == (1, 7)
    assert res.forwards == 1 + 33 + 1 + 4 + 3 + rule_forwards("insdel-8", 1, 7) == 143
    assert PRESETS["faithful"].forwards_per_image() == 143
    assert PRESETS["faithful-fast"].forwards_per_image() == 50
    assert PRESETS["paper"].forwards_per_image(channels=320) == 325  # upper bound for Score-CAM


# ---------------------------------------------------------------------------- behaviour
class PatchEnergy(nn.Module):
    """A classifier whose evidence is known: class 0's logit is the texture energy in one patch.

    logit_0 = 8 · (mean over the patch of conv(x)_0² − ½), logit_1 = 0, with conv
    passing channel 0 through. On a ±1 checkerboard the patch gives p_0 ≈ 0.98; the
    blurred image or zeros give ≈ 0.02. So the faithful map is the patch, nothing else.
    """

    def __init__(self, patch: tuple[slice, slice]) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1, bias=False)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.weight[0, 0] = 1.0
            self.conv.weight[1, 1] = 1.0
        self.patch = patch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.conv(x)[:, 0, self.patch[0], self.patch[1]]
        e = f.pow(2).mean((-2, -1))
        return torch.stack([8 * (e - 0.5), torch.zeros_like(e)], 1)


def _bump(size: int, cy: float, cx: float, width: float) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    return torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * width ** 2))


def test_proxy_rules_pick_the_known_map_where_beta_picks_the_broad_one():
    size = 64
    model = PatchEnergy((slice(24, 40), slice(24, 40))).eval()
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    checker = ((yy + xx) % 2 * 2 - 1).float()
    x = checker.expand(1, 3, size, size).clone()
    assert gaussian_blur(x)[0, 0, 24:40, 24:40].abs().max() < 0.05  # blur removes the evidence
    right = _bump(size, 31.5, 31.5, 8.0)  # peaks on the patch, < 1 at its edges
    wrong = _bump(size, 10.0, 50.0, 8.0)
    broad = 0.85 + 0.15 * wrong  # keeps nearly everything, but ranks the wrong region first
    maps = torch.stack([broad, wrong, right])[None]  # right map last: ties would not favour it
    classes = torch.tensor([0])
    with BaseCAM(model, "conv", chunk_size=4, channels_last=False) as cam:
        cam.gradient_pass(x, classes, need_grad=False)
        base = cam.probs_of(torch.zeros_like(x), classes)
        beta = cam.probs_of(x * maps[0][:, None], classes.repeat(3))[None] - base
        picks = {name: int(SELECTION_RULES[name](cam, x, maps, classes, beta)[0].argmax(1))
                 for name in SELECTION_RULES}
    # β rewards the broad mask (x ⊙ L ≈ x); so does β on the blurred image.
    assert picks["beta"] == 0 and picks["beta-blur"] == 0
    # every ranking-based rule finds the patch
    ranking_rules = [n for n in SELECTION_RULES if n.startswith(("insdel-", "keep-remove-", "drop-"))]
    assert ranking_rules and all(picks[n] == 2 for n in ranking_rules), picks


def test_a_flat_map_never_wins_a_ranking_rule(effnet, sample_dir, sample_labels):
    """At 96 px, Group-CAM (8 groups) on photo 0 (the coffee crop) comes out flat (all 0).

    Its insdel score would only measure the raster order its ties fall back to. Under
    ranking rules a flat member gets −inf.
    """
    x, _ = load_batch(effnet, sample_dir, sample_labels, [0, 1], 96)
    _check_flat_member_loses(effnet, x)


@pytest.mark.imagenet
def test_a_flat_map_never_wins_a_ranking_rule_on_imagenet_photos(effnet, imagenet_dir,
                                                                  imagenet_labels):  # fmt: skip
    """The case that was found: at 96 px, Group-CAM (8 groups) on ImageNet photo 42 comes
    out flat; before the guard it scored +0.23 and was selected."""
    x, _ = load_batch(effnet, imagenet_dir, imagenet_labels, [0, 42], 96)
    _check_flat_member_loses(effnet, x)


def _check_flat_member_loses(effnet, x):
    kw = dict(gradient=("gradcam",), region=("groupcam",), groups=8, chunk_size=8,
              channels_last=False, include_gradient_maps=True, return_components=True)
    with UnionCAM(effnet.model, LAYER, UnionCAMConfig(**kw, selection="insdel-4")) as cam:
        res = cam(x)
    maps = torch.stack([res.components[k] for k in res.pool], 1).flatten(2)
    flat = maps.amax(-1) <= maps.amin(-1)
    assert bool(flat.any()), "the data no longer gives a flat member; pick another photo"
    assert torch.equal(torch.isinf(res.selection_score), flat)
    assert not bool(flat.gather(1, res.selected[:, None]).any())
    sel = res.maps.flatten(1)
    assert bool((sel.amax(1) > sel.amin(1)).all())
    # β is a soft-mask score and keeps its finite value (a flat 0 map: β = 0 exactly)
    with UnionCAM(effnet.model, LAYER, UnionCAMConfig(**kw, selection="beta")) as cam:
        ref = cam(x)
    assert bool(torch.isfinite(ref.selection_score).all())
