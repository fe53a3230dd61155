"""GPT2Tokenizer: exact GPT-2 encoding, lossless decoding, streaming, offsets, file discovery."""

from __future__ import annotations

import json
import random
import shutil

import pytest
import regex

from gpt2jax.tokenizer import GPT2Tokenizer, bytes_to_unicode

TEXTS = [
    "",
    "Hello, world!",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\r\nwindows\r\n\r\nend",
    " " * 50 + "x" + "\n" * 20 + "\t \t  \n",
    "It's we'll they've I'm you'd she'LL don't",
    "numbers 1234567890 3.14159 1e-10 ٣٤٥ Ⅻ",
    "emoji 😀👍🏽 family 👨‍👩‍👧‍👦 flags 🇯🇵🇺🇸 🏳️‍🌈 keycap 1️⃣",
    "CJK 漢字かなカナ 한국어 𠜎",
    "combining e\u0301 a\u0308 Z\u0351\u0352\u0353\u0354",
    "RTL עברית العربية \u200f mixed \u202eevil",
    "control \x00\x01\x07\x1b[31m\x7f\x85 and \u2028\u2029 separators",
    "astral 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 \U0010ffff",
    "\ufeffBOM, a real \ufffd, nbsp\u00a0here",
    "def f(x):\n    return x ** 2  # comment\n",
]
EOS_TEXTS = ["<|endoftext|>", "a<|endoftext|>b", "<|endoftext|><|endoftext|> x\n<|endoftext|>"]


@pytest.fixture(scope="module")
def hf_tok(tokenizer_dir):
    from transformers import GPT2TokenizerFast

    return GPT2TokenizerFast.from_pretrained(str(tokenizer_dir), local_files_only=True)


# OpenAI's encoder.py, condensed: the definition of GPT-2's encoding, to check the Rust BPE against.
GPT2_PATTERN = regex.compile(
    r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
)


def reference_encode(text: str, vocab: dict[str, int], ranks: dict[tuple[str, str], int]) -> list[int]:
    byte_enc = bytes_to_unicode()
    ids = []
    for piece in GPT2_PATTERN.findall(text):
        word = [byte_enc[b] for b in piece.encode("utf-8")]
        while len(word) > 1:
            best = min(zip(word, word[1:], strict=False), key=lambda p: ranks.get(p, float("inf")))
            if best not in ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        ids.extend(vocab[t] for t in word)
    return ids


def corpus_sample() -> str:
    from conftest import corpus_texts

    return "\n".join(corpus_texts()[:40])


def test_vocab_and_eos(tok, tokenizer_dir):
    vocab = json.loads((tokenizer_dir / "vocab.json").read_text())
    assert tok.vocab_size == len(vocab)
    assert tok.eos_token_id == vocab["<|endoftext|>"] == len(vocab) - 1


