#!/usr/bin/env bash
# The GPU checks in one call: the kernel and CUDA-path tests, then the decode benchmark (kernels,
# the model's decode eager and as CUDA graphs, the engine's StageWorker with graphs off and on).
#   OUT=/some/dir bash benchmarks/gpu_run.sh
# Uses the machine's own python3 (torch, triton, transformers, safetensors, tokenizers and
# pytest preinstalled); raypp runs from the checkout, not installed.  Writes under $OUT:
# env.txt, gpu_tests.log, gpu_tests.xml, gpu_decode.log, gpu_decode.json.
set -u
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
  python3 -c 'import sys, torch, triton, transformers; print(sys.version.split()[0], "torch", torch.__version__,
"triton", triton.__version__, "transformers", transformers.__version__, torch.cuda.get_device_name())'
  python3 -c 'import flashinfer' 2>/dev/null && echo "flashinfer: installed" || echo "flashinfer: not installed"
} 2>&1 | tee "$OUT/env.txt"

timeout 150 python3 -m pytest -q -rA -s -p no:cacheprovider tests/test_kernels.py tests/test_gpu.py \
  --junitxml="$OUT/gpu_tests.xml" 2>&1 | tee "$OUT/gpu_tests.log" | grep -E "passed|failed|error|prompt|FAIL|Error" | tail -40
echo "tests exit: ${PIPESTATUS[0]}"

timeout 200 python3 benchmarks/gpu_decode.py --out "$OUT/gpu_decode.json" 2>&1 | tee "$OUT/gpu_decode.log" | tail -30
echo "benchmark exit: ${PIPESTATUS[0]}"
