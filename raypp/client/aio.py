"""`AsyncClient`: the same calls as `Client`, awaited.  A stream is awaited, then iterated:

    async with AsyncClient("http://127.0.0.1:8000") as client:
        async for chunk in await client.chat(messages, max_tokens=16, stream=True):
            print(chunk.text, end="")
"""
from __future__ import annotations

import asyncio
from typing import AsyncIterator

import httpx

from raypp.client._core import ClientCore, parse_health, parse_models, parse_stats, sse_event
from raypp.client.types import Completion, Health, Model
from raypp.runtime.stats import EngineStats


class AsyncClient:
    """See `raypp.client.Client`: the arguments, fields, retries and errors are the same.
    `max_connections` bounds the requests in flight over this client (httpx's pool)."""

    def __init__(self, base_url: str | None = None, *, api_key: str | None = None, timeout: float = 600.0,
                 max_retries: int = 2, model: str | None = None, max_connections: int = 100):
        self._core = ClientCore(base_url, api_key, timeout, max_retries, model)
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
        self._http = httpx.AsyncClient(base_url=self._core.base_url, headers=self._core.headers,
                                       timeout=self._core.timeout, limits=limits)

    @property
    def base_url(self) -> str:
        return self._core.base_url

    async def complete(self, prompt: str | list[int] | list[str] | list[list[int]], *, model: str | None = None,
                       stream: bool = False, **fields) -> Completion | AsyncIterator[Completion]:
        body = self._core.body(await self._model(model), stream, {"prompt": prompt, **fields})
        return await (self._stream if stream else self._completion)("/v1/completions", body)

    async def chat(self, messages: list[dict], *, model: str | None = None, stream: bool = False,
                   **fields) -> Completion | AsyncIterator[Completion]:
        body = self._core.body(await self._model(model), stream, {"messages": messages, **fields})
        return await (self._stream if stream else self._completion)("/v1/chat/completions", body)

    async def models(self) -> list[Model]:
        return parse_models((await self._send("GET", "/v1/models")).json())

    async def health(self) -> Health:
        return parse_health((await self._send("GET", "/health")).json())

    async def stats(self) -> EngineStats:
        return parse_stats((await self._send("GET", "/stats")).json())

    async def close(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    # ---- internals ---------------------------------------------------------------------------
    async def _model(self, model: str | None) -> str:
        if model is None and self._core.model is None:
            self._core.model = (await self.models())[0].id
        return model or self._core.model

    async def _completion(self, path: str, body: dict) -> Completion:
        return Completion.from_json((await self._send("POST", path, body)).json())

    async def _stream(self, path: str, body: dict) -> AsyncIterator[Completion]:
        return self._events(await self._send("POST", path, body, stream=True))

    async def _events(self, response: httpx.Response) -> AsyncIterator[Completion]:
        try:
            async for line in response.aiter_lines():
                if (chunk := sse_event(line)) is not None:
                    yield chunk
        except httpx.TransportError as e:
            raise self._core.connection_error(e, str(response.url)) from e
        finally:
            await response.aclose()

    async def _send(self, method: str, path: str, body: dict | None = None, stream: bool = False) -> httpx.Response:
        request = self._http.build_request(method, path, json=body)
        attempt = 0
        while True:
            try:
                response = await self._http.send(request, stream=stream)
            except httpx.TransportError as e:
                delay = self._core.should_retry(attempt, None) if isinstance(e, httpx.ConnectError) else None
                if delay is None:
                    raise self._core.connection_error(e, str(request.url)) from e
            else:
                if response.status_code < 400:
                    return response
                error_body = await response.aread()
                await response.aclose()
                delay = self._core.should_retry(attempt, response)
                if delay is None:
                    self._core.check(response, error_body)
            await asyncio.sleep(delay)
            attempt += 1
