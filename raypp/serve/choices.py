"""One choice of a request: an engine stream turned into text deltas with a finish reason.

The engine streams token ids; this adds what is the serve layer's job: incremental
text, stop strings (closing the engine stream, which aborts the request and frees its
KV blocks at once), and per-token logprobs.  Every exit path closes the engine stream
(`close`), so a client that goes away never leaves a sequence decoding for nobody.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import AsyncIterator

from raypp.model.sampling_params import SamplingParams
from raypp.runtime.outputs import RequestOutput
from raypp.serve.textstream import TextStream
from raypp.serve.tokenizer import Tokenizer


@dataclass
class Delta:
    index: int
    text: str
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] | None = None
    finish_reason: str | None = None


class Choice:
    def __init__(self, engine, tokenizer: Tokenizer, index: int, prompt_ids: list[int],
                 params: SamplingParams, stop: list[str], request_id: str):
        self.index = index
        self.num_prompt_tokens = len(prompt_ids)
        self.num_generated = 0
        self._gen = engine.generate(prompt_ids, params, request_id=request_id)
        self._text = TextStream(tokenizer, prompt_ids, stop)
        self._first: RequestOutput | None = None
        self._closed = False

    async def start(self) -> None:
        """Wait for the first output: raises QueueFullError (-> 429) before any byte is sent."""
        try:
            self._first = await self._gen.__anext__()
        except StopAsyncIteration:
            self._first = None

    async def deltas(self) -> AsyncIterator[Delta]:
        try:
            out = self._first
            while out is not None:
                self.num_generated = len(out.token_ids)
                text, stopped = self._text.feed(out.new_token_ids, final=out.finished)
                finish = "stop" if stopped else out.finish_reason if out.finished else None
                yield Delta(self.index, text, out.new_token_ids, out.new_logprobs, finish)
                if finish is not None:
                    return
                try:
                    out = await self._gen.__anext__()
                except StopAsyncIteration:
                    out = None
            # The engine's stream ended without a finished output: treat as aborted.
            yield Delta(self.index, "", finish_reason="abort")
        finally:
            await self.close()

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            await self._gen.aclose()


async def start_all(choices: list[Choice]) -> None:
    """Admit every choice; if any cannot be admitted, close all and re-raise its error."""
    try:
        if len(choices) == 1:
            await choices[0].start()
            return
        results = await asyncio.gather(*(c.start() for c in choices), return_exceptions=True)
    except BaseException:  # incl. cancellation: the client left while waiting for its first token
        await close_all(choices)
        raise
    err = next((r for r in results if isinstance(r, BaseException)), None)
    if err is not None:
        await close_all(choices)
        raise err


async def close_all(choices: list[Choice]) -> None:
    for c in choices:
        try:
            await c.close()
        except Exception:  # closing must not mask the error that got us here
            pass


async def merged(choices: list[Choice]) -> AsyncIterator[Delta]:
    """Deltas of all choices in arrival order; closing this closes every engine stream."""
    if len(choices) == 1:  # the common case needs no tasks
        gen = choices[0].deltas()
        try:
            async for d in gen:
                yield d
        finally:
            await gen.aclose()
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(c: Choice):
        try:
            async for d in c.deltas():
                await queue.put(d)
        except BaseException as e:  # noqa: BLE001 - forwarded to the consumer
            await queue.put(e)
        finally:
            await queue.put(done)

    tasks = [asyncio.create_task(pump(c)) for c in choices]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await close_all(choices)
