"""Training data: documents, held-out splits, windows."""

from __future__ import annotations

import numpy as np

from gpt2jax import data


def test_documents_split_at_endoftext_and_end_with_eos(tmp_path, tok):
    (tmp_path / "a.txt").write_text("first doc<|endoftext|>\nsecond doc\n<|endoftext|>  \n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("third doc")
    (tmp_path / "skip.bin").write_bytes(b"\xff\xfe")
    docs = data.read_documents([tmp_path])
    assert docs == ["first doc", "second doc", "third doc"]
    tokens = data.tokenize_documents(docs, tok)
    assert all(t[-1] == tok.eos_token_id and tok.eos_token_id not in t[:-1] for t in tokens)


def test_heldout_is_whole_documents_about_the_fraction():
    docs = [np.full(n, i, np.int32) for i, n in enumerate([100, 50, 30, 20, 400, 25, 60, 80, 45, 190])]
    train_tokens, heldout = data.split_heldout(docs, 0.1, seed=0)
    held = set(np.unique(heldout))
    assert held and not held & set(np.unique(train_tokens))  # whole documents, no overlap
    assert 0.05 <= len(heldout) / 1000 <= 0.15
    # One document: its tail is held out.
    train_tokens, heldout = data.split_heldout([np.arange(100, dtype=np.int32)], 0.1, seed=0)
    assert list(heldout) == list(range(90, 100)) and len(train_tokens) == 90


def test_windows_are_a_pure_function_of_the_sample_index():
    tokens = np.arange(1000, dtype=np.int32)
    w = data.Windows(tokens, seq_len=16, seed=3)
    batch = w.batch(5, (2, 4))
    assert batch.shape == (2, 4, 17)
    np.testing.assert_array_equal(np.diff(batch, axis=-1), 1)  # contiguous slices of the stream
    again = data.Windows(tokens, seq_len=16, seed=3).batch(9, (1, 4))
    np.testing.assert_array_equal(batch[1], again[0])
    # One epoch visits every window once.
    epoch = w.batch(0, (w.per_epoch,))
    assert len(np.unique(epoch[:, 0] % 16)) == 1 and len(np.unique(epoch[:, 0])) == w.per_epoch
