"""Generated token ids -> text deltas, cut at the first stop string.

Decoding each new token alone is wrong in two ways: a multi-byte character split over
two byte-level tokens decodes to U+FFFD, and SentencePiece-style decoders drop a
token's leading space when it starts the decoded span.  So (as vLLM does) each step
decodes a short window of already-emitted tokens plus the new ones and emits only what
the window did not already show, and waits while the text ends in U+FFFD.

Stop strings are matched on the text, not the tokens (one stop string may span several
tokens).  Text that could still become a stop string is held back, so a client never
sees part of a stop sequence; OpenAI's semantics drop the stop string itself.
"""
from __future__ import annotations

from raypp.serve.tokenizer import Tokenizer

_WINDOW = 5   # tokens of context before the unread ones: enough for spacing and byte merges


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int]):
        self._tok = tokenizer
        # The prompt's tail is context only (it may end mid-word); it is never emitted.
        self._ids = list(prompt_ids[-_WINDOW:])
        self._prefix = 0
        self._read = len(self._ids)

    def step(self, new_ids: list[int], final: bool = False) -> str:
        self._ids.extend(new_ids)
        prefix_text = self._tok.decode(self._ids[self._prefix:self._read])
        text = self._tok.decode(self._ids[self._prefix:])
        if len(text) <= len(prefix_text) or (text.endswith("\ufffd") and not final):
            return ""  # nothing visible yet, or an incomplete UTF-8 sequence
        delta = text[len(prefix_text):]
        self._prefix = max(self._read, len(self._ids) - _WINDOW)
        self._read = len(self._ids)
        return delta


class TextStream:
    """Accumulates a choice's text; `feed` returns (text safe to send now, stopped at a stop string)."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], stop: list[str]):
        self._detok = IncrementalDetokenizer(tokenizer, prompt_ids)
        self._stop = stop
        self._max_stop = max((len(s) for s in stop), default=0)
        self.text = ""        # everything decoded so far (cut at a stop string once found)
        self._sent = 0        # characters of self.text already handed out

    def feed(self, new_ids: list[int], final: bool = False) -> tuple[str, bool]:
        before = len(self.text)
        self.text += self._detok.step(new_ids, final=final)
        if self._stop:
            start = max(0, before - self._max_stop + 1)   # a match may straddle the old end
            hits = [p for p in (self.text.find(s, start) for s in self._stop) if p >= 0]
            if hits:
                self.text = self.text[:min(hits)]
                return self._take(len(self.text)), True
        if final:
            return self._take(len(self.text)), False
        return self._take(len(self.text) - self._held_back()), False

    def _held_back(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of some stop string."""
        for k in range(min(self._max_stop - 1, len(self.text) - self._sent), 0, -1):
            tail = self.text[-k:]
            if any(s.startswith(tail) for s in self._stop):
                return k
        return 0

    def _take(self, upto: int) -> str:
        upto = max(upto, self._sent)
        out = self.text[self._sent:upto]
        self._sent = upto
        return out
