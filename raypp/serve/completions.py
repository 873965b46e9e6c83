"""/v1/completions and /v1/chat/completions: run the choices, answer as JSON or as SSE.

Both endpoints share one path: prompts -> n choices per prompt -> engine streams.  They
differ only in how a delta is written (`text` vs `delta.content`, object names), which
is all the two `_Format`s below hold.  A request is admitted (first token out, or a 429)
before the response starts, because once the SSE headers are sent the status code
cannot change.
"""
from __future__ import annotations

import logging
import math
import time
import uuid
from typing import AsyncIterator

from fastapi.responses import JSONResponse, StreamingResponse

from raypp.errors import UserError
from raypp.runtime.engine import EngineDeadError
from raypp.runtime.outputs import QueueFullError
from raypp.serve import protocol as P
from raypp.serve.choices import Choice, Delta, close_all, merged, start_all
from raypp.serve.errors import APIError, sse_error
from raypp.serve.prepare import (chat_prompt, completion_prompts, resolve_max_tokens, sampling_params)
from raypp.serve.tokenizer import Tokenizer

logger = logging.getLogger("ray.serve")

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
# Serve's health check (every 10 s, replaced after 3 failures) takes about this long to swap a
# dead replica for a new one on the tiny deployment (docs/operations.md, "Failure modes").
RETRY_AFTER_DEAD_S = 10


class _CompletionFormat:
    id_prefix = "cmpl"

    def __init__(self, tok: Tokenizer):
        self.tok = tok

    def logprobs(self, ids: list[int], lps: list[float] | None, offset: int = 0):
        if lps is None:
            return None
        tokens = [self.tok.token_text(t) for t in ids]
        offsets = []
        for t in tokens:
            offsets.append(offset)
            offset += len(t)
        return P.CompletionLogprobs(tokens=tokens, token_logprobs=list(lps), text_offset=offsets)

    def chunk(self, rid, created, model, d: Delta, want_lp: bool, text_len: int):
        lp = self.logprobs(d.token_ids, d.logprobs, text_len) if want_lp else None
        return P.CompletionChunk(id=rid, created=created, model=model, choices=[
            P.CompletionChoice(index=d.index, text=d.text, logprobs=lp, finish_reason=d.finish_reason)])

    def first_chunks(self, rid, created, model, indices):
        return []

    def usage_chunk(self, rid, created, model, usage):
        return P.CompletionChunk(id=rid, created=created, model=model, choices=[], usage=usage)

    def response(self, rid, created, model, results, want_lp, usage):
        return P.CompletionResponse(id=rid, created=created, model=model, usage=usage, choices=[
            P.CompletionChoice(index=i, text=r["text"], finish_reason=r["finish"],
                               logprobs=self.logprobs(r["ids"], r["lps"]) if want_lp else None)
            for i, r in sorted(results.items())])


class _ChatFormat:
    id_prefix = "chatcmpl"

    def __init__(self, tok: Tokenizer):
        self.tok = tok

    def logprobs(self, ids: list[int], lps: list[float] | None):
        if lps is None:
            return None
        content = []
        for t, lp in zip(ids, lps):
            s = self.tok.token_text(t)
            content.append(P.ChatTokenLogprob(token=s, logprob=lp, bytes=list(s.encode("utf-8"))))
        return P.ChatLogprobs(content=content)

    def chunk(self, rid, created, model, d: Delta, want_lp: bool, text_len: int):
        lp = self.logprobs(d.token_ids, d.logprobs) if want_lp else None
        return P.ChatCompletionChunk(id=rid, created=created, model=model, choices=[
            P.ChatChunkChoice(index=d.index, delta=P.ChatDelta(content=d.text or None) if d.text else P.ChatDelta(),
                              logprobs=lp, finish_reason=d.finish_reason)])

    def first_chunks(self, rid, created, model, indices):
        # OpenAI opens each chat choice with a delta that only carries the role.
        return [P.ChatCompletionChunk(id=rid, created=created, model=model, choices=[
            P.ChatChunkChoice(index=i, delta=P.ChatDelta(role="assistant", content=""))]) for i in indices]

    def usage_chunk(self, rid, created, model, usage):
        return P.ChatCompletionChunk(id=rid, created=created, model=model, choices=[], usage=usage)

    def response(self, rid, created, model, results, want_lp, usage):
        return P.ChatCompletionResponse(id=rid, created=created, model=model, usage=usage, choices=[
            P.ChatChoice(index=i, message=P.AssistantMessage(content=r["text"]), finish_reason=r["finish"],
                         logprobs=self.logprobs(r["ids"], r["lps"]) if want_lp else None)
            for i, r in sorted(results.items())])


