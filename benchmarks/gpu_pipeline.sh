#!/usr/bin/env bash
# The pipeline on one GPU, end to end (issue 14): benchmarks/gpu_pipeline.py for the
# default preset, `paper` and Grad-CAM, fp32 and bf16, on >= 2,000 real JPEGs, with the
# library alone in the same run, after the CUDA tests; inside 9 minutes (BUDGET_S) on an H100/H200.
#
#   bash benchmarks/gpu_pipeline.sh --cpu [--out DIR]   # smoke mode, no GPU (the test suite runs this)
#   bash benchmarks/gpu_pipeline.sh prepare             # here: wheels the device lacks -> .whl/
#   bash benchmarks/gpu_pipeline.sh [--out DIR]         # on the GPU machine
#
# The device image (benchmarks/gpu_image_packages.txt) has torch, torchvision, pyarrow,
# fsspec, xarray and tqdm but not Ray or Zarr; `prepare` downloads them (and what they need
# that the image lacks) for its Python 3.12 into .whl/, slims Ray's wheel (no ray/jars/, no
# *.js.map: 79 MB -> 45 MB, RECORD regenerated) and checks the closure and the total
# (benchmarks/gpu_carry.py check: refuses above 60 MiB of the 64 a command may carry). Then:
#   run(command="bash benchmarks/gpu_pipeline.sh", carry=[".whl"], timeout_s=570)
# The CUDA tests that need the packaged EfficientNet-Lite0 (17 MB of weights) do not fit
# beside Ray: they are deselected here with a line saying so (benchmarks/gpu_check.sh runs
# them with its own carry).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHL=.whl
# numcodecs 0.17 (1.4 MB, Python >= 3.12) instead of 0.16 (9.3 MB): same blosc/zstd codecs.
DEPS="ray==2.60.0 zarr==3.1.6 numcodecs==0.17.1 donfig==0.8.1.post1 google-crc32c==1.9.0 jsonschema==4.26.0 referencing==0.37.0 rpds-py==0.30.0 jsonschema-specifications==2025.9.1"

if [[ "${1:-}" == "prepare" ]]; then
    set -e
    mkdir -p "$WHL"
    # One version of each: stale wheels of other versions would stop the install there.
    rm -f "$WHL"/*.whl
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform any -d "$WHL" $DEPS
    "$PY" benchmarks/gpu_carry.py slim "$WHL"/ray-*.whl
    exec "$PY" benchmarks/gpu_carry.py check "$WHL"
fi

# The device command: at most 8 files under $OUT (it writes 5), the most important first, each
# as soon as its numbers exist: gpu.txt (GPU, driver, torch, the install), cuda_tests.log,
# gpu_pipeline.json/.md (rewritten after every measurement), gpu_pipeline.log (all output).
# The whole command stays inside 9 minutes (BUDGET_S, default 540) so that a time limit of 570 s
# still returns everything; a step that would not fit is skipped and named.
T0=$SECONDS
OUTDIR=${OUT:-benchmarks/out/gpu_pipeline}
CPU=0; for a in "$@"; do [[ "$a" == "--cpu" ]] && CPU=1; done
# The smoke mode on a loaded CPU may take longer than the GPU check: no budget there.
BUDGET_S=${BUDGET_S:-$(( CPU ? 36000 : 540 ))}
for ((i = 1; i <= $#; i++)); do [[ "${!i}" == "--out" ]] && { j=$((i + 1)); OUTDIR=${!j}; }; done
mkdir -p "$OUTDIR"
info() { echo "$*" | tee -a "$OUTDIR/gpu.txt"; }
: > "$OUTDIR/gpu.txt"
info "gpu_pipeline.sh $(date -u +%FT%TZ) on $(hostname)"
if command -v nvidia-smi >/dev/null; then
    info "$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1)"
else
    info "no nvidia-smi on this machine"
fi
if [[ -d "$WHL" ]] && ! "$PY" -c "import ray, zarr" 2>/dev/null; then
    t=$SECONDS
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/gp_site "$WHL"/*.whl 2>&1 | tail -3 | tee -a "$OUTDIR/gpu.txt"
    [[ ${PIPESTATUS[0]} -eq 0 ]] || { info "wheel install failed"; exit 3; }
    export PYTHONPATH="/tmp/gp_site${PYTHONPATH:+:$PYTHONPATH}"
    info "installed $(ls "$WHL" | wc -l) wheels from $WHL in $((SECONDS - t)) s"
fi
export PYTHONPATH="$PWD:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 RAY_AUTH_MODE=disabled
info "$("$PY" -c "import sys, torch, torchvision, ray, zarr; print('Python', sys.version.split()[0], \
'torch', torch.__version__, 'torchvision', torchvision.__version__, 'ray', ray.__version__, \
'zarr', zarr.__version__, 'CUDA', torch.cuda.is_available() and torch.cuda.get_device_name(0))" 2>&1)"
if [[ $CPU -eq 0 ]] && ! "$PY" -c "import torch; assert torch.cuda.is_available()" 2>/dev/null; then
    info "no CUDA GPU visible to torch (use --cpu for the smoke mode)"; exit 2
fi

# The CUDA tests (skipped cleanly on a CPU machine; capped at 150 s).
files=$(grep -l "mark.cuda" tests/test_*.py)
timeout 150 "$PY" -m pytest -q -rs -m cuda -p no:cacheprovider -p gpu_pytest $files \
    > "$OUTDIR/cuda_tests.log" 2>&1
rc_tests=$?
info "cuda tests exit code $rc_tests (124 = timed out): $(tail -1 "$OUTDIR/cuda_tests.log")"

left=$((BUDGET_S - (SECONDS - T0)))
timeout $((left + 20)) "$PY" benchmarks/gpu_pipeline.py --out "$OUTDIR" --budget-s "$left" "$@" \
    2>&1 | tee "$OUTDIR/gpu_pipeline.log"
rc=${PIPESTATUS[0]}
info "gpu_pipeline.py exit code $rc; $((SECONDS - T0)) s in all"
exit $(( rc != 0 ? rc : rc_tests ))
