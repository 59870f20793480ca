"""Speed of the library's UnionCAM against peers and against plain forward passes.

Not a test: it prints (and saves) a table of images/s and ratios. What it measures, why:

1. **Peers.** On the same model, layer and real photos: this library's ``UnionCAM`` and
   ``ScoreCAM`` against pytorch-grad-cam's ``ScoreCAM`` (PyPI ``grad-cam``) and torchcam's
   ``ScoreCAM`` (PyPI ``torchcam``), each peer at its best batch size (swept first), and
   against the public *per-image* UnionCAM code pattern (one image at a time, a Python loop
   over channels with one batch-1 forward per masked input, numpy percentile), written
   below as a faithful stand-in and checked to give the library's maps.
2. **Forward-pass efficiency** = (time of the plain fp32 forwards the method needs, at the
   fastest batch size and memory format) / (UnionCAM time). The count is the library's own
   ``UnionCAMResult.forwards``; the fastest setting comes from a sweep of batch sizes x
   {contiguous, channels_last}. 1.0 means UnionCAM costs exactly its forward passes.
3. **Auto-tune check.** UnionCAM with its auto-tuned (chunk_size, channels_last) against a
   sweep of fixed settings, to see whether the tuner picks well on this machine.
4. **bf16 autocast.** Speed, and the maps' max deviation and selection agreement against fp32.

Measurement hygiene, because the machine may be shared: every timed phase interleaves its
candidates in rounds (A B C, B C A, C A B, ...) and keeps the median; the headline ratios
are medians of per-round *paired* ratios, which cancel most of a load change between rounds.
Wall time is the headline; process CPU time is recorded too as a load-insensitive check.
Load averages are printed before and after.

Usage (the README's numbers came from the defaults)::

    python benchmarks/bench_unioncam.py                       # CPU: EfficientNet-Lite0, ~10 min idle
    python benchmarks/bench_unioncam.py --n 4 --rounds 5      # more images / rounds
    python benchmarks/bench_unioncam.py --device cuda         # ResNet-50 and VGG16, fp32 + bf16
    python benchmarks/bench_unioncam.py --device cpu --models resnet50 --n 1 --rounds 1 --quick
    # a batch of 16 and a ViT in one run: the default's forwards/s vs the paper's (~24 min)
    python benchmarks/bench_unioncam.py --models efficientnet-lite0,timm:vit_tiny_patch16_224 \
        --n 16 --rounds 2 --quick --peers '' --no-per-image --no-bf16 --tag cpu_batch16

Results go to ``benchmarks/results/bench_unioncam_<tag>.{md,json}`` (tag defaults to the
device; ``--out`` picks another folder).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("TQDM_DISABLE", "1")  # pytorch-grad-cam's ScoreCAM draws a bar per image

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from common import (  # noqa: E402
    PEAK_LOAD,
    REPO,
    SAMPLE,
    interleaved,
    load_photos,
    loadavg,
    machine_line,
    median_paired_ratio,
    timed,
)
from torch import nn  # noqa: E402

from unioncam import AblationCAM, FusionCAM, ScoreCAM, UnionCAM, load_model  # noqa: E402
from unioncam.fusion import similarity_fusion  # noqa: E402
from unioncam.reshape import auto_reshape  # noqa: E402
from unioncam.union import DEFAULT_PRESET  # noqa: E402

DEFAULT_LAYERS = {"efficientnet-lite0": "_blocks.15", "resnet50": "layer4", "vgg16": "features.29",
                  # a ViT: the last block's normalised tokens (docs/models.md says why)
                  "timm:vit_small_patch16_224": "blocks.11.norm1",
                  "timm:vit_tiny_patch16_224": "blocks.11.norm1"}
PROFILES = {
    # Candidates are the ranges where each device's optimum was seen, plus the peers' defaults
    # (pytorch-grad-cam 16, torchcam 32).
    "cpu": dict(models="efficientnet-lite0", n=2, rounds=3, sweep_rounds=2,
                fwd_batches="1,4,8,16,32,64", fwd_min_inputs=32, peer_batches="4,16,64",
                lib_chunks="4,8,16,32"),
    "cuda": dict(models="resnet50,vgg16", n=4, rounds=2, sweep_rounds=2,
                 fwd_batches="32,64,128,256,512", fwd_min_inputs=512, peer_batches="64,128,256,512",
                 lib_chunks="64,128,256,512"),
}


# ---------------------------------------------------------------------------- machine / timing

@torch.no_grad()
def unioncam_forward_count(model, layer_module, x: torch.Tensor) -> int:
    """Forwards the paper's UnionCAM needs for ``x``, counted independently of the library.

    One gradient pass per image, one masked forward per non-constant upsampled channel,
    one zeros-baseline forward per batch, three confidence-gain forwards per image.
    """
    store: dict[str, torch.Tensor] = {}
    handle = layer_module.register_forward_hook(lambda m, i, o: store.__setitem__("A", o))
    try:
        model(x)
    finally:
        handle.remove()
    reshape = auto_reshape(model, layer_module)  # a ViT's tokens -> N×C×h×w, as the library
    act = reshape(store["A"]) if reshape is not None else store["A"]
    flat = act.flatten(0, 1).float()
    live = 0
    for s in range(0, flat.shape[0], 256):
        u = F.interpolate(flat[s:s + 256, None], x.shape[-2:], mode="bilinear",
                          align_corners=False).flatten(1)
        live += int((u.amax(1) > u.amin(1)).sum())
    return x.shape[0] * 4 + live + 1


# ---------------------------------------------------------------------------- the per-image stand-in
def per_image_unioncam(model, layer_module, x1: torch.Tensor, theta: float = 10.0) -> dict:
    """UnionCAM for ONE image (1x3xHxW) the way the public per-image code is written.

    The pattern of the Score-CAM authors' code that UnionCAM's public code builds on: a
    Python loop over channels, one batch-1 forward per masked input with a host sync per
    channel, the percentile threshold in numpy on the CPU, one baseline forward per image.
    """
    H, W = x1.shape[-2:]
    store: dict[str, torch.Tensor] = {}
    handle = layer_module.register_forward_hook(lambda m, i, o: store.__setitem__("A", o))
    try:
        logits = model(x1)
    finally:
        handle.remove()
    c = int(logits.argmax(1))
    (G,) = torch.autograd.grad(logits[0, c], store["A"])
    A, G = store["A"][0].detach(), G[0].detach()

    def prob(inp: torch.Tensor) -> float:
        with torch.no_grad():
            return float(F.softmax(model(inp), dim=1)[0, c])

    def norm(t: torch.Tensor) -> torch.Tensor:
        return (t - t.min()) / (t.max() - t.min() + 1e-8)

    def up(t: torch.Tensor) -> torch.Tensor:
        return F.interpolate(t[None, None], (H, W), mode="bilinear", align_corners=False)[0, 0]

    # 1. denoising module: per-channel percentile threshold of the gradient (numpy, CPU)
    L_den = torch.zeros(A.shape[1:], device=A.device)
    for k in range(A.shape[0]):
        g = G[k].cpu().numpy()
        g_hat = np.where(g >= np.percentile(g.reshape(-1), theta), g, 0.0)
        p = np.maximum(g_hat, 0.0)
        L_den += torch.from_numpy(p / (p.sum() + 1e-8)).float().to(A.device) * A[k]
    L_den = norm(up(L_den))
    # 2. Score-CAM: one forward per non-constant channel
    acc = torch.zeros(H, W, device=A.device)
    forwards = 1
    for k in range(A.shape[0]):
        U = up(A[k])
        if U.max() == U.min():
            continue
        acc += prob(x1 * ((U - U.min()) / (U.max() - U.min()))) * U
        forwards += 1
    L_reg = norm(F.relu(acc))
    # 3-5. confidence gain against the zeros baseline, union, selection
    p_base = prob(torch.zeros_like(x1))
    b_den, b_reg = prob(x1 * L_den) - p_base, prob(x1 * L_reg) - p_base
    L_fused = norm(b_den * L_den + b_reg * L_reg)
    b_fused = prob(x1 * L_fused) - p_base
    sel = 1 if b_fused > b_reg else 0
    return {"map": (L_reg, L_fused)[sel], "selected": sel, "forwards": forwards + 4,
            "reg": L_reg, "fused": L_fused, "b_reg": b_reg, "b_fused": b_fused}


def per_image_fusioncam(model, layer_module, x: torch.Tensor) -> dict:
    """Fusion-CAM the per-image way (the public Xplain-CAM pattern): UnionCAM's per-image
    steps 1-4 above, then the similarity fusion, one image at a time."""
    maps, forwards = [], 0
    for i in range(x.shape[0]):
        o = per_image_unioncam(model, layer_module, x[i:i + 1])
        b = torch.tensor([o["b_fused"]]), torch.tensor([o["b_reg"]])
        maps.append(similarity_fusion(o["fused"][None].cpu(), o["reg"][None].cpu(), *b)[0])
        forwards += o["forwards"]
    return {"maps": torch.stack(maps), "forwards": forwards}


def per_image_batch(model, layer_module, x: torch.Tensor) -> dict:
    outs = [per_image_unioncam(model, layer_module, x[i:i + 1]) for i in range(x.shape[0])]
    return {"maps": torch.stack([o["map"] for o in outs]).cpu(),
            "selected": torch.tensor([o["selected"] for o in outs]),
            "forwards": sum(o["forwards"] for o in outs)}


# ---------------------------------------------------------------------------- methods
def lib_unioncam(model, layer, x, config: str = "paper", **kw) -> dict:
    """The library's UnionCAM; the paper's configuration unless ``config`` names another preset.

    Named explicitly because the library's default preset is not the paper's method.
    """
    with UnionCAM(model, layer, config, **kw) as cam:
        res = cam(x)
        setting = (cam.chunk_size, cam.channels_last)
    return {"maps": res.maps.float().cpu(), "selected": res.selected.cpu(),
            "forwards": res.forwards, "setting": setting}


def lib_scorecam(model, layer, x, **kw) -> dict:
    with ScoreCAM(model, layer, **kw) as cam:
        res = cam(x)
        maps, fwd = res.maps, res.forwards  # masked forwards + the clean pass
        setting = (cam.chunk_size, cam.channels_last)
    return {"maps": maps.cpu(), "forwards": fwd, "setting": setting}


def lib_fusioncam(model, layer, x, **kw) -> dict:
    with FusionCAM(model, layer, **kw) as cam:
        res = cam(x)
        setting = (cam.chunk_size, cam.channels_last)
    return {"maps": res.maps.float().cpu(), "forwards": res.forwards, "setting": setting}


class _Upto(nn.Module):
    """EfficientNet-Lite up to and including block ``k``: the split that lets
    pytorch-grad-cam's AblationCAM swap a layer (its ablation layer takes no
    ``drop_connect_rate``, which the blocks are called with)."""

    def __init__(self, m: nn.Module, k: int) -> None:
        super().__init__()
        self.m, self.k = m, k

    def forward(self, x):
        m = self.m
        x = m._swish(m._bn0(m._conv_stem(x)))
        for block in m._blocks[: self.k + 1]:
            x = block(x)
        return x


class _After(_Upto):
    def forward(self, x):
        m = self.m
        for block in m._blocks[self.k + 1:]:
            x = block(x)
        x = m._swish(m._bn1(m._conv_head(x)))
        return m._fc(torch.flatten(m._avg_pooling(x), 1))


def ablation_model(name: str, model: nn.Module, layer: str) -> tuple[nn.Module, str]:
    """The model and layer both Ablation-CAMs run on (the same function as ``model``)."""
    if name == "efficientnet-lite0" and layer.startswith("_blocks."):
        k = int(layer.split(".")[1])
        return nn.Sequential(_Upto(model, k), nn.Identity(), _After(model, k)).eval(), "1"
    return model, layer


def lib_ablationcam(model, layer, x, **kw) -> dict:
    with AblationCAM(model, layer, **kw) as cam:
        res = cam(x)
        setting = (cam.chunk_size, cam.channels_last, cam.tail)
    return {"maps": res.maps.float().cpu(), "forwards": res.forwards, "setting": setting}


def gradcam_ablationcam(model, layer_module, x, batch_size: int) -> dict:
    """pytorch-grad-cam's AblationCAM: one whole-network forward per channel, batched."""
    from pytorch_grad_cam import AblationCAM as GCAblationCAM

    with GCAblationCAM(model=model, target_layers=[layer_module], batch_size=batch_size) as cam:
        maps = cam(input_tensor=x, targets=None)
        k = cam.activations.shape[1]
    return {"maps": torch.from_numpy(maps), "forwards": x.shape[0] * (1 + k)}


