"""The OpenAI wire format as pydantic models: requests in, responses and stream chunks out.

These models are the single source of the OpenAPI spec (`/openapi.json`) and of every
body the server writes, so the spec cannot drift from what is sent.  Unknown request
fields are errors (HTTP 400 naming the field), as with OpenAI itself: a misspelt
`max_token` must not silently fall back to a default.  Fields OpenAI defines that raypp
does not implement are accepted only at their no-op value and rejected otherwise, so a
client never gets behaviour it did not ask for.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from raypp.runtime.outputs import FinishReason

MAX_N = 64            # choices per request: each is one engine sequence
MAX_PROMPTS = 64      # prompts in one batched completion: each is n engine sequences
MAX_STOP = 16         # stop strings per request: each is searched after every token
MAX_STOP_LEN = 1024   # characters per stop string: held-back text is matched against each prefix
MAX_STOP_TOKEN_IDS = 256
MAX_MESSAGES = 4096   # the chat template renders them all before the context length is known
MAX_NAME_LEN = 256    # model, user and message names: identifiers, not text
MAX_SEED = 2**63 - 1  # OpenAI's seed is an int64


def _no_lone_surrogates(v: str) -> str:
    # JSON may escape half of a UTF-16 pair ("\ud800"); such a string cannot be encoded to UTF-8,
    # so the tokenizer (and any response echoing it) would fail on it.
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("text holds an unpaired UTF-16 surrogate (an invalid \\uD800-\\uDFFF escape)") from None
    return v


Text = Annotated[str, AfterValidator(_no_lone_surrogates)]
Name = Annotated[str, Field(max_length=MAX_NAME_LEN), AfterValidator(_no_lone_surrogates)]
StopText = Annotated[str, Field(max_length=MAX_STOP_LEN), AfterValidator(_no_lone_surrogates)]


class _Request(BaseModel):
    # Strict: "2" is not an integer and 1 is not `true`.  Coercing them would hide a client's bug
    # exactly as a silently ignored unknown field would (an int still passes for a float).
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Request):
    include_usage: bool = Field(False, description="Send a last chunk with `usage` (and empty `choices`).")


class _Sampling(_Request):
    """Fields shared by /v1/completions and /v1/chat/completions."""
    model: Name = Field(description="Model name, as listed by GET /v1/models.")
    temperature: float = Field(1.0, ge=0, le=2, description="0 means greedy.")
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(-1, ge=-1, description="raypp extension: keep the k most likely tokens; -1 or 0 disables.")
    n: int = Field(1, ge=1, le=MAX_N, description="Independent choices to generate.")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="Same seed, same tokens (choice i uses seed + i).")
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: StopText | list[StopText] | None = Field(
        None, description="Stop strings; the text ends before the first one found.")
    stop_token_ids: list[int] | None = Field(None, max_length=MAX_STOP_TOKEN_IDS,
                                             description="raypp extension: token ids that end a choice.")
    ignore_eos: bool = Field(False, description="raypp extension: keep generating past end-of-sequence tokens.")
    user: Name | None = None
    # OpenAI fields raypp implements only at their neutral value (checked below).
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v):
        if v is None:
            return v
        v = [v] if isinstance(v, str) else v
        if len(v) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop strings, got {len(v)}")
        if any(s == "" for s in v):
            raise ValueError("stop strings must not be empty")
        return v

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, v):
        if v != 0:
            raise ValueError("penalties are not supported by raypp; leave them at 0")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _no_logit_bias(cls, v):
        if v:
            raise ValueError("logit_bias is not supported by raypp; leave it empty")
        return v

    @property
    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Sampling):
    prompt: Text | list[Text] | list[int] | list[list[int]] = Field(
        description="Text, token ids, or a batch of either; choice index = prompt index * n + i.")
    max_tokens: int = Field(16, ge=1, description="Tokens to generate at most (prompt + max_tokens <= context).")
    logprobs: int | None = Field(
        None, ge=0,
        description="0: include the sampled tokens' log-probabilities.  Top alternatives are not computed, "
                    "so larger values are rejected.")
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _nonempty(cls, v):
        if isinstance(v, list) and len(v) == 0:
            raise ValueError("prompt must not be an empty list")
        if isinstance(v, list) and isinstance(v[0], list) and any(len(p) == 0 for p in v):
            raise ValueError("token-id prompts must not be empty")
        if isinstance(v, list) and not isinstance(v[0], int) and len(v) > MAX_PROMPTS:
            raise ValueError(f"at most {MAX_PROMPTS} prompts in one request, got {len(v)}")
        return v

    @field_validator("logprobs")
    @classmethod
    def _only_sampled(cls, v):
        if v:
            raise ValueError("raypp returns only the sampled token's logprob; set logprobs to 0 "
                             "(top alternatives are not computed)")
        return v

    @model_validator(mode="after")
    def _unsupported(self):
        if self.echo:
            raise ValueError("echo is not supported by raypp")
        if self.suffix:
            raise ValueError("suffix is not supported by raypp")
        if self.best_of not in (None, 1, self.n):
            raise ValueError("best_of is not supported by raypp; leave it unset or equal to n")
        return self

    def prompts(self) -> list[str | list[int]]:
        """The batch: each element is a text or a token-id list."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if isinstance(p[0], int):
            return [p]
        return list(p)


class TextPart(_Request):
    type: Literal["text"]
    text: Text


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[TextPart] | None = Field(
        None, description="Text, or a list of text parts (joined); images are not supported.")
    name: Name | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ResponseFormat(_Request):
    type: Literal["text"] = Field(description="Only plain text is supported.")


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: int | None = Field(
        None, ge=1, description="Tokens to generate at most; default: what the context leaves.")
    max_completion_tokens: int | None = Field(None, ge=1, description="Newer name of max_tokens; wins if both.")
    logprobs: bool = False
    top_logprobs: int | None = Field(
        None, ge=0, description="Alternatives are not computed by raypp; only 0 is accepted.")
    response_format: ResponseFormat | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    add_generation_prompt: bool = Field(True, description="raypp extension: end the prompt with the assistant header.")

    @field_validator("top_logprobs")
    @classmethod
    def _no_alternatives(cls, v):
        if v:
            raise ValueError("raypp returns only the sampled token's logprob; set top_logprobs to 0 or leave it out")
        return v

    @field_validator("tools")
    @classmethod
    def _no_tools(cls, v):
        if v:
            raise ValueError("tool calling is not supported by raypp")
        return v

    @field_validator("tool_choice")
    @classmethod
    def _no_tool_choice(cls, v):
        if v not in (None, "none", "auto"):
            raise ValueError("tool calling is not supported by raypp")
        return v

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


# ---- responses -------------------------------------------------------------------------

class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]] | None = None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None = None


class _Envelope(BaseModel):
    """What every completion response and stream chunk carries around its choices."""
    id: str
    created: int
    model: str
    usage: Usage | None = None


class CompletionResponse(_Envelope):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]


class ChatTokenLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[dict[str, Any]] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionResponse(_Envelope):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(_Envelope):
    """One SSE event of a streamed chat completion (`data: {...}`); the stream ends `data: [DONE]`."""
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]


class CompletionChunk(_Envelope):
    """One SSE event of a streamed completion (`data: {...}`); the stream ends `data: [DONE]`."""
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "raypp"
    max_model_len: int = Field(description="raypp extension: prompt + max_tokens must fit in it.")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
