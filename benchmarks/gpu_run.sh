#!/usr/bin/env bash
# The GPU checks in one call: the kernel and CUDA-path tests, then the decode benchmark (kernels,
# the fused batch-1 products tuned, the model's decode eager and as CUDA graphs with a per-kernel
# profile of each batch-1 replay, the bf16 graph-vs-eager check, the engine's StageWorker with
# graphs off and on).
#   OUT=/some/dir bash benchmarks/gpu_run.sh
#   DRY_RUN=1 OUT=/tmp/dry bash benchmarks/gpu_run.sh   # CPU: the same script, tiny shapes
# Uses the machine's own python3 (torch, triton, transformers, safetensors, tokenizers and
# pytest preinstalled); raypp runs from the checkout, not installed.  Each phase has its own
# time limit, and the benchmark rewrites its JSON after every phase, so a slow phase costs
# only itself.  Writes under $OUT: env.txt, gpu_tests.log, gpu_tests.xml, gpu_decode.log,
# gpu_decode.json.
set -u
OUT=${OUT:-/tmp/gpu_out}
DRY_RUN=${DRY_RUN:-0}
TESTS=${TESTS:-"tests/test_kernels.py tests/test_gpu.py"}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv 2>&1 || echo "no nvidia-smi"
  python3 -c 'import sys, torch, triton, transformers; print(sys.version.split()[0], "torch", torch.__version__,
"triton", triton.__version__, "transformers", transformers.__version__,
torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device")'
  python3 -c 'import flashinfer' 2>/dev/null && echo "flashinfer: installed" || echo "flashinfer: not installed"
  python3 -c 'import triton.language as tl; print("triton gdc_wait:", hasattr(tl.extra.cuda, "gdc_wait"))'
} 2>&1 | tee "$OUT/env.txt"

timeout 150 python3 -m pytest -q -rA -s -p no:cacheprovider $TESTS \
  --junitxml="$OUT/gpu_tests.xml" 2>&1 | tee "$OUT/gpu_tests.log" | grep -E "passed|failed|error|prompt|FAIL|Error" | tail -40
echo "tests exit: ${PIPESTATUS[0]}"

BENCH_ARGS=()
[ "$DRY_RUN" = 1 ] && BENCH_ARGS+=(--dry-run)
timeout 260 python3 benchmarks/gpu_decode.py "${BENCH_ARGS[@]}" --out "$OUT/gpu_decode.json" 2>&1 \
  | tee "$OUT/gpu_decode.log" | tail -80
echo "benchmark exit: ${PIPESTATUS[0]}"
