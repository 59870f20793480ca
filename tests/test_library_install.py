"""The method library stands alone: `import unioncam` works where Ray, Zarr and the rest of
the pipeline's stack are not installed, and the one default is the same everywhere."""

from __future__ import annotations

import subprocess
import sys
import textwrap

# timm and safetensors are the [timm] extra: `import unioncam` must not need them either.
BLOCKED = ("ray", "zarr", "pyarrow", "fsspec", "xarray", "matplotlib", "skimage", "pipeline",
           "timm", "safetensors")


def test_library_imports_and_runs_without_the_pipeline_stack():
    code = textwrap.dedent(f"""
        import importlib.abc, sys
        BLOCKED = {BLOCKED!r}

        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ModuleNotFoundError(f"No module named {{name!r}} (blocked by the test)")
                return None

        sys.meta_path.insert(0, Block())
        import torch
        from torch import nn
        import unioncam
        from unioncam import metrics, make_cam

        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                              nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
        x = torch.randn(2, 3, 16, 16)
        for name in unioncam.METHODS:
            kw = {{"config": "fast", "groups": 2}} if name == "unioncam" else (
                {{"groups": 2}} if name == "groupcam" else {{}})
            with make_cam(name, model, "1", chunk_size=4, **kw) as cam:
                res = cam(x)
            assert res.maps.shape == (2, 16, 16), name
        r = metrics.insertion_deletion(model, x, res.maps, step=64)
        assert r.insertion.shape == (2,)
        loaded = [m for m in sys.modules if m.split(".")[0] in BLOCKED]
        assert not loaded, loaded
        print("ok", len(unioncam.METHODS))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    import unioncam

    # every registered method ran in the bare environment (the registry is the one list)
    assert out.stdout.strip() == f"ok {len(unioncam.METHODS)}" and len(unioncam.METHODS) >= 15


def test_one_default_everywhere():
    """`UnionCAMConfig()`, `UnionCAM(model)`, the run config and the CLI share one constant."""
    from torch import nn

    from unioncam import DEFAULT_PRESET, PRESETS, UnionCAM, UnionCAMConfig

    assert UnionCAMConfig() == PRESETS[DEFAULT_PRESET]
    assert UnionCAM(nn.Conv2d(3, 3, 1)).config == UnionCAMConfig()


def test_cli_help_and_status_start_without_torch(tmp_path):
    """`unioncam --help` and `unioncam status` must not pay for importing torch (seconds)."""
    code = textwrap.dedent(f"""
        import sys
        from pipeline import cli
        for argv in (["--help"], ["status", {str(tmp_path / "missing.zarr")!r}]):
            try:
                cli.main(argv)
            except SystemExit:
                pass
        print("torch" in sys.modules)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip().splitlines()[-1] == "False", out.stdout[-2000:] + out.stderr[-2000:]
