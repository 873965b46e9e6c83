"""`Client`: blocking calls to a raypp server (a `serve run` of `raypp.serve:build_app`)."""
from __future__ import annotations

import time
from typing import Iterator

import httpx

from raypp.client._core import ClientCore, parse_health, parse_models, parse_stats, sse_event
from raypp.client.types import Completion, Health, Model
from raypp.runtime.stats import EngineStats


class Client:
    """
        client = Client("http://127.0.0.1:8000")          # api_key= or RAYPP_API_KEY
        print(client.complete("Once upon a time", max_tokens=16).text)
        for chunk in client.chat([{"role": "user", "content": "Hi"}], max_tokens=16, stream=True):
            print(chunk.text, end="")
        print(client.stats().stages[0].bubble_ratio)

    `complete` and `chat` take the request's fields as keywords (`max_tokens`, `temperature`,
    `top_p`, `seed`, `n`, `stop`, `logprobs`, and raypp's `top_k`, `stop_token_ids`,
    `ignore_eos`); the server rejects a field it does not know, naming it.  `model` defaults
    to the one the server serves.  Calls refused with 429 or 503, or whose connection is
    refused, are retried `max_retries` times with backoff, honouring Retry-After.
    """

    def __init__(self, base_url: str | None = None, *, api_key: str | None = None, timeout: float = 600.0,
                 max_retries: int = 2, model: str | None = None):
        self._core = ClientCore(base_url, api_key, timeout, max_retries, model)
        self._http = httpx.Client(base_url=self._core.base_url, headers=self._core.headers,
                                  timeout=self._core.timeout)

    @property
    def base_url(self) -> str:
        return self._core.base_url

    def complete(self, prompt: str | list[int] | list[str] | list[list[int]], *, model: str | None = None,
                 stream: bool = False, **fields) -> Completion | Iterator[Completion]:
        body = self._core.body(self._model(model), stream, {"prompt": prompt, **fields})
        return self._stream("/v1/completions", body) if stream else self._completion("/v1/completions", body)

    def chat(self, messages: list[dict], *, model: str | None = None, stream: bool = False,
             **fields) -> Completion | Iterator[Completion]:
        body = self._core.body(self._model(model), stream, {"messages": messages, **fields})
        path = "/v1/chat/completions"
        return self._stream(path, body) if stream else self._completion(path, body)

    def models(self) -> list[Model]:
        return parse_models(self._send("GET", "/v1/models").json())

    def health(self) -> Health:
        return parse_health(self._send("GET", "/health").json())

    def stats(self) -> EngineStats:
        """The replica's engine counters: per-stage busy / bubble time and ratio, KV blocks, queue."""
        return parse_stats(self._send("GET", "/stats").json())

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- internals ---------------------------------------------------------------------------
    def _model(self, model: str | None) -> str:
        if model is None and self._core.model is None:
            self._core.model = self.models()[0].id
        return model or self._core.model

    def _completion(self, path: str, body: dict) -> Completion:
        return Completion.from_json(self._send("POST", path, body).json())

    def _stream(self, path: str, body: dict) -> Iterator[Completion]:
        # Sent now, so that a refused request raises here rather than at the first iteration.
        return self._events(self._send("POST", path, body, stream=True))

    def _events(self, response: httpx.Response) -> Iterator[Completion]:
        try:
            for line in response.iter_lines():
                if (chunk := sse_event(line)) is not None:
                    yield chunk
        except httpx.TransportError as e:
            raise self._core.connection_error(e, str(response.url)) from e
        finally:
            response.close()

    def _send(self, method: str, path: str, body: dict | None = None, stream: bool = False) -> httpx.Response:
        request = self._http.build_request(method, path, json=body)
        attempt = 0
        while True:
            try:
                response = self._http.send(request, stream=stream)
            except httpx.TransportError as e:
                delay = self._core.should_retry(attempt, None) if isinstance(e, httpx.ConnectError) else None
                if delay is None:
                    raise self._core.connection_error(e, str(request.url)) from e
            else:
                if response.status_code < 400:
                    return response
                error_body = response.read()
                response.close()
                delay = self._core.should_retry(attempt, response)
                if delay is None:
                    self._core.check(response, error_body)
            time.sleep(delay)
            attempt += 1
