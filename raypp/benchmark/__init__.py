"""raypp's benchmarks: what `raypp bench` runs and the scripts in benchmarks/ build on.

    engine.py          a layout's DeploymentConfig and Engine (in-process or on Ray), prompts
    load.py            closed-loop load over the Engine API, batch-1 latency, batch throughput
    http_load.py       load over HTTP through raypp.client, timed by streamed chunks
    stats.py           percentiles and per-stage busy / bubble deltas
    profile.py         decode steps captured from an engine and replayed under torch.profiler
    plots.py, report.py, progress.py   PNGs, JSON and tables, a progress line
    command.py         `raypp bench serve | engine | compare`

The in-process toolkit is importable from the package itself (`from raypp import benchmark
as bench`); nothing here imports torch or Ray until it is called.
"""
from raypp.benchmark.engine import (PROMPT_SEED, check_model_dir, describe_layout, env_defaults, greedy,
                                    make_config, make_prompts, open_engine)
from raypp.benchmark.load import (LoadResult, RequestTrace, batch_throughput, decode_latency, generate_timed,
                                  run_load, trace_request)
from raypp.benchmark.plots import _plt, plot_bench
from raypp.benchmark.profile import StepRecorder, profile_step
from raypp.benchmark.report import host_info, write_json
from raypp.benchmark.stats import Summary, percentile, stage_delta, summarize

__all__ = ["PROMPT_SEED", "check_model_dir", "describe_layout", "env_defaults", "greedy", "make_config",
           "make_prompts", "open_engine", "LoadResult", "RequestTrace", "batch_throughput", "decode_latency",
           "generate_timed", "run_load", "trace_request", "_plt", "plot_bench", "StepRecorder", "profile_step",
           "host_info", "write_json", "Summary", "percentile", "stage_delta", "summarize"]
