#!/usr/bin/env bash
# On a machine with a CUDA GPU, and with torch, triton and the test dependencies installed:
# build biasmap._C with the CUDA kernels in place, run the whole test suite (the CUDA and
# compiled-Triton cases included), then the op benchmarks. Logs go to OUTDIR (default
# build/gpu_check); benchmark results go to bench/results/ as usual.
#
#   scripts/gpu_check.sh [OUTDIR] [STEPS]
#
# STEPS: comma list of build, tests, bench (default all three); PYTEST_ARGS and BENCH_ARGS
# are passed on to pytest and bench/bench_ops.py. Without "build", the
# library already in biasmap/ is used. Each step runs under its own time limit, so that a
# hung step leaves the others' results. BIASMAP_CUDA_ARCHS defaults to this GPU's arch.
set -uo pipefail
cd "$(dirname "$0")/.."
OUTDIR=${1:-build/gpu_check}
STEPS=${2:-build,tests,bench}
PY=${PYTHON:-python3}
mkdir -p "$OUTDIR"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

has_step() { [[ ",$STEPS," == *",$1,"* ]]; }

# The distribution's compiler, not a toolchain the image may put in CXX: on the workplace's GPU
# image CXX is /opt/gcc/bin/g++, and a library built with it segfaults at the first C++
# exception (every TORCH_CHECK) under that image's libstdc++. GPU_CHECK_CXX overrides.
if [[ -x /usr/bin/g++ ]]; then
  export CC=${GPU_CHECK_CC:-/usr/bin/gcc} CXX=${GPU_CHECK_CXX:-/usr/bin/g++}
fi

{
  echo "CXX=${CXX:-c++}: $(${CXX:-c++} --version | head -1)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  nvcc --version | tail -1
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} 2>&1 | tee -a "$OUTDIR/env.txt"

if has_step build; then
  arch=$("$PY" -c "import torch; print('%d%d' % torch.cuda.get_device_capability())")
  start=$SECONDS
  FORCE_CUDA=1 BIASMAP_CUDA_ARCHS=${BIASMAP_CUDA_ARCHS:-$arch} MAX_JOBS=${MAX_JOBS:-$(nproc)} \
    timeout 420 "$PY" setup.py build_ext --inplace >"$OUTDIR/build.log" 2>&1
  echo "build rc=$? in $((SECONDS - start)) s" | tee -a "$OUTDIR/env.txt"
fi

"$PY" -m biasmap.info 2>&1 | tee -a "$OUTDIR/env.txt"

if has_step tests; then
  start=$SECONDS
  # With pytest-xdist, 8 workers share the GPU (the suite needs a few GB at most).
  xdist=$("$PY" -c "import xdist" 2>/dev/null && echo "-n 8")
  timeout "${TEST_TIMEOUT:-540}" "$PY" -m pytest -q $xdist -p no:cacheprovider ${PYTEST_ARGS:-} \
    >"$OUTDIR/pytest.log" 2>&1
  echo "tests rc=$? in $((SECONDS - start)) s" | tee -a "$OUTDIR/env.txt"
  tail -40 "$OUTDIR/pytest.log"
fi

if has_step bench; then
  start=$SECONDS
  timeout "${BENCH_TIMEOUT:-420}" "$PY" bench/bench_ops.py ${BENCH_ARGS:-} >"$OUTDIR/bench_ops.log" 2>&1
  echo "bench_ops rc=$? in $((SECONDS - start)) s" | tee -a "$OUTDIR/env.txt"
  cp bench/results/bench_ops_*.md bench/results/bench_ops.csv "$OUTDIR/" 2>/dev/null
fi