class OpenAIServing:
    def __init__(self, engine, tokenizer: Tokenizer, served_name: str, max_model_len: int, vocab_size: int):
        self.engine, self.tok = engine, tokenizer
        self.served_name, self.max_model_len, self.vocab_size = served_name, max_model_len, vocab_size
        self.created = int(time.time())

    def check_model(self, name: str) -> None:
        if name != self.served_name:
            raise APIError(404, f"The model `{name}` does not exist; this server serves `{self.served_name}` "
                                f"(GET /v1/models).", param="model", code="model_not_found")

    def models(self) -> P.ModelList:
        return P.ModelList(data=[P.ModelCard(id=self.served_name, created=self.created,
                                             max_model_len=self.max_model_len)])

    async def completions(self, req: P.CompletionRequest):
        self.check_model(req.model)
        prompts = completion_prompts(req, self.tok, self.vocab_size)
        max_tokens = [resolve_max_tokens(req.max_tokens, len(p), self.max_model_len, "max_tokens") for p in prompts]
        return await self._run(req, prompts, max_tokens, req.logprobs is not None, _CompletionFormat(self.tok))

    async def chat(self, req: P.ChatCompletionRequest):
        self.check_model(req.model)
        prompt = chat_prompt(req, self.tok)
        param = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
        max_tokens = resolve_max_tokens(req.requested_max_tokens, len(prompt), self.max_model_len, param)
        return await self._run(req, [prompt], [max_tokens], req.logprobs, _ChatFormat(self.tok))

    async def _run(self, req, prompts: list[list[int]], max_tokens: list[int], want_lp: bool, fmt):
        rid = f"{fmt.id_prefix}-{uuid.uuid4().hex}"
        created = int(time.time())
        choices = []
        for pi, (prompt, mt) in enumerate(zip(prompts, max_tokens)):
            for j in range(req.n):
                index = pi * req.n + j
                params = sampling_params(req, mt, index, want_lp, self.vocab_size)
                choices.append(Choice(self.engine, self.tok, index, prompt, params, req.stops, f"{rid}-{index}"))
        try:
            await start_all(choices)
        except QueueFullError as e:
            raise APIError(429, f"{e}; retry later", code="rate_limit_exceeded",
                           headers={"Retry-After": str(max(1, math.ceil(e.retry_after_s)))}) from None
        except UserError as e:  # what only the engine can judge, e.g. prompt + max_tokens over the KV cache
            raise APIError(400, str(e)) from None
        except EngineDeadError as e:
            raise _unavailable(e) from None
        if req.stream:
            return StreamingResponse(self._sse(choices, req.n, fmt, rid, created, want_lp, req.include_usage),
                                     media_type="text/event-stream", headers=SSE_HEADERS)
        try:
            return await self._collect(choices, req.n, fmt, rid, created, want_lp)
        except EngineDeadError as e:
            raise _unavailable(e) from None

    @staticmethod
    def _usage(choices: list[Choice], n: int) -> P.Usage:
        # The n choices of one prompt (indices prompt * n + i) count it once, as OpenAI does.
        prompt = sum(c.num_prompt_tokens for c in choices if c.index % n == 0)
        completion = sum(c.num_generated for c in choices)
        return P.Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)

    async def _collect(self, choices, n, fmt, rid, created, want_lp) -> JSONResponse:
        results = {c.index: {"text": "", "ids": [], "lps": [] if want_lp else None, "finish": None}
                   for c in choices}
        stream = merged(choices)
        try:
            async for d in stream:
                r = results[d.index]
                r["text"] += d.text
                r["ids"] += d.token_ids
                if want_lp and d.logprobs is not None:
                    r["lps"] += d.logprobs
                if d.finish_reason:
                    r["finish"] = d.finish_reason
        finally:
            await stream.aclose()
        resp = fmt.response(rid, created, self.served_name, results, want_lp, self._usage(choices, n))
        return JSONResponse(resp.model_dump(mode="json"))

    async def _sse(self, choices, n, fmt, rid, created, want_lp, include_usage) -> AsyncIterator[bytes]:
        model = self.served_name
        stream = merged(choices)
        text_len = {c.index: 0 for c in choices}
        try:
            for ch in fmt.first_chunks(rid, created, model, [c.index for c in choices]):
                yield _event(ch)
            async for d in stream:
                if not d.text and d.finish_reason is None and not (want_lp and d.token_ids):
                    continue  # nothing a client could see (held back for a stop string, or a special token)
                yield _event(fmt.chunk(rid, created, model, d, want_lp, text_len[d.index]))
                text_len[d.index] += len(d.text)
            if include_usage:
                yield _event(fmt.usage_chunk(rid, created, model, self._usage(choices, n)))
            yield b"data: [DONE]\n\n"
        except EngineDeadError as e:  # the status is sent already, so the failure goes in-band
            logger.warning("raypp: stream %s ended by a dead engine: %s", rid, e)
            yield sse_error(_unavailable(e))
        except Exception:
            logger.exception("raypp: stream %s failed", rid)
            yield sse_error(APIError(500, "generation failed mid-stream (see the replica log)"))
        finally:
            await stream.aclose()
            await close_all(choices)


def _unavailable(e: EngineDeadError) -> APIError:
    # The replica's pipeline is gone for good; Serve's health check replaces the replica (or another
    # replica takes the retry), so a client that waits Retry-After and retries is served.
    return APIError(503, f"the model's workers failed; retry shortly ({e})", code="engine_dead",
                    headers={"Retry-After": str(RETRY_AFTER_DEAD_S)})


def _event(model) -> bytes:
    return b"data: " + model.model_dump_json().encode() + b"\n\n"
