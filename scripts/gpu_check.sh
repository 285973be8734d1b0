#!/usr/bin/env bash
# On a machine with a CUDA GPU, and with torch, triton and the test dependencies installed:
# build biasmap._C with the CUDA kernels in place, run the CUDA and Triton tests (and the
# guided step's sync and compile tests), then the benchmarks: bench_ops, bench_guided (eager,
# compiled, CUDA-graphed) and the batched audit throughput. Designed to fit 10 minutes of
# device time (each step has its own limit; the sum of the defaults is 580 s). Logs go to
# OUTDIR (default build/gpu_check); every figure goes to bench/results/, each file naming the
# GPU, and env.txt records the GPU, driver and versions.
#
#   scripts/gpu_check.sh [OUTDIR] [STEPS]
#   DRY_RUN=1 scripts/gpu_check.sh       # print the commands without running them
#
# STEPS: comma list of build, tests, bench, guided, compiled, audit (default all); PYTEST_ARGS
# and BENCH_ARGS are passed on to pytest and bench/bench_ops.py. Limits (s): BUILD_TIMEOUT 120,
# TEST_TIMEOUT 100, BENCH_TIMEOUT 70, GUIDED_TIMEOUT 60, COMPILED_TIMEOUT 140, AUDIT_TIMEOUT 90.
# The eager and compiled guided benchmarks are separate runs, so that a compile that outlasts
# its limit still leaves the eager figures (each run measures plain and guided again, so its
# ratios come from one run). Without "build", the
# library already in biasmap/ is used. Each step runs under its own time limit, so that a
# hung step leaves the others' results. BIASMAP_CUDA_ARCHS defaults to this GPU's arch.
set -uo pipefail
cd "$(dirname "$0")/.."
OUTDIR=${1:-build/gpu_check}
STEPS=${2:-build,tests,bench,guided,compiled,audit}
PY=${PYTHON:-python3}
mkdir -p "$OUTDIR"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

has_step() { [[ ",$STEPS," == *",$1,"* ]]; }
# run NAME LIMIT CMD...: CMD under `timeout LIMIT`, output to OUTDIR/NAME.log, rc and time to env.txt
run() {
  local name=$1 limit=$2
  shift 2
  if [[ -n "${DRY_RUN:-}" ]]; then
    echo "[dry-run] timeout $limit $* > $OUTDIR/$name.log"
    return 0
  fi
  local start=$SECONDS
  timeout "$limit" "$@" >"$OUTDIR/$name.log" 2>&1
  echo "$name rc=$? in $((SECONDS - start)) s (limit $limit s)" | tee -a "$OUTDIR/env.txt"
}

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
  "$PY" -c "import torch, triton, diffusers, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)"
} 2>&1 | tee -a "$OUTDIR/env.txt"

if has_step build; then
  arch=$("$PY" -c "import torch; print('%d%d' % torch.cuda.get_device_capability())" 2>/dev/null || echo 90)
  FORCE_CUDA=1 BIASMAP_CUDA_ARCHS=${BIASMAP_CUDA_ARCHS:-$arch} MAX_JOBS=${MAX_JOBS:-$(nproc)} \
    run build "${BUILD_TIMEOUT:-120}" "$PY" setup.py build_ext --inplace
fi

[[ -z "${DRY_RUN:-}" ]] && "$PY" -m biasmap.info 2>&1 | tee -a "$OUTDIR/env.txt"

if has_step tests; then
  # The GPU-specific tests only: the CUDA and Triton kernels, the CUDA compile checks, and
  # the guided step's no-sync (set_sync_debug_mode) and compile tests. The CPU suite runs in CI.
  xdist=$("$PY" -c "import xdist" 2>/dev/null && echo "-n 4")
  run pytest "${TEST_TIMEOUT:-100}" "$PY" -m pytest -q $xdist -p no:cacheprovider \
    tests/test_cuda_ops.py tests/test_triton_ops.py tests/test_cuda_compile.py \
    tests/test_step_sync.py tests/test_compiled_step.py ${PYTEST_ARGS:-}
  [[ -z "${DRY_RUN:-}" ]] && tail -15 "$OUTDIR/pytest.log"
fi

if has_step bench; then
  run bench_ops "${BENCH_TIMEOUT:-70}" "$PY" bench/bench_ops.py ${BENCH_ARGS:-}
fi

if has_step guided; then
  run bench_guided "${GUIDED_TIMEOUT:-60}" "$PY" bench/bench_guided.py --cases sd15-gpu \
    --providers diffusers,plain,plain+maps,guided,guided:batched
  [[ -z "${DRY_RUN:-}" ]] && grep guided_step "$OUTDIR/bench_guided.log" | tail -12
fi

if has_step compiled; then
  # Compiled ("default") and CUDA-graphed ("reduce-overhead"); compile times are own rows.
  run bench_guided_compiled "${COMPILED_TIMEOUT:-140}" "$PY" bench/bench_guided.py \
    --cases sd15-gpu --compile --providers plain:compiled,guided:compiled,plain:graphed,guided:graphed
  [[ -z "${DRY_RUN:-}" ]] && grep -E "guided_step|compile" "$OUTDIR/bench_guided_compiled.log" | tail -14
fi

if has_step audit; then
  run bench_audit "${AUDIT_TIMEOUT:-90}" "$PY" bench/bench_audit.py --cases gpu-batch --batches 1,8,16
  [[ -z "${DRY_RUN:-}" ]] && tail -20 "$OUTDIR/bench_audit.log"
fi

if [[ -z "${DRY_RUN:-}" ]]; then
  # Keep the logs' tables next to the results: bench_guided prints its table to the log.
  gpu=$("$PY" -c "import torch; print(torch.cuda.get_device_name().lower().replace(' ', '-'))")
  cp "$OUTDIR/bench_guided.log" "bench/results/bench_guided_${gpu}.log" 2>/dev/null
  cp "$OUTDIR/bench_guided_compiled.log" "bench/results/bench_guided_compiled_${gpu}.log" 2>/dev/null
  cp "$OUTDIR/env.txt" "bench/results/gpu_check_env_${gpu}.txt" 2>/dev/null
  cp bench/results/bench_ops_*.md bench/results/bench_ops.csv "$OUTDIR/" 2>/dev/null
fi
