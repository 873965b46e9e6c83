"""The typed deployment spec: one pydantic object from YAML to every worker.

`serve run` hands the `args:` of a deployment file to `raypp.serve:build_app`,
which validates them into a `DeploymentConfig`; the engine, the placement code
and the planner's `--emit` all speak this one type.  Unknown fields are errors,
so a typo in a YAML file fails at once with the field's name.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from raypp.model.graph_batches import CUDA_GRAPH_MAX_BATCH


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSection(_Strict):
    path: str = Field(description="Local directory of a Hugging Face format checkpoint.")
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = Field(
        "auto", description="Compute dtype; 'auto' takes the checkpoint's (float32 on CPU for fp16).")
    served_name: str | None = Field(
        None, description="Model name clients send; defaults to the directory's name.")
    make_tiny_if_missing: Literal["tiny", "small"] | None = Field(
        None, description="Write raypp's deterministic checkpoint of this preset to `path` if it is absent.")
    max_model_len: int | None = Field(
        None, gt=0, description="Context length cap; defaults to the checkpoint's max_position_embeddings.")


class ParallelSection(_Strict):
    tp: int = Field(1, ge=1, description="Tensor-parallel degree: GPUs per stage, inside one node.")
    pp: int = Field(1, ge=1, description="Pipeline-parallel degree: number of stages.")
    stage_layers: list[int] | None = Field(
        None, description="Layers per stage (sums to the model's layer count); default: cost-balanced split.")
    device: Literal["cuda", "cpu"] = Field("cuda", description="Where workers compute.")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs each worker bundle reserves (torch threads on CPU).")
    placement_timeout_s: float = Field(
        60.0, gt=0, description="How long to wait for the placement groups before failing with the shortfall.")
    step_timeout_s: float = Field(
        120.0, gt=0, description="A step that has not come back this long after it could start means a stalled "
                                 "or dead worker: the pipeline is rebuilt.")
    setup_timeout_s: float = Field(
        600.0, gt=0, description="Workers must have joined their process groups and loaded their shards by then.")
    max_rebuilds: int = Field(
        3, ge=0, description="Pipeline rebuilds after worker failures before the replica reports unhealthy for good.")
    step_transport: Literal["socket", "ray"] = Field(
        "socket", description="How steps reach the workers: a TCP connection per worker (~1 ms less per step "
                              "than an actor call) or plain Ray actor calls.")
    placement_resources: dict[str, float] = Field(
        default_factory=dict,
        description="Extra custom resources every bundle asks for (e.g. a node-pool label).")
    cuda_graph_max_batch: int = Field(
        CUDA_GRAPH_MAX_BATCH,
        description="CUDA workers replay decode steps of up to this many sequences as CUDA graphs, padded "
                    "to 1, 2, 4, ... sequences and captured on first use (tp=1 only); 0 turns them off. "
                    "Ignored on the CPU.")

    @field_validator("cuda_graph_max_batch")
    @classmethod
    def _graph_batch_in_range(cls, v: int) -> int:
        if v < 0:
            raise ValueError(f"cuda_graph_max_batch must be 0 (CUDA graphs off) or the largest batch size "
                             f"to replay as a graph, got {v}")
        return v

    @model_validator(mode="after")
    def _stage_layers_match_pp(self):
        if self.stage_layers is not None:
            if len(self.stage_layers) != self.pp:
                raise ValueError(
                    f"stage_layers has {len(self.stage_layers)} entries but pp={self.pp}; "
                    f"give one layer count per stage or drop stage_layers for a balanced split")
            if any(n < 1 for n in self.stage_layers):
                raise ValueError("stage_layers entries must each be >= 1 (every stage owns a layer)")
        return self


class SchedulerSection(_Strict):
    micro_batches: int | None = Field(
        None, ge=1, description="Micro-batches in flight at once; default = pp, so no stage waits.")
    max_num_seqs: int = Field(64, ge=1, description="Running sequences at most, over all micro-batches.")
    max_tokens_per_micro_batch: int = Field(
        512, ge=16, description="Token budget of one micro-batch; longer prefills are chunked.")
    block_size: int = Field(16, ge=1, description="Tokens per KV-cache block.")
    num_kv_blocks: int | None = Field(
        None, ge=1, description="KV-cache blocks per worker; default: enough for max_num_seqs full contexts, "
                                "capped by kv_memory_gb.")
    kv_memory_gb: float = Field(2.0, gt=0, description="Cap on KV-cache memory per worker when num_kv_blocks is unset.")
    max_queue: int = Field(256, ge=0, description="Waiting requests at most; more get HTTP 429.")

    def resolved_micro_batches(self, pp: int) -> int:
        return self.micro_batches or pp


class ServeSection(_Strict):
    api_key: str | None = Field(None, description="Bearer key clients must send; env RAYPP_API_KEY also sets it.")


class DeploymentConfig(_Strict):
    model: ModelSection
    parallel: ParallelSection = Field(default_factory=ParallelSection)
    scheduler: SchedulerSection = Field(default_factory=SchedulerSection)
    serve: ServeSection = Field(default_factory=ServeSection)

    @classmethod
    def from_yaml_args(cls, args: dict) -> "DeploymentConfig":
        return cls.model_validate(args)

    @property
    def micro_batches(self) -> int:
        return self.scheduler.resolved_micro_batches(self.parallel.pp)
