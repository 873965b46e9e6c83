"""Published measurements: the calibration set the efficiency factors are fitted to, a
held-out set that is never fitted, and the ratio claims raypp's TP-vs-PP advice rests on.

Each entry states its source and conditions; docs/planner.md prints both tables
(`python -m raypp.planner.calibration`).
"""
from __future__ import annotations

from dataclasses import dataclass

TRT_LLM = ("NVIDIA TensorRT-LLM, docs/source/performance.md ('Performance of TensorRT-LLM'; peak throughput "
           "tables of v0.6.1, first-token latency and L40S tables of v0.5), "
           "https://github.com/NVIDIA/TensorRT-LLM/blob/138f96d45f90b9667426f7c47297d8c06bafac73/docs/source/"
           "performance.md -- static batching (gptSessionBenchmark); 'LLaMA 7B/70B' engines built with "
           "Llama-2-7B/70B shapes; H100 and L40S with --enable_fp8 --fp8_kv_cache, A100 in FP16")
NIM = ("NVIDIA NIM LLM benchmarking guide, 'Performance', Llama-3.3-70b-instruct NIM 1.8.0 on 2 x H100 80G, "
       "fp8 TP2, https://docs.nvidia.com/nim/benchmarking/llm/1.0.0/performance -- ITL as genai-perf/AIPerf "
       "report it: (request latency - TTFT) / (output tokens - 1), so other requests' prefills count")
H200_405B = ("NVIDIA Technical Blog, 'Boosting Llama 3.1 405B Throughput by Another 1.5x on NVIDIA H200 Tensor "
             "Core GPUs and NVLink Switch' (October 2024), https://developer.nvidia.com/blog/boosting-llama-3-1-"
             "405b-throughput-by-another-1-5x-on-nvidia-h200-tensor-core-gpus-and-nvlink-switch/ -- 8 x H200 "
             "HGX (NVSwitch), TensorRT-LLM, FP8 weights and KV cache; TP8 vs PP8: PP 1.5x the maximum "
             "throughput, TP 5.6x lower minimum latency")


@dataclass(frozen=True)
class Measurement:
    key: str
    model: str
    gpu: str
    tp: int
    dtype: str
    kv_dtype: str
    # ttft_ms / itl_ms: one replica at `batch` concurrent requests (continuous batching);
    # tok_s_per_gpu: one static batch (all prompts, then all outputs), output tokens/s per GPU;
    # max_tok_s: the highest output tokens/s of the layout over any concurrency its KV cache holds.
    metric: str
    batch: int
    input_len: int
    output_len: int
    value: float
    source: str
    pp: int = 1


def _trt(key, model, gpu, tp, dtype, metric, batch, isl, osl, value):
    return Measurement(key, model, gpu, tp, dtype, dtype, metric, batch, isl, osl, value, TRT_LLM)


def _nim(key, metric, batch, isl, osl, value):
    # The KV-cache dtype is not stated; fp8 assumed (it moves ITL by <2% at concurrency 1).
    return Measurement(key, "llama-3.1-70b", "h100-sxm", 2, "fp8", "fp8", metric, batch, isl, osl, value, NIM)


