"""raypp's Python client: `Client` (blocking) and `AsyncClient` over httpx, with typed answers,
streaming, the server's per-stage stats, retries on 429/503 and typed errors.  It imports
neither torch nor Ray.  The official `openai` client works against the same server; this one
adds what it cannot reach: `/stats`, `/health` and raypp's extension fields."""
from raypp.client.aio import AsyncClient
from raypp.client.errors import (APIConnectionError, APIStatusError, APITimeoutError, AuthenticationError,
                                 BadRequestError, NotFoundError, RateLimitError, RayppError, ServerError)
from raypp.client.sync import Client
from raypp.client.types import Choice, Completion, Health, Model, TokenLogprob, Usage

__all__ = ["Client", "AsyncClient", "Completion", "Choice", "Usage", "TokenLogprob", "Model", "Health",
           "RayppError", "APIConnectionError", "APITimeoutError", "APIStatusError", "BadRequestError",
           "AuthenticationError", "NotFoundError", "RateLimitError", "ServerError"]
