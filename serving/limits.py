"""Prompt length bound before tokenizing: a text too long for the context is refused without the work.

Tokenizing runs on the event loop and holds the GIL (about 1 s for 2 MB of text), so a body of a few MB
would stall every other client. No token covers more than the vocabulary's longest token (in bytes, at
least as many as characters), so a text of more than n_ctx x that many characters is sure to have more
than n_ctx tokens: it cannot fit, and is refused (or, on the legacy routes that keep a prompt's end,
cut to that many last characters) before it is tokenized.
"""

from __future__ import annotations

import weakref

from gpt2jax.engine.api import Engine
from gpt2jax.tokenizer import GPT2Tokenizer
from serving.errors import APIError, invalid

_LONGEST: weakref.WeakKeyDictionary[GPT2Tokenizer, int] = weakref.WeakKeyDictionary()


def longest_token_bytes(tok: GPT2Tokenizer) -> int:
    """Bytes of the vocabulary's longest token (<|endoftext|>'s text included), computed once."""
    if tok not in _LONGEST:
        _LONGEST[tok] = max(len(tok.token_bytes(i)) for i in range(tok.vocab_size))
    return _LONGEST[tok]


def max_prompt_chars(engine: Engine) -> int:
    """The most characters a prompt can have and still fit the engine's context."""
    return engine.n_ctx * longest_token_bytes(engine.tokenizer)


def prompt_too_long(
    param: str, chars: int, engine: Engine, code: str = "context_length_exceeded"
) -> APIError:
    limit = max_prompt_chars(engine)
    return invalid(
        param,
        f"{param} has {chars} characters, more than this model's context of {engine.n_ctx} tokens can hold "
        f"(at most {limit} characters)",
        code=code,
    )


def check_prompt_text(text: str, engine: Engine, param: str, code: str = "context_length_exceeded") -> None:
    if len(text) > max_prompt_chars(engine):
        raise prompt_too_long(param, len(text), engine, code)


def keep_tail(text: str, engine: Engine) -> str:
    """For prompts that keep their last tokens: the last max_prompt_chars characters, which hold more
    tokens than the context anyway (only the first of them may differ from tokenizing the whole)."""
    limit = max_prompt_chars(engine)
    return text[-limit:] if len(text) > limit else text
