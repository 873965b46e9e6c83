"""Typed answers.  One `Completion` shape serves completions and chat, whole and streamed:
a choice's `text` is the completion's text, the chat message's content, or a chunk's delta."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


@dataclass(frozen=True)
class TokenLogprob:
    token: str
    logprob: float


@dataclass(frozen=True)
class Choice:
    index: int
    text: str
    finish_reason: str | None          # "stop" / "length"; None until a stream's last chunk of the choice
    logprobs: list[TokenLogprob] | None


@dataclass(frozen=True)
class Completion:
    id: str
    object: str                        # text_completion / chat.completion / chat.completion.chunk
    created: int
    model: str
    choices: list[Choice]
    usage: Usage | None                # streams: only on the last chunk (its choices are empty)

    @property
    def text(self) -> str:
        """The first choice's text (or delta); "" for a stream's usage-only chunk."""
        return self.choices[0].text if self.choices else ""

    @classmethod
    def from_json(cls, d: dict) -> "Completion":
        usage = d.get("usage")
        return cls(id=d["id"], object=d["object"], created=d["created"], model=d["model"],
                   choices=[_choice(c) for c in d["choices"]], usage=Usage(**usage) if usage else None)


def _choice(c: dict) -> Choice:
    if "message" in c or "delta" in c:             # chat: content, or None in a role-only first delta
        text = (c.get("message") or c.get("delta") or {}).get("content")
        lp = c.get("logprobs") and [TokenLogprob(x["token"], x["logprob"]) for x in c["logprobs"]["content"] or []]
    else:
        text = c["text"]
        lp = c.get("logprobs") and [TokenLogprob(t, p) for t, p in zip(c["logprobs"]["tokens"],
                                                                       c["logprobs"]["token_logprobs"])]
    return Choice(index=c["index"], text=text or "", finish_reason=c.get("finish_reason"), logprobs=lp or None)


@dataclass(frozen=True)
class Model:
    id: str
    created: int
    owned_by: str
    max_model_len: int                 # prompt + max_tokens must fit in it


@dataclass(frozen=True)
class Health:
    status: str
    model: str
