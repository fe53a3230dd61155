"""Training text: files or folders -> documents -> token streams, a held-out split and fixed-length windows.

Documents are whole files, or the pieces of a file between literal "<|endoftext|>" markers (the convention
of OpenAI's GPT-2 data dumps). In the token stream each document is followed by the end-of-text token, as in
GPT-2's own training data, so the model learns where documents end.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from gpt2jax.tokenizer import GPT2Tokenizer

EOS_TOKEN = "<|endoftext|>"
# Files a folder contributes; other files (binaries, caches) are skipped.
TEXT_SUFFIXES = (".txt", ".text", ".md", ".rst")


def text_files(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """The files named, plus the text files (TEXT_SUFFIXES, not hidden) under any folder named, sorted."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = [
                f
                for f in p.rglob("*")
                if f.is_file()
                and f.suffix.lower() in TEXT_SUFFIXES
                and not any(part.startswith(".") for part in f.relative_to(p).parts)
            ]
            files += sorted(found)
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such file or folder")
    if not files:
        raise ValueError(f"no text files ({', '.join(TEXT_SUFFIXES)}) in {', '.join(map(str, paths))}")
    return files


def split_documents(text: str) -> list[str]:
    """The non-blank documents of a text, split at literal "<|endoftext|>" markers and stripped."""
    return [d.strip() for d in text.split(EOS_TOKEN) if d.strip()]


def read_documents(paths: Sequence[str | os.PathLike]) -> list[str]:
    """All documents of the given files and folders, in a stable order."""
    docs: list[str] = []
    for f in text_files(paths):
        try:
            docs += split_documents(f.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise ValueError(f"{f}: not UTF-8 text ({e})") from e
    return docs


def tokenize_documents(docs: Sequence[str], tokenizer: GPT2Tokenizer) -> list[np.ndarray]:
    """Each document's token ids followed by the end-of-text token, as int32 arrays."""
    eos = tokenizer.eos_token_id
    return [np.array([*tokenizer.encode(d), eos], np.int32) for d in docs]


def choose_heldout(lengths: Sequence[int], fraction: float, seed: int) -> list[int]:
    """Indices of documents to hold out: a seeded random pick holding about `fraction` of all tokens.

    A document that would take the held-out share past 1.5x `fraction` is passed over, so one huge
    document cannot swallow the held-out split; at least one document always stays for training. Returns
    [] when no document fits (e.g. there is only one): `split_heldout` then holds out the stream's tail.
    """
    total = sum(lengths)
    target = fraction * total
    chosen: list[int] = []
    held = 0
    for i in np.random.default_rng(seed).permutation(len(lengths)):
        if held >= target or len(chosen) == len(lengths) - 1:
            break
        if held + lengths[i] <= 1.5 * target:
            chosen.append(int(i))
            held += lengths[i]
    return sorted(chosen)


def split_heldout(docs: Sequence[np.ndarray], fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train stream, held-out stream) of tokenized documents, held out by document (see choose_heldout)."""
    if fraction <= 0:
        return np.concatenate(docs), np.zeros(0, np.int32)
    held = set(choose_heldout([len(d) for d in docs], fraction, seed))
    if held:
        train = np.concatenate([d for i, d in enumerate(docs) if i not in held])
        return train, np.concatenate([d for i, d in enumerate(docs) if i in held])
    stream = np.concatenate(docs)
    cut = len(stream) - max(1, int(round(fraction * len(stream))))
    return stream[:cut], stream[cut:]


def fingerprint(tokens: np.ndarray) -> str:
    """A short hash of a token stream: resuming checks that the data is the same as before."""
    return hashlib.sha256(np.ascontiguousarray(tokens, np.int32).tobytes()).hexdigest()[:16]


class Windows:
    """Training samples: windows of seq_len + 1 tokens of a stream (inputs and their next tokens).

    Each epoch cuts the stream at a fresh random offset into non-overlapping windows and visits them in a
    fresh random order. Sample i is a pure function of (seed, i), so the data position a resumed run
    continues from is just the number of samples consumed.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, seed: int) -> None:
        if len(tokens) < seq_len + 1:
            raise ValueError(f"{len(tokens)} training tokens is fewer than one window of {seq_len + 1}")
        self.tokens = np.asarray(tokens, np.int32)
        self.seq_len = seq_len
        self.seed = seed
        self.per_epoch = (len(tokens) - 1) // seq_len
        # Tokens left over after per_epoch windows: the range of each epoch's random offset.
        self.slack = len(tokens) - 1 - self.per_epoch * seq_len
        self._epoch: tuple[int, int, np.ndarray] | None = None  # (epoch, offset, order), last one used

    def _order(self, epoch: int) -> tuple[int, np.ndarray]:
        if self._epoch is None or self._epoch[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            offset = int(rng.integers(0, self.slack + 1))
            self._epoch = (epoch, offset, rng.permutation(self.per_epoch))
        return self._epoch[1], self._epoch[2]

    def batch(self, first: int, shape: tuple[int, ...]) -> np.ndarray:
        """Samples first, first+1, ... as an int32 array of shape (*shape, seq_len + 1)."""
        count = int(np.prod(shape))
        out = np.empty((count, self.seq_len + 1), np.int32)
        for k, i in enumerate(range(first, first + count)):
            offset, order = self._order(i // self.per_epoch)
            start = offset + int(order[i % self.per_epoch]) * self.seq_len
            out[k] = self.tokens[start : start + self.seq_len + 1]
        return out.reshape(*shape, self.seq_len + 1)


def eval_windows(tokens: np.ndarray, seq_len: int, max_windows: int) -> np.ndarray:
    """Up to max_windows non-overlapping (seq_len + 1)-token windows from the start of a held-out stream.

    A stream shorter than one window gives a single shorter window.
    """
    n = min(max_windows, (len(tokens) - 1) // seq_len)
    if n == 0:
        return np.asarray(tokens, np.int32)[None, :]
    return np.stack([tokens[i * seq_len : i * seq_len + seq_len + 1] for i in range(n)]).astype(np.int32)


def unigram_loss(train: np.ndarray, targets: np.ndarray, vocab_size: int) -> float:
    """Cross-entropy (nats/token) on `targets` of add-one smoothed token frequencies counted on `train`.

    The baseline a language model must beat: it knows which tokens are common but nothing of context.
    """
    counts = np.bincount(np.asarray(train).ravel(), minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[np.asarray(targets).ravel()].mean())
