"""A validated request -> what the engine takes: prompt token ids and SamplingParams.

Everything a client can get wrong and pydantic cannot see is checked here, before any
engine work, and raised as a 400 that names the field: token ids outside the vocabulary,
an empty prompt, a prompt + max_tokens over the context (both numbers named).
"""
from __future__ import annotations

from raypp.model.sampling_params import SamplingParams
from raypp.serve.errors import APIError
from raypp.serve.protocol import ChatCompletionRequest, CompletionRequest, _Sampling
from raypp.serve.tokenizer import ChatTemplateError, Tokenizer


def completion_prompts(req: CompletionRequest, tok: Tokenizer, vocab_size: int) -> list[list[int]]:
    out = []
    for p in req.prompts():
        if isinstance(p, str):
            ids = tok.encode(p, add_special_tokens=True)
        else:
            bad = next((t for t in p if not 0 <= t < vocab_size), None)
            if bad is not None:
                raise APIError(400, f"prompt token id {bad} is outside the vocabulary [0, {vocab_size})",
                               param="prompt")
            ids = list(p)
        if not ids:
            raise APIError(400, "prompt is empty (it encodes to no tokens)", param="prompt")
        out.append(ids)
    return out


def chat_prompt(req: ChatCompletionRequest, tok: Tokenizer) -> list[int]:
    if not tok.has_chat_template:
        raise APIError(400, "this model's tokenizer_config.json has no chat_template; use /v1/completions",
                       param="messages")
    messages = [{"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})}
                for m in req.messages]
    try:
        ids = tok.apply_chat_template(messages, add_generation_prompt=req.add_generation_prompt)
    except ChatTemplateError as e:
        raise APIError(400, str(e), param="messages") from None
    if not ids:
        raise APIError(400, "messages render to an empty prompt", param="messages")
    return ids


def resolve_max_tokens(requested: int | None, prompt_len: int, max_model_len: int, param: str) -> int:
    """max_tokens to use; None means 'what the context leaves' (chat's default)."""
    if requested is None:
        if prompt_len >= max_model_len:
            raise APIError(400, f"This model's maximum context length is {max_model_len} tokens, but the prompt "
                                f"has {prompt_len} tokens, leaving none to generate. Shorten the prompt.",
                           param="messages", code="context_length_exceeded")
        return max_model_len - prompt_len
    if prompt_len + requested > max_model_len:
        raise APIError(400, f"This model's maximum context length is {max_model_len} tokens. However, you "
                            f"requested {prompt_len + requested} tokens ({prompt_len} in the prompt, {requested} "
                            f"for the completion, {param}={requested}). Reduce the prompt or {param}.",
                       param=param, code="context_length_exceeded")
    return requested


def sampling_params(req: _Sampling, max_tokens: int, choice: int, logprobs: bool,
                    vocab_size: int) -> SamplingParams:
    stop_ids = list(req.stop_token_ids or [])
    bad = next((t for t in stop_ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise APIError(400, f"stop_token_ids has {bad}, outside the vocabulary [0, {vocab_size})",
                       param="stop_token_ids")
    try:
        return SamplingParams(
            max_tokens=max_tokens, temperature=req.temperature, top_k=max(0, req.top_k), top_p=req.top_p,
            # Choice i of a seeded request uses seed + i: reproducible, yet the n choices differ.
            seed=None if req.seed is None else req.seed + choice,
            stop_token_ids=stop_ids, ignore_eos=req.ignore_eos, logprobs=logprobs)
    except ValueError as e:
        raise APIError(400, str(e)) from None
