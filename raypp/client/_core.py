"""What `Client` and `AsyncClient` share: settings, request bodies, the retry rule, parsing.
Only the I/O (blocking or awaited) differs between the two."""
from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass

import httpx

from raypp.client.errors import APIConnectionError, APITimeoutError, status_error, stream_error
from raypp.client.types import Completion, Health, Model
from raypp.runtime.stats import EngineStats

DEFAULT_URL = "http://127.0.0.1:8000"
RETRY_STATUSES = (429, 503)   # the queue is full / the replica is being replaced: both pass


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter (so many clients refused at once do not return at once);
    the server's Retry-After, when it sends one, replaces the computed wait."""
    max_retries: int = 2
    backoff_s: float = 0.5
    max_backoff_s: float = 8.0
    max_retry_after_s: float = 60.0   # a caller waits at most this long on one answer's word

    def delay_s(self, attempt: int, retry_after_s: float | None) -> float:
        if retry_after_s is not None:
            return min(retry_after_s, self.max_retry_after_s)
        return min(self.max_backoff_s, self.backoff_s * 2 ** attempt) * random.uniform(0.5, 1.0)


class ClientCore:
    def __init__(self, base_url: str | None, api_key: str | None, timeout: float, max_retries: int,
                 model: str | None):
        url = (base_url or os.environ.get("RAYPP_BASE_URL") or DEFAULT_URL).rstrip("/")
        # Accept the OpenAI-style ".../v1" too: raypp's /health and /stats sit beside /v1.
        self.base_url = url[:-3] if url.endswith("/v1") else url
        key = api_key if api_key is not None else os.environ.get("RAYPP_API_KEY")
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}
        # Generation can take long between two bytes of a non-streamed answer; connecting cannot.
        self.timeout = httpx.Timeout(timeout, connect=min(timeout, 10.0))
        self.retry = RetryPolicy(max_retries=max_retries)
        self.model = model

    def body(self, model: str, stream: bool, fields: dict) -> dict:
        body = {"model": model, **{k: v for k, v in fields.items() if v is not None}}
        if stream:
            body["stream"] = True
            body.setdefault("stream_options", {"include_usage": True})
        return body

    def connection_error(self, e: httpx.TransportError, url: str) -> APIConnectionError:
        if isinstance(e, httpx.TimeoutException):
            return APITimeoutError(f"no answer from {url} within the timeout ({type(e).__name__})", url)
        return APIConnectionError(f"cannot reach {url}: {e or type(e).__name__}", url)

    def should_retry(self, attempt: int, response: httpx.Response | None) -> float | None:
        """Seconds to wait before the next attempt, or None to give up.  A refused connection
        (response None) is retried too: nothing was sent, so nothing runs twice."""
        if attempt >= self.retry.max_retries:
            return None
        if response is None:
            return self.retry.delay_s(attempt, None)
        if response.status_code not in RETRY_STATUSES:
            return None
        return self.retry.delay_s(attempt, status_error(response.status_code, b"", response.headers).retry_after_s)

    @staticmethod
    def check(response: httpx.Response, body: bytes) -> None:
        if response.status_code >= 400:
            raise status_error(response.status_code, body, response.headers)


def sse_event(line: str) -> Completion | None:
    """One SSE line of a completion stream -> its chunk; None for blank lines, comments and the
    closing `data: [DONE]`.  An in-band error event raises."""
    if not line.startswith("data:"):
        return None
    data = line[5:].strip()
    if data == "[DONE]":
        return None
    d = json.loads(data)
    if "error" in d:
        raise stream_error(d["error"])
    return Completion.from_json(d)


def parse_models(d: dict) -> list[Model]:
    return [Model(id=m["id"], created=m["created"], owned_by=m["owned_by"], max_model_len=m["max_model_len"])
            for m in d["data"]]


def parse_health(d: dict) -> Health:
    return Health(status=d["status"], model=d["model"])


def parse_stats(d: dict) -> EngineStats:
    return EngineStats.from_json(d)
