"""`build_app(args)`: the Ray Serve application, and its FastAPI ingress deployment.

A deployment file says `import_path: raypp.serve:build_app` and `args: <DeploymentConfig>`.
`build_app` validates the args (a bad field fails the deploy at once, naming the field
and the reason), resolves the model path, and binds one `LLMServer` deployment.  Each
replica of it owns one engine: one TP x PP pipeline with its placement groups.  So
`num_replicas: N` in the file's `deployments:` section gives N independent pipelines,
and Serve's router spreads requests over them.
"""

import asyncio
import importlib.metadata
import logging
import os
from dataclasses import asdict

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from ray import serve
from ray.serve import Application

from raypp.config import DeploymentConfig
from raypp.errors import UserError
from raypp.serve import errors, openapi
from raypp.serve import protocol as P
from raypp.serve.auth import APIKeyMiddleware
from raypp.serve.body_limit import BodyLimitMiddleware
from raypp.serve.checkpoint import resolve_paths, served_name

logger = logging.getLogger("ray.serve")

api = FastAPI(title="raypp", version=importlib.metadata.version("raypp"),
              description="OpenAI-compatible API over a tensor x pipeline parallel Llama-family model.")
errors.install(api)
openapi.install(api)
# The last added runs first: a request without the key is refused before its body is read.
api.add_middleware(BodyLimitMiddleware)
api.add_middleware(APIKeyMiddleware)


@serve.deployment(name="LLMServer")
@serve.ingress(api)
class LLMServer:
    def __init__(self, cfg: dict):
        from raypp.runtime.engine import Engine
        from raypp.serve.completions import OpenAIServing
        from raypp.serve.metrics_publisher import MetricsPublisher
        from raypp.serve.tokenizer import Tokenizer

        cfg = DeploymentConfig.model_validate(cfg)
        logger.info("raypp: starting a tp=%d x pp=%d pipeline for %s", cfg.parallel.tp, cfg.parallel.pp,
                    cfg.model.path)
        self.engine = Engine.from_config(cfg)  # writes the tiny checkpoint first if asked and absent
        tokenizer = Tokenizer(self.engine.model_path)
        # Read by APIKeyMiddleware; one replica per process, so app state is this replica's.
        api.state.api_key = cfg.serve.api_key or os.environ.get("RAYPP_API_KEY") or None
        self.serving = OpenAIServing(self.engine, tokenizer, served_name(cfg), self.engine.max_model_len,
                                     self.engine.model_config.vocab_size)
        logger.info("raypp: serving %s (tp=%d, pp=%d, max_model_len=%d)", self.serving.served_name,
                    cfg.parallel.tp, cfg.parallel.pp, self.engine.max_model_len)
        replica = serve.get_replica_context().replica_id.unique_id
        self.metrics = MetricsPublisher(self.engine, self.serving.served_name, replica)
        # Serve builds the replica on its event loop: the publisher shares it with the engine.
        self._metrics_task = asyncio.get_running_loop().create_task(self.metrics.run())

    @api.get("/v1/models", response_model=P.ModelList, responses=openapi.error_responses(401))
    async def models(self):
        return self.serving.models()

    @api.get("/v1/models/{model}", response_model=P.ModelCard, responses=openapi.error_responses(401, 404))
    async def model(self, model: str):
        self.serving.check_model(model)
        return self.serving.models().data[0]

    @api.post("/v1/completions", response_model=P.CompletionResponse,
              responses={**openapi.streaming_200(P.CompletionResponse, P.CompletionChunk),
                         **openapi.error_responses(400, 401, 404, 413, 429, 503)})
    async def completions(self, body: P.CompletionRequest):
        return await self.serving.completions(body)

    @api.post("/v1/chat/completions", response_model=P.ChatCompletionResponse,
              responses={**openapi.streaming_200(P.ChatCompletionResponse, P.ChatCompletionChunk),
                         **openapi.error_responses(400, 401, 404, 413, 429, 503)})
    async def chat_completions(self, body: P.ChatCompletionRequest):
        return await self.serving.chat(body)

    @api.get("/health")
    async def health(self):
        """200 while this replica serves; 503 with Retry-After while its pipeline is being rebuilt
        after a worker failure (requests wait meanwhile), or once it is dead.  Serve's own health
        check is `check_health`, which passes during a rebuild so that Serve does not replace a
        replica that is recovering by itself."""
        state = self.engine.state
        body = {"status": state, "model": self.serving.served_name, "rebuilds": self.engine.rebuilds}
        if state == "ok":
            return body
        return JSONResponse(body, status_code=503, headers={"Retry-After": "5"})

    @api.get("/stats")
    async def stats(self) -> dict:
        """The engine's counters for this replica (`EngineStats`): running, waiting, KV blocks,
        per-stage busy / idle / waiting time and bubble ratio."""
        return asdict(self.engine.stats())

    async def check_health(self):
        # Serve calls this every few seconds; a dead worker makes it raise and Serve replaces the
        # replica instead of leaving a zombie that accepts requests it cannot serve.
        await self.engine.check_health()

    def __del__(self):
        # Serve calls this on graceful shutdown: give the workers and placement groups back now.
        task = getattr(self, "_metrics_task", None)
        if task is not None:
            task.cancel()
        engine = getattr(self, "engine", None)
        if engine is not None:
            try:
                engine.shutdown()
            except Exception:
                logger.exception("raypp: engine shutdown failed")


def parse_args(args) -> DeploymentConfig:
    """The deployment file's `args:` as a DeploymentConfig; errors name every bad field."""
    if isinstance(args, DeploymentConfig):
        return args
    try:
        return DeploymentConfig.model_validate(args or {})
    except ValidationError as e:
        lines = []
        for err in e.errors():
            field = ".".join(str(p) for p in err["loc"]) or "args"
            msg = "unknown field" if err["type"] == "extra_forbidden" else err["msg"]
            got = "" if err["type"] in ("missing", "extra_forbidden") else f" (got {_short(err.get('input'))})"
            lines.append(f"args.{field}: {msg}{got}")
        raise UserError("invalid raypp deployment args:\n  " + "\n  ".join(lines)) from None


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def build_app(args: dict) -> Application:
    cfg = resolve_paths(parse_args(args))
    if cfg.serve.api_key:
        # Ray Serve logs an application's args at INFO when it imports the application.
        logger.warning("raypp: serve.api_key in the deployment args is written to Ray Serve's logs; "
                       "set the RAYPP_API_KEY environment variable on the cluster's nodes instead")
    sched = cfg.scheduler
    # Serve must let every request the engine could run or queue through to the replica, or
    # Serve's own queue would hide the engine's 429 behind unbounded waiting.
    options = {"max_ongoing_requests": sched.max_num_seqs + sched.max_queue + 8,
               # A replica that cannot build its pipeline already waited placement_timeout_s for
               # the cluster; retrying would only multiply that wait before the error shows.
               "max_constructor_retry_count": 1}
    if cfg.parallel.tp * cfg.parallel.pp == 1 and cfg.parallel.device == "cuda":
        # No Ray workers at TP = PP = 1: the replica runs the model itself, so it holds the GPU.
        options["ray_actor_options"] = {"num_cpus": 1, "num_gpus": 1}
    return LLMServer.options(**options).bind(cfg.model_dump())
