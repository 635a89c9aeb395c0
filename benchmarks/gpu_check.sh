#!/usr/bin/env bash
# The first run on a GPU, in one command and about 10 minutes on one H100/H200: builds fastkd for this GPU, runs the
# kernel tests on CUDA tensors, compute-sanitizer (memcheck, racecheck, synccheck, initcheck) on the small case of
# every op (benchmarks/gpu_cases.py: every CUDA and Triton kernel, forward and backward), and the quick benchmark
# sweep; everything it prints goes into one folder.
#
#   bash benchmarks/gpu_check.sh [OUT]      (default OUT: benchmarks/results/<gpu>-check)
#
# Needs a python with a CUDA torch and triton, nvcc (CUDA_HOME or PATH), and compute-sanitizer beside nvcc or on
# PATH; it installs fastkd into that python (pip install --no-build-isolation, against the torch there) and
# pytest/pytest-xdist/numpy/matplotlib if missing. Each step has a time limit (STEP_SECONDS, default 240) and
# its own log; summary.txt lists every step with its exit status and seconds. Exit status: 1 if any step failed.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python}
STEP_SECONDS=${STEP_SECONDS:-240}

GPU=$("$PYTHON" -c "import torch; print(torch.cuda.get_device_name(0))" 2>/dev/null) || {
    echo "[gpu-check] FAIL: no GPU visible to torch ($PYTHON)"
    exit 1
}
SLUG=$(echo "$GPU" | tr '[:upper:]' '[:lower:]' | tr -cs 'a-z0-9' '-' | sed 's/^-//; s/-$//')
OUT=${1:-benchmarks/results/$SLUG-check}
mkdir -p "$OUT"
SUMMARY=$OUT/summary.txt
: > "$SUMMARY"
FAILED=0

# step NAME COMMAND...: runs COMMAND with the time limit, its output in $OUT/NAME.log
step() {
    local name=$1
    shift
    local start=$SECONDS
    timeout "$STEP_SECONDS" "$@" > "$OUT/$name.log" 2>&1
    local status=$?
    [ "$status" -ne 0 ] && FAILED=1
    printf '%-28s exit %3d  %4ds\n' "$name" "$status" $((SECONDS - start)) | tee -a "$SUMMARY"
}

{
    echo "gpu: $GPU"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
    "$PYTHON" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'capability', torch.cuda.get_device_capability(0), 'triton', triton.__version__)"
    git rev-parse HEAD 2>/dev/null
} > "$OUT/environment.txt" 2>&1

ARCH=$("$PYTHON" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability(0))")
SANITIZER=$(command -v compute-sanitizer || true)
for candidate in "${CUDA_HOME:-}/bin/compute-sanitizer" /usr/local/cuda/bin/compute-sanitizer \
                 /usr/local/cuda-*/bin/compute-sanitizer; do
    [ -z "$SANITIZER" ] && [ -x "$candidate" ] && SANITIZER=$candidate
done

step dependencies "$PYTHON" -m pip install pytest pytest-xdist numpy matplotlib
# only this GPU's architecture, so the build takes a minute or two
step build env TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS="$(nproc)" "$PYTHON" -m pip install --no-build-isolation -v .
# outside the repository, so that the tests import what pip built
step kernel-tests bash -c "cd tests && $PYTHON -m pytest -n 8 -q -p no:cacheprovider --rootdir=. \
    test_affinity_full.py test_affinity_window.py test_consistency.py test_pixel_losses.py test_backends.py \
    test_build.py -k 'cuda or triton'"
for tool in memcheck racecheck synccheck initcheck; do
    if [ -n "$SANITIZER" ]; then
        step "sanitizer-$tool" "$SANITIZER" --tool "$tool" --error-exitcode 1 \
            "$PYTHON" benchmarks/gpu_cases.py
    else
        echo "sanitizer-$tool: compute-sanitizer not found (CUDA_HOME, PATH, /usr/local/cuda*)" | tee -a "$SUMMARY"
        FAILED=1
    fi
done
step quick-sweep "$PYTHON" benchmarks/run.py --quick --device cuda --out "$OUT/quick-sweep"

echo "[gpu-check] $( [ "$FAILED" -eq 0 ] && echo ok || echo FAILED ): $OUT (summary.txt, one log per step)"
exit "$FAILED"