def gradcam_scorecam(model, layer_module, x, batch_size: int) -> dict:
    """pytorch-grad-cam's ScoreCAM (its documented usage; ``batch_size`` attribute)."""
    from pytorch_grad_cam import ScoreCAM as GCScoreCAM

    with GCScoreCAM(model=model, target_layers=[layer_module]) as cam:
        cam.batch_size = batch_size
        maps = cam(input_tensor=x, targets=None)
        k = cam.activations_and_grads.activations[0].shape[1]
    return {"maps": torch.from_numpy(maps), "forwards": x.shape[0] * (1 + k)}


def torchcam_scorecam(model, layer_name, x, batch_size: int) -> dict:
    """torchcam's ScoreCAM: the model call fills its hook, ``cam(class_idx)`` does the rest."""
    from torchcam.methods import ScoreCAM as TCScoreCAM

    with TCScoreCAM(model, layer_name, batch_size=batch_size, input_shape=tuple(x.shape[1:])) as cam:
        with torch.no_grad():
            logits = model(x)
        maps = cam(class_idx=logits.argmax(1).tolist())[0]
        k = cam.hook_a[0].shape[1]
    return {"maps": maps.cpu(), "forwards": x.shape[0] * (2 + k)}  # clean + torchcam's own + K


def plain_forwards(model, x, count: int, batch: int, channels_last: bool,
                   autocast: torch.dtype | None) -> dict:
    """``count`` plain inference forwards in batches of ``batch`` (inputs prepared beforehand)."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    inp = x[torch.arange(batch, device=x.device) % x.shape[0]].contiguous(memory_format=fmt)
    amp = (torch.autocast(x.device.type, dtype=autocast) if autocast is not None
           else contextlib.nullcontext())
    model.to(memory_format=fmt)
    try:
        with torch.no_grad(), amp:
            done = 0
            while done < count:
                b = min(batch, count - done)
                model(inp[:b])
                done += b
    finally:
        model.to(memory_format=torch.contiguous_format)
    return {"forwards": count}


# ---------------------------------------------------------------------------- phases
def forward_sweep(model, x, batches, min_inputs, rounds, device, autocast, log) -> dict:
    """images/s of plain forwards per (batch, memory format), interleaved, warm.

    Sweeps keep each candidate's best round, not its median: on a shared machine contention
    only ever adds time, so the minimum is the least disturbed estimate of what a setting
    can do, and choosing a setting needs exactly that.
    """
    cands: dict[str, Callable[[], Any]] = {}
    for cl in (False, True):
        for b in batches:
            reps = max(1, math.ceil(min_inputs / b))

            def run(b=b, cl=cl, reps=reps):
                return plain_forwards(model, x, b * reps, b, cl, autocast)

            plain_forwards(model, x, b, b, cl, autocast)  # warm-up: allocator, kernel choice
            cands[f"{'channels_last' if cl else 'contiguous'}/{b}"] = run
    rec = interleaved(cands, rounds, device, log, "forward sweep " + ("fp32" if autocast is None else "bf16"))
    table = {}
    for key, r in rec.items():
        fmt, b = key.split("/")
        n_inputs = r["out"][0]["forwards"]
        table[key] = {"format": fmt, "batch": int(b), "inputs": n_inputs,
                      "images_per_s": n_inputs / min(r["wall"]),
                      "wall": r["wall"], "cpu": r["cpu"]}
    best = max(table.values(), key=lambda v: v["images_per_s"])
    return {"table": table, "best": {"batch": best["batch"],
                                     "channels_last": best["format"] == "channels_last",
                                     "images_per_s": best["images_per_s"]}}


def best_batch(make: Callable[[int], Callable[[], Any]], batches, rounds, device, log,
               label) -> tuple[int, dict]:
    cands = {str(b): make(b) for b in batches}
    rec = interleaved(cands, rounds, device, log, label)
    best = {int(k): min(v["wall"]) for k, v in rec.items()}
    return min(best, key=best.get), {str(k): v for k, v in best.items()}


def bench_model(name: str, args, device: torch.device, log) -> dict:
    loaded = load_model(name, device=device)
    model = loaded.model.eval()
    layer = args.layer or DEFAULT_LAYERS.get(name)
    if layer is None:
        raise SystemExit(f"--layer: no default layer for model {name!r}; pass one")
    layer_module = dict(model.named_modules()).get(layer)
    if layer_module is None:
        raise SystemExit(f"--layer: no module named {layer!r} in {name}")
    if auto_reshape(model, layer_module) is not None and (args.peers or args.per_image):
        # The peers' Score-CAM and the per-image stand-in read N×C×h×w layers only.
        log(f"  {name}: a token layer; peers and the per-image stand-in are skipped")
        args = argparse.Namespace(**{**vars(args), "peers": [], "per_image": False})
    x, files = load_photos(loaded, args.n, args.size, Path(args.images))
    x = x.to(device)
    out: dict[str, Any] = {"model": name, "layer": layer, "size": args.size, "n": args.n,
                           "files": files, "load_before": loadavg()}
    log(f"== {name} @ {layer}, {args.n} photos at {args.size} px on {device} (load {loadavg()})")
    precisions: list[tuple[str, torch.dtype | None]] = [("fp32", None)]
    if args.bf16:
        precisions.append(("bf16", torch.bfloat16))

    # 1. plain forwards: fastest (batch, memory format) per precision
    out["forward_sweep"] = {}
    for pname, dt in precisions:
        out["forward_sweep"][pname] = forward_sweep(
            model, x, args.fwd_batches, args.fwd_min_inputs, args.sweep_rounds, device, dt, log)
        log(f"  fastest plain {pname} forwards: {out['forward_sweep'][pname]['best']}")

    # 2. the library's auto-tune (first call; cached afterwards), then fixed settings
    tuned = {}
    for pname, _dt in precisions:
        kw = {"autocast": None if pname == "fp32" else pname}
        r, wall, _ = timed(lambda kw=kw: lib_unioncam(model, layer, x[:1], **kw), device)
        tuned[pname] = {"chunk_size": r["setting"][0], "channels_last": r["setting"][1],
                        "first_call_s_incl_tuning": wall}
        log(f"  auto-tuned {pname}: {tuned[pname]}")
    out["autotune"] = tuned
    # ScoreCAM alone: tuned under its own key (same model and precision: the cached result)
    lib_scorecam(model, layer, x[:1])

    if not args.quick:
        cands = {"auto": lambda: lib_unioncam(model, layer, x[:1])}
        for cl in (False, True):
            for c in args.lib_chunks:
                cands[f"chunk {c}, {'channels_last' if cl else 'contiguous'}"] = (
                    lambda c=c, cl=cl: lib_unioncam(model, layer, x[:1], chunk_size=c,
                                                    channels_last=cl))
        rec = interleaved(cands, args.sweep_rounds, device, log, "library settings")
        out["library_settings"] = {k: min(v["wall"]) for k, v in rec.items()}

    # 3. peers at their best batch size (swept on one photo)
    peers = {}
    if "gradcam" in args.peers:
        bs, table = best_batch(lambda b: (lambda: gradcam_scorecam(model, layer_module, x[:1], b)),
                               args.peer_batches, args.sweep_rounds, device, log,
                               "pytorch-grad-cam batch")
        peers["gradcam"] = {"batch_size": bs, "sweep_s": table}
    if "torchcam" in args.peers:
        bs, table = best_batch(lambda b: (lambda: torchcam_scorecam(model, layer, x[:1], b)),
                               args.peer_batches, args.sweep_rounds, device, log,
                               "torchcam batch")
        peers["torchcam"] = {"batch_size": bs, "sweep_s": table}
    abl_model, abl_layer = ablation_model(name, model, layer)
    abl_module = dict(abl_model.named_modules())[abl_layer]
    if args.ablation and "gradcam" in args.peers:
        bs, table = best_batch(
            lambda b: (lambda: gradcam_ablationcam(abl_model, abl_module, x[:1], b)),
            args.peer_batches, args.sweep_rounds, device, log, "pytorch-grad-cam AblationCAM batch")
        peers["gradcam_ablation"] = {"batch_size": bs, "sweep_s": table}
    out["peers"] = peers

    # 4. the main interleaved rounds, on all n photos
    forwards = unioncam_forward_count(model, layer_module, x)
    n_pi = min(args.per_image_n or args.n, args.n)
    methods: dict[str, Callable[[], Any]] = {
        "unioncam": lambda: lib_unioncam(model, layer, x),
        "scorecam": lambda: lib_scorecam(model, layer, x),
    }
    if "gradcam" in peers:
        methods["gradcam"] = lambda: gradcam_scorecam(model, layer_module, x,
                                                      peers["gradcam"]["batch_size"])
    if "torchcam" in peers:
        methods["torchcam"] = lambda: torchcam_scorecam(model, layer, x,
                                                        peers["torchcam"]["batch_size"])
    if args.ablation:
        methods["ablationcam"] = lambda: lib_ablationcam(abl_model, abl_layer, x)
        if "gradcam_ablation" in peers:
            methods["gradcam_ablation"] = lambda: gradcam_ablationcam(
                abl_model, abl_module, x, peers["gradcam_ablation"]["batch_size"])
    if args.fusion:
        methods["fusioncam"] = lambda: lib_fusioncam(model, layer, x)
        if args.per_image:
            methods["per_image_fusion"] = lambda: per_image_fusioncam(model, layer_module,
                                                                      x[:n_pi])
    if DEFAULT_PRESET != "paper":
        methods["unioncam_default"] = lambda: lib_unioncam(model, layer, x, DEFAULT_PRESET)
    if args.per_image:
        methods["per_image"] = lambda: per_image_batch(model, layer_module, x[:n_pi])
    for pname, dt in precisions:
        best = out["forward_sweep"][pname]["best"]
        methods[f"plain_{pname}"] = (lambda best=best, dt=dt: plain_forwards(
            model, x, forwards, best["batch"], best["channels_last"], dt))
        if pname != "fp32":
            methods[f"unioncam_{pname}"] = lambda pname=pname: lib_unioncam(model, layer, x,
                                                                            autocast=pname)
    rec = interleaved(methods, args.rounds, device, log, "main")
    images = {k: (n_pi if k.startswith("per_image") else args.n) for k in methods}
    rows = {}
    for k, r in rec.items():
        first = r["out"][0]
        rows[k] = {
            "images": images[k],
            "median_wall_s": statistics.median(r["wall"]),
            "median_cpu_s": statistics.median(r["cpu"]),
            "images_per_s": images[k] / statistics.median(r["wall"]),
            # how many times longer than UnionCAM per image (paired by round)
            "time_vs_unioncam": median_paired_ratio(
                [w / images[k] for w in r["wall"]],
                [w / args.n for w in rec["unioncam"]["wall"]]),
            "time_vs_unioncam_per_round": [
                (w / images[k]) / (u / args.n)
                for w, u in zip(r["wall"], rec["unioncam"]["wall"], strict=True)],
            "cpu_time_vs_unioncam": median_paired_ratio(
                [c / images[k] for c in r["cpu"]],
                [c / args.n for c in rec["unioncam"]["cpu"]]),
            "forwards_per_image": first["forwards"] / images[k],
            "wall": r["wall"], "cpu": r["cpu"],
        }
        if "setting" in first:
            rows[k]["setting"] = first["setting"]
    out["methods"] = rows
    out["plain_forwards_counted"] = forwards
    out["library_forwards_reported"] = rec["unioncam"]["out"][0]["forwards"]
    if out["library_forwards_reported"] != forwards:
        log(f"  WARNING: the library reports {out['library_forwards_reported']} forwards, the "
            f"independent count is {forwards}")

    # 5. agreement: per-image stand-in vs library; bf16 vs fp32
    lib = rec["unioncam"]["out"][0]
    checks: dict[str, Any] = {}
    if "per_image" in rec:
        pi = rec["per_image"]["out"][0]
        checks["per_image_max_abs_diff"] = float((pi["maps"] - lib["maps"][:n_pi]).abs().max())
        checks["per_image_selection_agree"] = int((pi["selected"] == lib["selected"][:n_pi]).sum())
        checks["per_image_n"] = n_pi
    if "per_image_fusion" in rec:
        pf, lf = rec["per_image_fusion"]["out"][0], rec["fusioncam"]["out"][0]
        checks["per_image_fusion_max_abs_diff"] = float((pf["maps"] - lf["maps"][:n_pi]).abs().max())
    for pname, _dt in precisions[1:]:
        lo = rec[f"unioncam_{pname}"]["out"][0]
        checks[f"{pname}_max_abs_dev"] = float((lo["maps"] - lib["maps"]).abs().max())
        checks[f"{pname}_mean_abs_dev"] = float((lo["maps"] - lib["maps"]).abs().mean())
        checks[f"{pname}_selection_agree"] = int((lo["selected"] == lib["selected"]).sum())
    out["checks"] = checks
    out["load_after"] = loadavg()
    return out


# ---------------------------------------------------------------------------- report
NOTES = {
    "unioncam": "this library, the paper's configuration, auto-tuned {setting}",
    "unioncam_default": "this library's default preset '" + DEFAULT_PRESET + "' (not the "
                        "paper's method: other pool, other forward count), auto-tuned {setting}",
    "unioncam_bf16": "this library, bf16 autocast, auto-tuned {setting}",
    "scorecam": "this library's Score-CAM alone, auto-tuned {setting}",
    "gradcam": "pytorch-grad-cam ScoreCAM, batch_size={bs} (best swept); align_corners=True "
               "masks, softmax over channel logits",
    "torchcam": "torchcam ScoreCAM, batch_size={bs} (best swept); softmax over channels of "
                "logit differences",
    "per_image": "public per-image pattern: batch-1 forward per channel, numpy percentile "
                 "({n} photo(s))",
    "ablationcam": "this library's Ablation-CAM: the network tail per channel, auto-tuned {setting}",
    "gradcam_ablation": "pytorch-grad-cam AblationCAM, batch_size={bs} (best swept): the whole "
                        "network per channel",
    "fusioncam": "this library's Fusion-CAM (UnionCAM's paper pool, similarity fusion), "
                 "auto-tuned {setting}",
    "per_image_fusion": "public per-image Fusion-CAM pattern ({n} photo(s))",
    "plain_fp32": "the plain fp32 forwards UnionCAM ran, fastest batch {b}, {fmt}",
    "plain_bf16": "the same count of plain bf16 forwards, fastest batch {b}, {fmt}",
}
LABELS = {"unioncam": "UnionCAM (this library)",
          "unioncam_default": "UnionCAM default preset (this library)", "unioncam_bf16": "UnionCAM bf16 (this library)",
          "scorecam": "Score-CAM (this library)", "gradcam": "Score-CAM (pytorch-grad-cam)",
          "torchcam": "Score-CAM (torchcam)", "per_image": "UnionCAM, per-image public pattern",
          "plain_fp32": "plain fp32 forwards (ideal)", "plain_bf16": "plain bf16 forwards",
          "ablationcam": "Ablation-CAM (this library)",
          "gradcam_ablation": "Ablation-CAM (pytorch-grad-cam)",
          "fusioncam": "Fusion-CAM (this library)",
          "per_image_fusion": "Fusion-CAM, per-image public pattern"}


def fmt_setting(s) -> str:
    if not s:
        return "?"
    tail = f", tail: {s[2]}" if len(s) > 2 else ""  # Ablation-CAM: how the tail was found
    return f"chunk {s[0]}, {'channels_last' if s[1] else 'contiguous'}{tail}"


def model_markdown(m: dict) -> list[str]:
    rows = m["methods"]
    L = [f"### {m['model']} @ `{m['layer']}`, {m['n']} photos at {m['size']} px",
         "",
         f"Load average (1/5/15 min) before {m['load_before']}, after {m['load_after']}.",
         "",
         "| method | images/s | time per image vs UnionCAM | range over rounds | CPU-time ratio "
         "| forwards/image | notes |",
         "|---|---:|---:|---:|---:|---:|---|"]
    for k, r in rows.items():
        peer = m["peers"].get(k, {})
        best = m["forward_sweep"].get(k.removeprefix("plain_"), {}).get("best", {})
        note = NOTES[k].format(setting=fmt_setting(r.get("setting")), bs=peer.get("batch_size"),
                               n=r["images"], b=best.get("batch"),
                               fmt="channels_last" if best.get("channels_last") else "contiguous")
        pr = r["time_vs_unioncam_per_round"]
        L.append(f"| {LABELS[k]} | {r['images_per_s']:.3g} | {r['time_vs_unioncam']:.2f}x | "
                 f"{min(pr):.2f}-{max(pr):.2f} | {r['cpu_time_vs_unioncam']:.2f}x | "
                 f"{r['forwards_per_image']:.0f} | {note} |")
    L += ["", "*images/s*: images / median wall time of the timed call (all photos in one call). "
          "*time per image vs UnionCAM*: the method's wall time per image divided by UnionCAM's "
          "in the same round, median over rounds (above 1 = UnionCAM is faster); *range*: the "
          "lowest and highest of those per-round ratios; *CPU-time ratio*: the same with process "
          "CPU time. The plain-forward rows' value is the **forward-pass efficiency**.", ""]
    # targets
    t = targets(m)
    L += ["| target | measured | met |", "|---|---:|---|"]
    for name, val, goal, ok in t:
        L.append(f"| {name} | {val} | {'yes' if ok else 'NO'} ({goal}) |")
    c = m["checks"]
    L.append("")
    if "per_image_max_abs_diff" in c:
        L.append(f"Per-image stand-in vs library maps: max |diff| {c['per_image_max_abs_diff']:.2e}, "
                 f"selection agrees on {c['per_image_selection_agree']}/{c['per_image_n']} photos.")
    if "per_image_fusion_max_abs_diff" in c:
        L.append("Per-image Fusion-CAM vs library maps: max |diff| "
                 f"{c['per_image_fusion_max_abs_diff']:.2e}.")
    if "bf16_max_abs_dev" in c:
        L.append(f"bf16 vs fp32 UnionCAM maps: max |dev| {c['bf16_max_abs_dev']:.3f}, mean |dev| "
                 f"{c['bf16_mean_abs_dev']:.4f}, selection agrees on {c['bf16_selection_agree']}/"
                 f"{m['n']} photos.")
    L.append("")
    # sweeps
    for pname, sw in m["forward_sweep"].items():
        batches = sorted({v["batch"] for v in sw["table"].values()})
        L += [f"Plain {pname} forwards, images/s by batch size (best of interleaved rounds):", "",
              "| format | " + " | ".join(str(b) for b in batches) + " |",
              "|---|" + "---:|" * len(batches)]
        for fmt in ("contiguous", "channels_last"):
            vals = [sw["table"][f"{fmt}/{b}"]["images_per_s"] for b in batches]
            L.append(f"| {fmt} | " + " | ".join(f"{v:.1f}" for v in vals) + " |")
        L.append("")
    at = m["autotune"]
    L.append("Auto-tune picked: " + "; ".join(
        f"{p}: chunk {v['chunk_size']}, {'channels_last' if v['channels_last'] else 'contiguous'} "
        f"(first call incl. tuning {v['first_call_s_incl_tuning']:.1f} s)" for p, v in at.items()))
    if "library_settings" in m:
        ls = m["library_settings"]
        auto = ls["auto"]
        L += ["", "UnionCAM on one photo, fixed settings vs auto (best-of-rounds wall s; lower is "
                  "better):",
              "", "| setting | s | vs auto |", "|---|---:|---:|"]
        for k, v in sorted(ls.items(), key=lambda kv: kv[1]):
            L.append(f"| {k} | {v:.2f} | {v / auto:.2f}x |")
    for p, info in m["peers"].items():
        L.append("")
        L.append(f"{LABELS[p]} batch-size sweep on one photo (best-of-rounds wall s): "
                 + ", ".join(f"{b}: {s:.2f}" for b, s in info["sweep_s"].items())
                 + f" -> {info['batch_size']}")
    L.append("")
    return L


def targets(m: dict) -> list[tuple[str, str, str, bool]]:
    rows = m["methods"]
    t = []
    eff = rows["plain_fp32"]["time_vs_unioncam"]
    t.append(("forward-pass efficiency (fp32)", f"{eff:.2f}", ">= 0.9", eff >= 0.9))
    if "per_image" in rows:
        v = rows["per_image"]["time_vs_unioncam"]
        t.append(("UnionCAM speed-up over the per-image pattern", f"{v:.2f}x", ">= 2x", v >= 2))
    peers = [rows[k]["time_vs_unioncam"] for k in ("gradcam", "torchcam") if k in rows]
    if peers:
        v = min(peers)
        t.append(("UnionCAM speed-up over the faster peer Score-CAM", f"{v:.2f}x", ">= 1.2x",
                  v >= 1.2))
    if "unioncam_default" in rows:
        # forwards/s of the default preset over the paper configuration's, paired by round: the
        # default runs fewer forwards per image, so it should run them at the same rate
        d, p = rows["unioncam_default"], rows["unioncam"]
        v = statistics.median(
            (d["forwards_per_image"] / r) / p["forwards_per_image"]
            for r in d["time_vs_unioncam_per_round"])
        t.append(("default preset forwards/s vs the paper configuration's", f"{v:.2f}",
                  ">= 0.9", v >= 0.9))
    if "plain_bf16" in rows:
        v = rows["plain_bf16"]["time_vs_unioncam"] / rows["unioncam_bf16"]["time_vs_unioncam"]
        t.append(("forward-pass efficiency (bf16)", f"{v:.2f}", "report", True))
        s = 1 / rows["unioncam_bf16"]["time_vs_unioncam"]
        t.append(("bf16 speed-up over fp32 UnionCAM", f"{s:.2f}x", "report", True))
    return t


def write_results(res: dict, out_dir: Path, tag: str) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    L = [f"## UnionCAM speed benchmark ({tag})", "",
         f"Machine: {res['machine']}", "",
         f"Command: `{res['command']}`; total {res.get('total_s', 0):.0f} s; "
         f"load average before {res['load_before']}, after {res.get('load_after', '?')}.", ""]
    if res.get("busy"):
        L += [f"**Note:** the machine was shared and loaded (load average up to {res['busy']} on "
              f"{os.cpu_count()} cores) while this ran: absolute images/s are depressed and noisy; "
              "the paired ratios are the meaningful numbers.", ""]
    for m in res["models"]:
        L += model_markdown(m)
    md = out_dir / f"bench_unioncam_{tag}.md"
    md.write_text("\n".join(L) + "\n")

    def clean(o):
        if isinstance(o, dict):
            return {k: clean(v) for k, v in o.items() if k != "out"}
        if isinstance(o, list | tuple):
            return [clean(v) for v in o]
        return o

    (out_dir / f"bench_unioncam_{tag}.json").write_text(json.dumps(clean(res), indent=1))
    return md


# ---------------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--models", help="comma list (default: per device profile)")
    p.add_argument("--layer", help="target layer (default: per model, e.g. _blocks.15)")
    p.add_argument("--n", type=int, help="photos per timed call (default cpu 2, cuda 4)")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--rounds", type=int, help="interleaved rounds of the main comparison")
    p.add_argument("--sweep-rounds", type=int, help="interleaved rounds of each sweep")
    p.add_argument("--fwd-batches", help="batch sizes of the plain-forward sweep")
    p.add_argument("--fwd-min-inputs", type=int, help="inputs per plain-forward measurement")
    p.add_argument("--peer-batches", help="batch sizes swept for each peer")
    p.add_argument("--lib-chunks", help="fixed chunk sizes compared with the auto-tune")
    p.add_argument("--peers", default="gradcam,torchcam", help="peers to run ('' for none)")
    p.add_argument("--per-image-n", type=int, default=None,
                   help="photos for the slow per-image pattern (default cpu: all, cuda: 1)")
    p.add_argument("--no-per-image", dest="per_image", action="store_false")
    p.add_argument("--no-bf16", dest="bf16", action="store_false")
    p.add_argument("--no-ablation", dest="ablation", action="store_false",
                   help="skip the Ablation-CAM rows (ours and pytorch-grad-cam's)")
    p.add_argument("--no-fusion", dest="fusion", action="store_false",
                   help="skip the Fusion-CAM rows (ours and the per-image pattern)")
    p.add_argument("--quick", action="store_true", help="skip the library fixed-settings sweep")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    p.add_argument("--images", default=os.environ.get("UNIONCAM_SAMPLE", str(SAMPLE)),
                   help="folder with labels.csv and the JPEGs (default ../shared/data/"
                        "imagenet-sample, or $UNIONCAM_SAMPLE)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    p.add_argument("--tag", help="results file suffix (default: the device type)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU is visible to torch")
    if device.type not in PROFILES:
        raise SystemExit(f"--device must be cpu or cuda, got {args.device!r}")
    prof = PROFILES[device.type]
    for key, val in prof.items():
        if getattr(args, key) is None:
            setattr(args, key, val)
    for key in ("fwd_batches", "peer_batches", "lib_chunks"):
        try:
            setattr(args, key, [int(v) for v in str(getattr(args, key)).split(",") if v])
        except ValueError:
            raise SystemExit(f"--{key.replace('_', '-')}: expected a comma list of ints, "
                             f"got {getattr(args, key)!r}") from None
    args.models = [m for m in args.models.split(",") if m]
    args.peers = [m for m in args.peers.split(",") if m]
    if args.per_image_n is None and device.type == "cuda":
        args.per_image_n = 1
    args.device_t = device
    args.tag = args.tag or device.type
    if args.n < 1 or args.rounds < 1 or args.sweep_rounds < 1:
        raise SystemExit("--n, --rounds and --sweep-rounds must be >= 1")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device_t
    t_start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:7.1f}s] {msg}", file=sys.stderr, flush=True)

    res: dict[str, Any] = {"machine": machine_line(device), "load_before": loadavg(),
                           "command": "python benchmarks/bench_unioncam.py "
                                      + " ".join(sys.argv[1:] if argv is None else argv),
                           "models": []}
    log(f"machine: {res['machine']}")
    log(f"load average before: {res['load_before']}")
    for name in args.models:
        m = bench_model(name, args, device, log)
        res["models"].append(m)
        peak = PEAK_LOAD[0]
        res["total_s"] = time.perf_counter() - t_start
        res["load_after"] = loadavg()
        res["busy"] = f"{peak:.1f}" if peak > 1.5 * (os.cpu_count() or 1) else None
        md = write_results(res, Path(args.out), args.tag)  # after each model: partial results survive
    print(md.read_text())
    log(f"load average after: {res['load_after']}; wrote {md} and its .json")


if __name__ == "__main__":
    main()
