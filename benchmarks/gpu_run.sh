#!/usr/bin/env bash
# The GPU checks in one call: the kernel and CUDA-path tests; FlashInfer's tests when its
# wheels were carried in .whl/; then the decode benchmark (attention on each backend, the
# model's decode eager and as CUDA graphs with a per-kernel profile of each batch-1 replay,
# the bf16 graph-vs-eager check, the engine's StageWorker with graphs off and on).
#   OUT=/some/dir bash benchmarks/gpu_run.sh
#   BENCH_ARGS="--skip-kernels --no-tune --batches 1" OUT=/some/dir bash benchmarks/gpu_run.sh
#   DRY_RUN=1 OUT=/tmp/dry bash benchmarks/gpu_run.sh   # CPU: the same script, tiny shapes
# FlashInfer for the GPU machine's Python 3.12, fetched where pip works (not in the repo):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 -d .whl flashinfer-python==0.5.3 apache-tvm-ffi==0.1.15.post2
# Uses the machine's own python3 (torch, triton, transformers, safetensors, tokenizers, ninja,
# nvcc and pytest preinstalled); raypp runs from the checkout, not installed.  Each phase has
# its own time limit, and the benchmark rewrites its JSON after every phase, so a slow phase
# costs only itself.  Writes under $OUT: env.txt, gpu_tests.log, gpu_tests.xml,
# flashinfer_tests.log, gpu_decode.log, gpu_decode.json.
set -u
OUT=${OUT:-/tmp/gpu_out}
DRY_RUN=${DRY_RUN:-0}
TESTS=${TESTS:-"tests/test_kernels.py tests/test_gpu.py"}
read -r -a BENCH <<< "${BENCH_ARGS:-}"
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv 2>&1 || echo "no nvidia-smi"
  python3 -c 'import sys, torch, triton, transformers; print(sys.version.split()[0], "torch", torch.__version__,
"triton", triton.__version__, "transformers", transformers.__version__,
torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device")'
  python3 -c 'import triton.language as tl; print("triton gdc_wait:", hasattr(tl.extra.cuda, "gdc_wait"))'
  echo "nvcc: $(command -v nvcc || echo none)"
} 2>&1 | tee "$OUT/env.txt"

timeout 150 python3 -m pytest -q -rA -s -p no:cacheprovider $TESTS \
  --junitxml="$OUT/gpu_tests.xml" 2>&1 | tee "$OUT/gpu_tests.log" | grep -E "passed|failed|error|prompt|FAIL|Error" | tail -40
echo "tests exit: ${PIPESTATUS[0]}"

if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PWD:/tmp/site
  # FlashInfer compiles its kernels with nvcc on first use (cached under ~/.cache/flashinfer).
  export FLASHINFER_CUDA_ARCH_LIST=${FLASHINFER_CUDA_ARCH_LIST:-9.0a} MAX_JOBS=${MAX_JOBS:-16}
  python3 -c 'import flashinfer; print("flashinfer", flashinfer.__version__)' 2>&1 | tail -3 | tee -a "$OUT/env.txt"
  timeout 240 python3 -m pytest -q -rA -s -p no:cacheprovider tests/test_gpu.py -k flashinfer 2>&1 \
    | tee "$OUT/flashinfer_tests.log" | grep -E "passed|failed|error|FAIL|Error" | tail -20
  echo "flashinfer tests exit: ${PIPESTATUS[0]}"
fi

[ "$DRY_RUN" = 1 ] && BENCH+=(--dry-run)
timeout 300 python3 benchmarks/gpu_decode.py "${BENCH[@]}" --out "$OUT/gpu_decode.json" 2>&1 \
  | tee "$OUT/gpu_decode.log" | tail -80
echo "benchmark exit: ${PIPESTATUS[0]}"