@pytest.mark.parametrize("text", TEXTS + EOS_TEXTS)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert all(isinstance(i, int) and 0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_endoftext_is_one_special_token(tok):
    ids = tok.encode("a<|endoftext|>b")
    assert ids.count(tok.eos_token_id) == 1
    assert ids == tok.encode("a") + [tok.eos_token_id] + tok.encode("b")
    # Not merely the characters of the marker: a lookalike is split normally.
    assert tok.eos_token_id not in tok.encode("<|endoftext |>")


def test_matches_transformers(tok, hf_tok):
    for text in [*TEXTS, *EOS_TEXTS, corpus_sample()]:
        assert tok.encode(text) == hf_tok.encode(text), text[:40]


def test_matches_openai_reference_bpe(tok, tokenizer_dir):
    vocab = json.loads((tokenizer_dir / "vocab.json").read_text())
    lines = (tokenizer_dir / "merges.txt").read_text(encoding="utf-8").split("\n")[1:]
    ranks = {tuple(line.split()): r for r, line in enumerate(lines) if line}
    for text in [*TEXTS, corpus_sample()]:
        assert tok.encode(text) == reference_encode(text, vocab, ranks), text[:40]


def test_openai_file_names_and_from_files(tok, tokenizer_dir, tmp_path):
    shutil.copy(tokenizer_dir / "vocab.json", tmp_path / "encoder.json")
    shutil.copy(tokenizer_dir / "merges.txt", tmp_path / "vocab.bpe")
    openai_tok = GPT2Tokenizer.from_dir(tmp_path)
    files_tok = GPT2Tokenizer.from_files(tokenizer_dir / "vocab.json", tokenizer_dir / "merges.txt")
    for text in TEXTS + EOS_TEXTS:
        assert openai_tok.encode(text) == files_tok.encode(text) == tok.encode(text)


def test_tokenizer_json(tok, hf_tok, tmp_path):
    hf_tok.backend_tokenizer.save(str(tmp_path / "tokenizer.json"))
    json_tok = GPT2Tokenizer.from_dir(tmp_path)
    assert (json_tok.vocab_size, json_tok.eos_token_id) == (tok.vocab_size, tok.eos_token_id)
    for text in TEXTS + EOS_TEXTS:
        assert json_tok.encode(text) == tok.encode(text)
        assert json_tok.decode(json_tok.encode(text)) == text


def test_missing_files_name_folder_and_expected_files(tmp_path):
    expected = r"vocab\.json \+ merges\.txt.*encoder\.json \+ vocab\.bpe.*tokenizer\.json"
    with pytest.raises(FileNotFoundError, match=expected) as e:
        GPT2Tokenizer.from_dir(tmp_path)
    assert str(tmp_path) in str(e.value)
    (tmp_path / "vocab.json").write_text("{}")  # half a pair is not enough
    with pytest.raises(FileNotFoundError, match="merges.txt"):
        GPT2Tokenizer.from_dir(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such folder"):
        GPT2Tokenizer.from_dir(tmp_path / "absent")


def test_malformed_files(tmp_path):
    (tmp_path / "vocab.json").write_text("not json")
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    with pytest.raises(ValueError, match="not a GPT-2 vocab and merges pair"):
        GPT2Tokenizer.from_dir(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such file"):
        GPT2Tokenizer.from_files(tmp_path / "vocab.json", tmp_path / "absent.txt")


def test_rejects_non_byte_level_tokenizer_json(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    wordpiece = Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    wordpiece.pre_tokenizer = pre_tokenizers.Whitespace()
    wordpiece.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match="byte-level BPE"):
        GPT2Tokenizer.from_dir(tmp_path)


def test_bad_ids(tok):
    for bad in (-1, tok.vocab_size, 10**9):
        with pytest.raises(ValueError, match="not in the vocabulary"):
            tok.decode([0, bad])


def test_token_bytes_and_str(tok):
    text = "héllo 😀"
    ids = tok.encode(text)
    assert b"".join(tok.token_bytes(i) for i in ids) == text.encode("utf-8")
    # The tiny vocab has no emoji merges: 😀 is four one-byte tokens, none of them whole UTF-8.
    emoji_ids = ids[-4:]
    assert [tok.token_bytes(i) for i in emoji_ids] == [bytes([b]) for b in "😀".encode()]
    assert tok.token_str(emoji_ids[0]) == "bytes:\\xf0"
    assert tok.token_str(emoji_ids[0], errors="replace") == "\ufffd"
    assert tok.token_str(tok.encode(" hello")[0]) == tok.decode(tok.encode(" hello")[:1])
    assert tok.token_str(tok.eos_token_id) == "<|endoftext|>"
    # OpenAI's own example: the first two bytes of a three-byte character such as "\u2019".
    two_bytes = next(i for i in range(tok.vocab_size) if tok.token_bytes(i) == b"\xe2\x80")
    assert tok.token_str(two_bytes) == "bytes:\\xe2\\x80"


def test_streaming_token_by_token_never_splits_a_character(tok):
    for text in TEXTS + EOS_TEXTS:
        ids = tok.encode(text)
        dec = tok.incremental_decoder()
        chunks = [dec.push(i) for i in ids]
        assert dec.flush() == ""
        assert "".join(chunks) == text
        if "\ufffd" not in text:
            assert not any("\ufffd" in c for c in chunks), text
    # The hard case really occurs: some tokens of the emoji text are not whole characters.
    ids = tok.encode(TEXTS[7])
    assert any(not _is_utf8(tok.token_bytes(i)) for i in ids)


def test_streaming_holds_back_and_flushes(tok):
    ids = tok.encode("😀")
    dec = tok.incremental_decoder()
    assert dec.push(ids[:2]) == ""
    assert dec.pending == "😀".encode()[:2]
    assert dec.flush() == "\ufffd"  # never completed
    assert dec.pending == b""
    assert dec.push(ids) == "😀"  # reusable after flush


def test_streaming_matches_decode_on_random_ids(tok):
    rng = random.Random(0)
    for _ in range(50):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 60))]
        dec = tok.incremental_decoder()
        out, i = [], 0
        while i < len(ids):
            n = rng.randrange(1, 4)
            out.append(dec.push(ids[i : i + n]))
            i += n
        out.append(dec.flush())
        assert "".join(out) == tok.decode(ids)


def slow_offsets(tok, ids):
    # The character holding token i's first byte is the last one of the text decoded up to that byte.
    offsets, prefix = [], b""
    for i in ids:
        raw = tok.token_bytes(i)
        offsets.append(len((prefix + raw[:1]).decode("utf-8", errors="replace")) - 1)
        prefix += raw
    return offsets


def test_text_offsets(tok):
    text = "ab 😀 c\r\n漢字"
    ids = tok.encode(text)
    offsets = tok.text_offsets(ids)
    assert offsets == slow_offsets(tok, ids)
    emoji_at = text.index("😀")
    emoji_bytes = {bytes([b]) for b in "😀".encode()}
    emoji_tokens = [k for k, i in enumerate(ids) if tok.token_bytes(i) in emoji_bytes]
    assert [offsets[k] for k in emoji_tokens] == [emoji_at] * 4
    for k, i in enumerate(ids):  # whole tokens start exactly where their text is
        if _is_utf8(tok.token_bytes(i)):
            assert text[offsets[k] :].startswith(tok.token_str(i))
    assert tok.text_offsets(ids, start=7) == [o + 7 for o in offsets]
    assert tok.text_offsets([]) == []


def test_text_offsets_after_invalid_bytes(tok):
    byte_id = {tok.token_bytes(i): i for i in range(tok.vocab_size)}
    ids = [byte_id[b"\xe2"], byte_id[b"A"], byte_id[b"\xe2"], byte_id[b"\xf0"], byte_id[b"\x80"]]
    assert tok.decode(ids) == "\ufffdA\ufffd\ufffd\ufffd"
    assert tok.text_offsets(ids) == [0, 1, 2, 3, 4]
    rng = random.Random(1)
    for _ in range(30):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 40))]
        assert tok.text_offsets(ids) == slow_offsets(tok, ids)


def test_long_input(tok):
    text = corpus_sample() * 3
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert len(tok.text_offsets(ids)) == len(ids)


def _is_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True