# A100 rows: the doc says "A100" without the variant; DGX A100 80GB (SXM) assumed.
CALIBRATION: list[Measurement] = [
    _trt("trt-h100-7b-ttft-128", "llama-2-7b", "h100-sxm", 1, "fp8", "ttft_ms", 1, 128, 1, 7),
    _trt("trt-h100-7b-ttft-2048", "llama-2-7b", "h100-sxm", 1, "fp8", "ttft_ms", 1, 2048, 1, 36),
    _trt("trt-h100-70b-tp4-ttft-128", "llama-2-70b", "h100-sxm", 4, "fp8", "ttft_ms", 1, 128, 1, 26),
    _trt("trt-h100-70b-tp4-ttft-2048", "llama-2-70b", "h100-sxm", 4, "fp8", "ttft_ms", 1, 2048, 1, 109),
    _trt("trt-l40s-7b-ttft-128", "llama-2-7b", "l40s", 1, "fp8", "ttft_ms", 1, 128, 1, 14),
    _trt("trt-l40s-7b-ttft-2048", "llama-2-7b", "l40s", 1, "fp8", "ttft_ms", 1, 2048, 1, 73),
    _trt("trt-a100-7b-ttft-128", "llama-2-7b", "a100-sxm-80gb", 1, "fp16", "ttft_ms", 1, 128, 1, 16),
    _trt("trt-a100-7b-ttft-2048", "llama-2-7b", "a100-sxm-80gb", 1, "fp16", "ttft_ms", 1, 2048, 1, 133),
    _trt("trt-a100-70b-tp4-ttft-128", "llama-2-70b", "a100-sxm-80gb", 4, "fp16", "ttft_ms", 1, 128, 1, 47),
    _trt("trt-a100-70b-tp4-ttft-2048", "llama-2-70b", "a100-sxm-80gb", 4, "fp16", "ttft_ms", 1, 2048, 1, 377),
    _trt("trt-h100-7b-bs768-128-128", "llama-2-7b", "h100-sxm", 1, "fp8", "tok_s_per_gpu", 768, 128, 128, 19694),
    _trt("trt-h100-7b-bs112-128-2048", "llama-2-7b", "h100-sxm", 1, "fp8", "tok_s_per_gpu", 112, 128, 2048, 6818),
    _trt("trt-h100-7b-bs80-2048-128", "llama-2-7b", "h100-sxm", 1, "fp8", "tok_s_per_gpu", 80, 2048, 128, 2244),
    _trt("trt-h100-7b-bs48-2048-2048", "llama-2-7b", "h100-sxm", 1, "fp8", "tok_s_per_gpu", 48, 2048, 2048, 2740),
    _trt("trt-h100-70b-tp2-bs1024-128-128", "llama-2-70b", "h100-sxm", 2, "fp8", "tok_s_per_gpu", 1024, 128, 128, 2657),
    _trt("trt-h100-70b-tp2-bs96-2048-128", "llama-2-70b", "h100-sxm", 2, "fp8", "tok_s_per_gpu", 96, 2048, 128, 306),
    _trt("trt-a100-7b-bs384-128-128", "llama-2-7b", "a100-sxm-80gb", 1, "fp16", "tok_s_per_gpu", 384, 128, 128, 5586),
    _trt("trt-a100-7b-bs60-128-2048", "llama-2-7b", "a100-sxm-80gb", 1, "fp16", "tok_s_per_gpu", 60, 128, 2048, 1928),
    _trt("trt-a100-7b-bs52-2048-128", "llama-2-7b", "a100-sxm-80gb", 1, "fp16", "tok_s_per_gpu", 52, 2048, 128, 591),
    _nim("nim-h100-70b-tp2-itl-5000-500", "itl_ms", 1, 5000, 500, 18.58),
    _nim("nim-h100-70b-tp2-itl-500-2000", "itl_ms", 1, 500, 2000, 18.91),
    _nim("nim-h100-70b-tp2-ttft-5000", "ttft_ms", 1, 5000, 500, 406.77),
    _nim("nim-h100-70b-tp2-ttft-500", "ttft_ms", 1, 500, 2000, 47.77),
]

