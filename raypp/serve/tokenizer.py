"""Text <-> token ids for the serve layer, and the checkpoint's chat template.

Uses the `tokenizers` library on `tokenizer.json` (transformers is a test-only
dependency) and renders `chat_template` from `tokenizer_config.json` the way
transformers' `apply_chat_template` does: a sandboxed jinja2 environment with
trim_blocks/lstrip_blocks, `raise_exception`, `tojson`, `strftime_now`, and the
special tokens as variables.  The rendered prompt already holds its special tokens,
so it is encoded without adding them again (again as transformers does).
"""
from __future__ import annotations

import datetime
import json
from pathlib import Path

from raypp.errors import CheckpointError


def _token_text(v) -> str | None:
    """tokenizer_config stores special tokens as "..." or {"content": "...", ...} (AddedToken)."""
    if isinstance(v, dict):
        return v.get("content")
    return v


class ChatTemplateError(ValueError):
    """The template rejected the conversation (e.g. its `raise_exception('roles must alternate')`)."""


class Tokenizer:
    def __init__(self, model_dir: str | Path):
        from tokenizers import Tokenizer as HFTokenizer

        model_dir = Path(model_dir)
        tok_file = model_dir / "tokenizer.json"
        if not tok_file.is_file():
            raise CheckpointError(f"{model_dir}: no tokenizer.json; raypp's server needs a fast-tokenizer file")
        self._tok = HFTokenizer.from_file(str(tok_file))
        cfg_file = model_dir / "tokenizer_config.json"
        cfg = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
        self.specials = {k: _token_text(cfg.get(k)) for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
        template = cfg.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template}
            template = named.get("default") or next(iter(named.values()), None)
        self._template_src = template
        self._template = None
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

    # ---- ids ----------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_text(self, token_id: int) -> str:
        """One token as text (for logprobs); partial UTF-8 shows as U+FFFD."""
        return self._tok.decode([token_id], skip_special_tokens=False)

    # ---- chat ---------------------------------------------------------------------------
    @property
    def has_chat_template(self) -> bool:
        return bool(self._template_src)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        if self._template is None:
            self._template = _compile(self._template_src)
        try:
            text = self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         **self.specials)
        except ChatTemplateError:
            raise
        except Exception as e:  # a template bug or a message shape it cannot take
            raise ChatTemplateError(f"the model's chat template failed on these messages: {e}") from e
        return self.encode(text, add_special_tokens=False)


def _compile(source: str):
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise ChatTemplateError(f"the model's chat template rejected the messages: {message}")

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env.from_string(source)
