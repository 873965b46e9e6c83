"""Every metric raypp exports, defined once: name, type, help, labels, buckets.

Names follow vLLM's where vLLM has the same quantity (`vllm:x` becomes `raypp_x`),
so a vLLM dashboard's queries carry over by a rename.  The pipeline's own metrics
(per-stage busy and bubble time, bubble ratio, step time, micro-batches in flight)
have no counterpart elsewhere.

They are exported through `ray.util.metrics` (raypp/serve/metrics_publisher.py):
every node's Ray metrics agent serves them with Ray's own, so one Prometheus scrape
configuration (Ray's service discovery file, or KubeRay's PodMonitor) covers every
node and replica.  Ray prefixes user metrics with `ray_`: Prometheus, the dashboard
and the alerts see `Metric.exported`, e.g. `ray_raypp_num_requests_running`.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

RAY_EXPORT_PREFIX = "ray_"

# Every series carries these; the stage metrics add the stage and the TP rank that reports for it.
ENGINE_LABELS = ("model", "replica")
STAGE_LABELS = (*ENGINE_LABELS, "stage", "tp_rank")
FINISH_LABELS = (*ENGINE_LABELS, "finished_reason")

# vLLM's request-latency buckets (seconds), trimmed at 2 minutes.
_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                    10.0, 20.0, 40.0, 80.0, 120.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2,
                0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0)
_STEP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12)


class Kind(enum.Enum):
    COUNTER = "counter"
    GAUGE = "gauge"
    HISTOGRAM = "histogram"


@dataclass(frozen=True)
class Metric:
    name: str
    kind: Kind
    help: str
    labels: tuple[str, ...] = ENGINE_LABELS
    buckets: tuple[float, ...] = ()

    @property
    def exported(self) -> str:
        """The name Prometheus stores (Ray's exporter adds its prefix)."""
        return RAY_EXPORT_PREFIX + self.name

    @property
    def sample(self) -> str:
        """A series that exists once the metric has been recorded (a histogram's `_count`)."""
        return self.exported + ("_count" if self.kind is Kind.HISTOGRAM else "")


# ---- requests and KV cache (vLLM's names) ------------------------------------------------
NUM_REQUESTS_RUNNING = Metric("raypp_num_requests_running", Kind.GAUGE, "Requests in the running batch.")
NUM_REQUESTS_WAITING = Metric("raypp_num_requests_waiting", Kind.GAUGE, "Requests waiting to be scheduled.")
KV_CACHE_USAGE = Metric("raypp_kv_cache_usage_perc", Kind.GAUGE, "Fraction of KV-cache blocks in use (0..1).")
NUM_PREEMPTIONS = Metric("raypp_num_preemptions_total", Kind.COUNTER,
                         "Sequences preempted (KV cache full) and recomputed later.")
PROMPT_TOKENS = Metric("raypp_prompt_tokens_total", Kind.COUNTER, "Prompt tokens of admitted requests.")
GENERATION_TOKENS = Metric("raypp_generation_tokens_total", Kind.COUNTER, "Tokens generated.")
REQUEST_SUCCESS = Metric("raypp_request_success_total", Kind.COUNTER, "Requests finished, by finish reason.",
                         FINISH_LABELS)
TIME_TO_FIRST_TOKEN = Metric("raypp_time_to_first_token_seconds", Kind.HISTOGRAM,
                             "Arrival at the engine to the first generated token.", buckets=_LATENCY_BUCKETS)
INTER_TOKEN_LATENCY = Metric("raypp_inter_token_latency_seconds", Kind.HISTOGRAM,
                             "Time between consecutive generated tokens of one request.", buckets=_ITL_BUCKETS)
E2E_REQUEST_LATENCY = Metric("raypp_e2e_request_latency_seconds", Kind.HISTOGRAM,
                             "Arrival at the engine to the last token.", buckets=_LATENCY_BUCKETS)
REQUEST_QUEUE_TIME = Metric("raypp_request_queue_time_seconds", Kind.HISTOGRAM,
                            "Time in the waiting queue before first scheduled (resolution: one step).",
                            buckets=_LATENCY_BUCKETS)

# ---- the pipeline ----------------------------------------------------------------------
MICRO_BATCHES_IN_FLIGHT = Metric("raypp_micro_batches_in_flight", Kind.GAUGE,
                                 "Micro-batches submitted to the pipeline and not yet returned.")
STEP_TIME = Metric("raypp_step_time_seconds", Kind.HISTOGRAM,
                   "One micro-batch through every stage: submission to sampled tokens back.",
                   buckets=_STEP_BUCKETS)
STAGE_STEPS = Metric("raypp_stage_steps_total", Kind.COUNTER, "Steps a stage ran.", STAGE_LABELS)
STAGE_BUSY = Metric("raypp_stage_busy_seconds_total", Kind.COUNTER,
                    "Stage time computing and communicating (prep + compute + TP all-reduce + sends).",
                    STAGE_LABELS)
STAGE_BUBBLE = Metric("raypp_stage_bubble_seconds_total", Kind.COUNTER,
                      "Stage time idle: nothing scheduled, or waiting for the previous stage "
                      "(stage 0: for the last stage's sampled ids). Idle time with no request at all "
                      "is not counted.", STAGE_LABELS)
STAGE_BUBBLE_RATIO = Metric("raypp_stage_bubble_ratio", Kind.GAUGE,
                            "bubble / (busy + bubble) of a stage over the last 30 s.", STAGE_LABELS)
PIPELINE_REBUILDS = Metric("raypp_pipeline_rebuilds", Kind.GAUGE,
                           "Pipeline rebuilds after worker failures since the replica started.")
DRIVER_BUSY = Metric("raypp_driver_busy_seconds_total", Kind.COUNTER,
                     "Driver time forming and sending steps and applying their tokens (off the pipeline's "
                     "critical path, but CPU taken from the workers on small hosts).")

ALL: tuple[Metric, ...] = (
    NUM_REQUESTS_RUNNING, NUM_REQUESTS_WAITING, KV_CACHE_USAGE, NUM_PREEMPTIONS, PROMPT_TOKENS,
    GENERATION_TOKENS, REQUEST_SUCCESS, TIME_TO_FIRST_TOKEN, INTER_TOKEN_LATENCY, E2E_REQUEST_LATENCY,
    REQUEST_QUEUE_TIME, MICRO_BATCHES_IN_FLIGHT, STEP_TIME, STAGE_STEPS, STAGE_BUSY, STAGE_BUBBLE,
    STAGE_BUBBLE_RATIO, PIPELINE_REBUILDS, DRIVER_BUSY,
)