# Never fitted: other rows of the same sources (other GPUs, batch sizes, concurrencies) and
# a source of its own (the 405B post).  The planner must predict them from the fit above.
HELD_OUT: list[Measurement] = [
    _trt("trt-l40s-7b-bs64-128-128", "llama-2-7b", "l40s", 1, "fp8", "tok_s_per_gpu", 64, 128, 128, 3240),
    _trt("trt-l40s-7b-bs64-128-2048", "llama-2-7b", "l40s", 1, "fp8", "tok_s_per_gpu", 64, 128, 2048, 1622),
    _trt("trt-l40s-7b-bs32-2048-128", "llama-2-7b", "l40s", 1, "fp8", "tok_s_per_gpu", 32, 2048, 128, 581),
    _trt("trt-l40s-7b-bs16-2048-2048", "llama-2-7b", "l40s", 1, "fp8", "tok_s_per_gpu", 16, 2048, 2048, 531),
    _trt("trt-a100-7b-tp2-bs64-2048-2048", "llama-2-7b", "a100-sxm-80gb", 2, "fp16", "tok_s_per_gpu", 64, 2048,
         2048, 782),
    _trt("trt-a100-70b-tp4-bs1280-128-128", "llama-2-70b", "a100-sxm-80gb", 4, "fp16", "tok_s_per_gpu", 1280, 128,
         128, 670),
    _trt("trt-a100-70b-tp4-bs120-2048-128", "llama-2-70b", "a100-sxm-80gb", 4, "fp16", "tok_s_per_gpu", 120, 2048,
         128, 79),
    _nim("nim-h100-70b-tp2-c5-itl-5000-500", "itl_ms", 5, 5000, 500, 21.83),
    _nim("nim-h100-70b-tp2-c25-itl-5000-500", "itl_ms", 25, 5000, 500, 38.75),
    _nim("nim-h100-70b-tp2-c50-itl-5000-500", "itl_ms", 50, 5000, 500, 59.73),
    _nim("nim-h100-70b-tp2-c5-ttft-5000-500", "ttft_ms", 5, 5000, 500, 546.7),
    # The post's table gives output tokens/s of the whole node; ISL/OSL are those of the same
    # team's earlier 405B post (2,048 / 128, where it reported 463 tok/s for TP8 FP8).
    Measurement("h200-405b-tp8-max-throughput", "llama-3.1-405b", "h200", 8, "fp8", "fp8", "max_tok_s", 0,
                2048, 128, 506, H200_405B),
    Measurement("h200-405b-pp8-max-throughput", "llama-3.1-405b", "h200", 1, "fp8", "fp8", "max_tok_s", 0,
                2048, 128, 764, H200_405B, pp=8),
]

# Left out of both, with the reason (docs/planner.md lists them): the two decode-heavy
# Llama-2-70B rows of the TensorRT-LLM table (H100 FP8: TP4 batch 480 128/2048 -> 1,486 and
# TP2 batch 64 2048/2048 -> 547 tok/s/GPU), predicted ~2.1x too fast.  v0.6.1 predates
# TensorRT-LLM's GQA generation kernel ("H200 is now 2.4x faster on Llama-70B with recent
# improvements to TensorRT-LLM GQA", its README, Dec 2023): the older kernel re-read the KV
# cache per query head, which this model does not describe.
LEFT_OUT: list[Measurement] = [
    _trt("trt-h100-70b-tp4-bs480-128-2048", "llama-2-70b", "h100-sxm", 4, "fp8", "tok_s_per_gpu", 480, 128, 2048, 1486),
    _trt("trt-h100-70b-tp2-bs64-2048-2048", "llama-2-70b", "h100-sxm", 2, "fp8", "tok_s_per_gpu", 64, 2048, 2048, 547),
]


@dataclass(frozen=True)
class Claim:
    """`measured` = metric(first) / metric(second), both held-out measurements."""
    key: str
    first: str
    second: str
    metric: str        # "max_tok_s" (throughput ratio) or "min_itl" (ITL at concurrency 1, ratio)
    measured: float
    source: str


CLAIMS: list[Claim] = [
    Claim("405b-h200-pp8-throughput-over-tp8", "h200-405b-pp8-max-throughput", "h200-405b-tp8-max-throughput",
          "max_tok_s", 1.5, H200_405B),
    Claim("405b-h200-pp8-latency-over-tp8", "h200-405b-pp8-max-throughput", "h200-405b-tp8-max-throughput",
          "min_itl", 5.6, H200_405B),
]
