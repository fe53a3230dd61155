"""benchmarks/bench_llamacpp.py's offline pieces: the converter's n_ctx, llama.cpp's outputs parsed, the table.

Nothing here builds or runs llama.cpp; the outputs below are in the shapes its tools print.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_llamacpp import UNAVAILABLE, Row, format_table  # noqa: E402
from benchmarks.llamacpp import ensure_n_ctx, parse_batched_bench, parse_llama_bench, repack_off  # noqa: E402


def test_ensure_n_ctx_adds_it_from_n_positions_once(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_positions": 1024}))
    assert ensure_n_ctx(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text()) == {
        "model_type": "gpt2",
        "n_positions": 1024,
        "n_ctx": 1024,
    }
    assert not ensure_n_ctx(tmp_path)


def test_ensure_n_ctx_keeps_a_given_value(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"n_positions": 1024, "n_ctx": 512}))
    assert not ensure_n_ctx(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["n_ctx"] == 512


def test_parse_llama_bench_json():
    out = json.dumps([{"model_type": "gpt2 0.1B F32", "n_gen": 128, "avg_ts": 36.8, "samples_ts": [36.8]}])
    assert parse_llama_bench(out) == 36.8
    with pytest.raises(ValueError, match="one llama-bench test"):
        parse_llama_bench("[]")


def test_parse_batched_bench_jsonl():
    out = (
        "main: n_kv_max = 1344\n"
        '{"n_kv_max": 1344, "n_batch": 2048, "n_ubatch": 512, "flash_attn": -1, "is_pp_shared": 0}\n'
        '{"pp": 32, "tg": 128, "pl": 8, "n_kv": 1280, "t_pp": 0.5, "speed_pp": 512.0, '
        '"t_tg": 6.9, "speed_tg": 147.6, "t": 7.4, "speed": 172.9}\n'
    )
    assert parse_batched_bench(out) == 147.6
    with pytest.raises(ValueError, match="one llama-batched-bench row"):
        parse_batched_bench("no rows\n")


def test_repack_is_off_only_for_q8_0():
    assert repack_off("q8_0") == ["--no-repack"]
    assert repack_off("q8_0", ("--repack", "0")) == ["--repack", "0"]
    assert repack_off("f32") == repack_off("f16") == []


def test_table_medians_ranges_ratios_and_missing_sides():
    rows = [
        Row("batch 1 fp32", ours=[38.0, 40.0, 39.0], theirs=[36.0, 37.0, 35.0]),
        Row("batch 1 int8", ours=UNAVAILABLE, theirs=[70.0]),
        Row("first token ms", ours=[500.0], theirs=[250.0], higher=False, fmt="{:.0f}"),
        Row("not run"),
    ]
    assert format_table(rows).splitlines() == [
        "| race | gpt2jax | llama.cpp | gpt2jax / llama.cpp |",
        "|---|---|---|---|",
        "| batch 1 fp32 | 39.0 (38.0-40.0) | 36.0 (35.0-37.0) | 1.08x |",
        f"| batch 1 int8 | {UNAVAILABLE} | 70.0 | - |",
        "| first token ms (lower is better) | 500 | 250 | 2.00x |",
        "| not run | - | - | - |",
    ]
