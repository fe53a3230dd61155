"""GPT-2's byte-level BPE tokenizer, loaded from local files only.

Encoding runs in the `tokenizers` library (Rust) set up exactly as GPT-2 is: byte-level pre-tokenizer with
GPT-2's regex and no prefix space, plain BPE, and <|endoftext|> matched as a special token in the text.
Decoding is done here from each token's raw bytes, so that partial UTF-8 characters can be held back while
streaming and text offsets can be computed.
"""

from __future__ import annotations

import codecs
import json
import numbers
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

EOS_TOKEN = "<|endoftext|>"

# Pairs of (vocab, merges) file names, same formats: Hugging Face's names, then OpenAI's originals.
VOCAB_MERGES_NAMES = (("vocab.json", "merges.txt"), ("encoder.json", "vocab.bpe"))


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's table from each byte to a printable character, as in OpenAI's encoder.py.

    Printable Latin-1 bytes map to themselves; the other 68 go to chr(256 + n) in byte order.
    """
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = list(bs)
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


_BYTE_OF_CHAR = {c: b for b, c in bytes_to_unicode().items()}
_TO_LATIN1 = str.maketrans({c: chr(b) for c, b in _BYTE_OF_CHAR.items()})


def _unicode_to_bytes(token: str) -> bytes:
    try:  # every char in GPT-2's table: one byte each (str.translate: ~10x a char-by-char join)
        return token.translate(_TO_LATIN1).encode("latin-1")
    except UnicodeEncodeError:  # a char outside it can only come from a foreign vocab: keep its UTF-8
        return b"".join(bytes([_BYTE_OF_CHAR[c]]) if c in _BYTE_OF_CHAR else c.encode("utf-8") for c in token)


class GPT2Tokenizer:
    """GPT-2's tokenizer: text <-> token ids, plus per-token bytes for streaming and logprobs."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        """Wraps a `tokenizers.Tokenizer` that is set up as GPT-2's (see `from_files`)."""
        if not _is_special(tokenizer, EOS_TOKEN):
            # Adding an id already in the vocab keeps that id; it only makes "<|endoftext|>" in text match.
            tokenizer.add_special_tokens([AddedToken(EOS_TOKEN, special=True, normalized=False)])
        self._tok = tokenizer
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        added = {t.content for t in tokenizer.get_added_tokens_decoder().values()}
        self._bytes: list[bytes | None] = [None] * (max(vocab.values()) + 1)
        for token, i in vocab.items():
            # Added tokens are stored as plain text, vocab tokens in GPT-2's byte<->unicode alphabet.
            self._bytes[i] = token.encode("utf-8") if token in added else _unicode_to_bytes(token)
        self.vocab_size: int = len(vocab)
        self.eos_token_id: int = tokenizer.token_to_id(EOS_TOKEN)

    @classmethod
    def from_files(cls, vocab_path: str | os.PathLike, merges_path: str | os.PathLike) -> GPT2Tokenizer:
        """From vocab.json + merges.txt (or OpenAI's encoder.json + vocab.bpe: same formats)."""
        try:
            vocab, merges = models.BPE.read_file(str(vocab_path), str(merges_path))
        except Exception as e:  # the Rust side raises a bare Exception for missing or malformed files
            if not (os.path.isfile(vocab_path) and os.path.isfile(merges_path)):
                raise FileNotFoundError(f"{vocab_path} or {merges_path}: no such file") from e
            raise ValueError(f"{vocab_path} + {merges_path}: not a GPT-2 vocab and merges pair ({e})") from e
        # The settings transformers' GPT2TokenizerFast uses; GPT-2 itself has no unk token and no dropout.
        tok = Tokenizer(
            models.BPE(vocab, merges, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False)
        )
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        return cls(tok)

    @classmethod
    def from_tokenizer_json(cls, path: str | os.PathLike) -> GPT2Tokenizer:
        """From a Hugging Face tokenizer.json, which must describe a byte-level BPE."""
        with open(path, encoding="utf-8") as f:
            spec = json.load(f)
        model = (spec.get("model") or {}).get("type")
        if model != "BPE" or "ByteLevel" not in json.dumps(spec.get("pre_tokenizer")):
            raise ValueError(f"{path}: not a GPT-2 style byte-level BPE tokenizer (model type {model!r})")
        return cls(Tokenizer.from_file(str(path)))

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> GPT2Tokenizer:
        """From a folder with vocab.json+merges.txt, encoder.json+vocab.bpe (OpenAI) or tokenizer.json."""
        folder = Path(path)
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: no such folder (expected a GPT-2 tokenizer folder)")
        for vocab_name, merges_name in VOCAB_MERGES_NAMES:
            if (folder / vocab_name).is_file() and (folder / merges_name).is_file():
                return cls.from_files(folder / vocab_name, folder / merges_name)
        if (folder / "tokenizer.json").is_file():
            return cls.from_tokenizer_json(folder / "tokenizer.json")
        expected = " or ".join(f"{v} + {m}" for v, m in VOCAB_MERGES_NAMES) + " or tokenizer.json"
        raise FileNotFoundError(f"{folder}: no GPT-2 tokenizer files found (expected {expected})")

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; "<|endoftext|>" in the text becomes the end-of-text token."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes a token stands for (may be part of a UTF-8 character)."""
        i = int(token_id)
        raw = self._bytes[i] if 0 <= i < len(self._bytes) else None
        if raw is None:
            raise ValueError(f"token id {token_id} is not in the vocabulary (size {self.vocab_size})")
        return raw

    def _join(self, ids: Iterable[int] | int) -> bytes:
        if isinstance(ids, numbers.Integral):
            ids = [ids]
        return b"".join([self.token_bytes(i) for i in ids])

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; bytes that are not valid UTF-8 become U+FFFD (GPT-2's errors="replace")."""
        return self._join(ids).decode("utf-8", errors="replace")

    def decode_complete(self, ids: Iterable[int]) -> tuple[str, bytes]:
        """Text of `ids` up to an unfinished last character, and that character's bytes (b"" if none).

        A token-id prompt may end inside a character that the completion finishes ([447] + [247] is
        "\u2019"): the completion's text starts from these bytes.
        """
        utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        text = utf8.decode(self._join(ids))
        return text, utf8.getstate()[0]

    def token_str(self, token_id: int, *, errors: Literal["bytes", "replace"] = "bytes") -> str:
        """A token as text for OpenAI's logprobs `tokens` / `top_logprobs` keys.

        A token that is not whole UTF-8 (half an emoji, say) is shown the way OpenAI's legacy API shows
        it: "bytes:" then the text with each undecodable byte escaped, e.g. "bytes:\\xe2\\x80" (a literal
        backslash, x, two hex digits). errors="replace" gives U+FFFD for those bytes instead.
        """
        raw = self.token_bytes(token_id)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            if errors == "replace":
                return raw.decode("utf-8", errors="replace")
            return "bytes:" + raw.decode("utf-8", errors="backslashreplace")

    def text_offsets(self, ids: Iterable[int], start: int = 0, pending: bytes = b"") -> list[int]:
        """Character offset in `decode(ids)` where each token starts, plus `start` (OpenAI's text_offset).

        A token that begins inside a multi-byte character gets that character's offset. `pending`: bytes
        of an unfinished character before `ids` (see `decode_complete`), which starts at `start`.
        O(len(ids)).
        """
        utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        utf8.setstate((pending, 0))
        offsets = []
        n = start  # characters emitted so far
        for i in ids:
            raw = self.token_bytes(i)
            held = len(utf8.getstate()[0])  # bytes of an unfinished character from earlier tokens
            head = utf8.decode(raw[:1])
            now_held = len(utf8.getstate()[0])
            continues = now_held == held + 1 or (len(head) == 1 and now_held == 0)
            # If the held bytes were an invalid start, they are flushed as one U+FFFD before this token.
            offsets.append(n + 1 if held and not continues else n)
            n += len(head) + len(utf8.decode(raw[1:]))
        return offsets

    def incremental_decoder(self, pending: bytes = b"") -> IncrementalDecoder:
        """A decoder for streaming: feed it ids as they are sampled, get back finished text.

        pending: bytes of an unfinished character that the first ids may complete (see decode_complete).
        """
        return IncrementalDecoder(self, pending)


def _is_special(tokenizer: Tokenizer, content: str) -> bool:
    return any(t.content == content for t in tokenizer.get_added_tokens_decoder().values())


class IncrementalDecoder:
    """Streams text from token ids, never emitting half a UTF-8 character.

    Incomplete trailing bytes are held back until a later token completes them; `flush` ends the stream
    (bytes that never completed become U+FFFD). All pushes plus flush equal `decode` of all the ids.
    """

    def __init__(self, tokenizer: GPT2Tokenizer, pending: bytes = b"") -> None:
        self._tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._utf8.setstate((pending, 0))

    def push(self, ids: Iterable[int] | int) -> str:
        """Adds one id or several; returns the text they completed (possibly "")."""
        return self._utf8.decode(self._tokenizer._join(ids))

    @property
    def pending(self) -> bytes:
        """Bytes held back, waiting for the rest of their character."""
        return self._utf8.getstate()[0]

    def flush(self) -> str:
        """Ends the stream: returns what was held back (as U+FFFD) and resets for reuse."""
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return text
