"""TF tensor bundles without TensorFlow: whole checkpoints read and written (the SSTable index and crc32c
have their own tests in test_sstable.py)."""

from __future__ import annotations

import base64
import os

import ml_dtypes
import numpy as np
import pytest

from gpt2jax import protowire
from gpt2jax.sstable import build_sstable
from gpt2jax.tf_checkpoint import (
    TFCheckpointError,
    TFCheckpointReader,
    latest_checkpoint,
    read_tf_checkpoint,
    write_tf_checkpoint,
)

# Written by TensorFlow 2.21 (tf.compat.v1 Saver, then tf.train.Checkpoint for tf2/), so that TF
# compatibility stays tested without TF installed. The values are the EXPECTED_TF ones below.
TF_FILES = {
    "model.ckpt.index": (
        "AAAGCAEaAggBAAQPYmYxNggOEgQSAggCKAQ1LkpW8gAFEWVtcHR5CAESBhIAEgIIAiAENdjqgqIABBFoYWxmCBMSBBICCAMg"
        "BCgGNehp1BEAAw1pMzIIAxIAIAooBDWnjZ2IAQIVNjQICRIIEgIIAhICCAMgDigwNQnBEHwAFhltb2RlbC9oMC9hdHRuL2Nf"
        "YXR0bi93CAESDBICCAESAggCEgIIBiA+KDA1lJo6kAYDFXd0ZQgBEggSAggDEgIIAiBuKBg1WhPoPQAAAAABAAAAAF9kzpgA"
        "AAAAAQAAAADA8qGwAAEDbgDSAQAAAAABAAAAAFaxBDDXAQjkAQ8AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
        "V/uAiyR1R9s="
    ),
    "model.ckpt.data-00000-of-00001": (
        "wD8AwAA4AL0AQgcAAAAAAAAAAAAAAAEAAAAAAAAAAgAAAAAAAAADAAAAAAAAAAQAAAAAAAAABQAAAAAAAAAAAAAAAACAPgAA"
        "AD8AAEA/AACAPwAAoD8AAMA/AADgPwAAAEAAABBAAAAgQAAAMEAAACDAAADAvwAAAL8AAAA/AADAPwAAIEA="
    ),
    "tf2/ckpt.index": (
        "AAAGCAEaAggBABwOX0NIRUNLUE9JTlRBQkxFX09CSkVDVF9HUkFQSAgHEgAgEiiaATVjqwEXABwLcy8uQVRUUklCVVRFUy9W"
        "QVJJQUJMRV9WQUxVRQgHEgAoCjXs4MApABwRdi8uQVRUUklCVVRFUy9WQVJJQUJMRV9WQUxVRQgBEgQSAggCIAooCDVZPOU1"
        "AAAAAAEAAAAA9CPVOwAAAAABAAAAAMDyobAAAQN3AJgBAAAAAAEAAAAACTku9p0BCKoBDwAAAAAAAAAAAAAAAAAAAAAAAAAA"
        "AAAAAAAAAAAAAAAAAABX+4CLJHVH2w=="
    ),
    "tf2/ckpt.data-00000-of-00001": (
        "BdnGnENoZWxsbwAAgD8AAABAlAHa+++mChIKBQgBEgFzCgUIAhIBdioCCAEKPhI4Cg5WQVJJQUJMRV9WQUxVRRIIVmFyaWFi"
        "bGUaHHMvLkFUVFJJQlVURVMvVkFSSUFCTEVfVkFMVUUqAggBCj4SOAoOVkFSSUFCTEVfVkFMVUUSCFZhcmlhYmxlGhx2Ly5B"
        "VFRSSUJVVEVTL1ZBUklBQkxFX1ZBTFVFKgIIAQ=="
    ),
    # As TF writes it: an absolute path from the machine that saved it.
    "checkpoint": base64.b64encode(
        b'model_checkpoint_path: "/elsewhere/fx/model.ckpt"\n'
        b'all_model_checkpoint_paths: "/elsewhere/fx/model.ckpt"\n'
    ).decode(),
}

EXPECTED_TF = {
    "model/h0/attn/c_attn/w": np.arange(12, dtype=np.float32).reshape(1, 2, 6) / 4,
    "model/wte": np.arange(6, dtype=np.float32).reshape(3, 2) - 2.5,
    "half": np.array([0.5, -1.25, 3], np.float16),
    "bf16": np.array([1.5, -2.0], ml_dtypes.bfloat16),
    "i32": np.array(7, np.int32),
    "i64": np.arange(6, dtype=np.int64).reshape(2, 3),
    "empty": np.zeros((0, 2), np.float32),
}


@pytest.fixture
def tf_written(tmp_path):
    for name, b64 in TF_FILES.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(base64.b64decode(b64))
    return tmp_path


def assert_same_tensors(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for name, w in want.items():
        g = got[name]
        assert g.dtype == w.dtype, name
        assert g.shape == w.shape, name
        assert g.tobytes() == w.tobytes(), name


# --- tensor bundles ------------------------------------------------------------------------------


def sample_tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "model/wte": rng.standard_normal((7, 4)).astype(np.float32),
        "model/h0/attn/c_attn/w": rng.standard_normal((1, 4, 12)).astype(np.float32),
        "half": rng.standard_normal((2, 3)).astype(np.float16),
        "bf16": rng.standard_normal((5,)).astype(ml_dtypes.bfloat16),
        "int32 scalar": np.array(-3, np.int32),
        "int64": np.arange(-4, 8, dtype=np.int64).reshape(3, 4),
        "empty": np.zeros((0, 3), np.float32),
        "empty scalar-ish": np.zeros((2, 0, 1), np.int32),
        "f64": np.array([1.5, -2.25]),
        "u8": np.arange(4, dtype=np.uint8),
        "bool": np.array([True, False, True]),
        "big": rng.standard_normal(20000).astype(np.float32),  # crc on the vectorized path
        "unicode/ключ": np.ones(2, np.float32),
    }


def test_write_read_round_trip(tmp_path):
    tensors = sample_tensors()
    write_tf_checkpoint(tmp_path / "model.ckpt", tensors)
    assert sorted(os.listdir(tmp_path)) == [
        "checkpoint",
        "model.ckpt.data-00000-of-00001",
        "model.ckpt.index",
    ]
    assert (tmp_path / "checkpoint").read_text().startswith('model_checkpoint_path: "model.ckpt"\n')
    got = read_tf_checkpoint(latest_checkpoint(tmp_path))
    assert_same_tensors(got, tensors)
    got["model/wte"][0, 0] = 1.0  # arrays are writable, not views of a read-only buffer


def test_write_read_round_trip_small_blocks(tmp_path):
    tensors = {f"model/h{i}/mlp/c_fc/{w}": np.full((2,), i, np.float32) for i in range(40) for w in "bw"}
    write_tf_checkpoint(tmp_path / "m", tensors, block_size=200, restart_interval=4)
    assert_same_tensors(read_tf_checkpoint(tmp_path / "m"), tensors)


def test_write_non_contiguous_and_big_endian(tmp_path):
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    tensors = {"t": a.T, "be": a.astype(">f4")}
    write_tf_checkpoint(tmp_path / "m", tensors)
    got = read_tf_checkpoint(tmp_path / "m")
    np.testing.assert_array_equal(got["t"], a.T)
    np.testing.assert_array_equal(got["be"], a)
    assert got["be"].dtype == np.float32


def test_write_rejects_unsupported_dtypes(tmp_path):
    with pytest.raises(TypeError, match="'c'.*complex64"):
        write_tf_checkpoint(tmp_path / "m", {"c": np.zeros(2, np.complex64)})
    with pytest.raises(ValueError, match="reserved"):
        write_tf_checkpoint(tmp_path / "m", {"": np.zeros(2, np.float32)})


def test_reads_tensorflow_written_checkpoint(tf_written):
    prefix = latest_checkpoint(tf_written)  # the absolute path in the file does not exist here
    assert prefix == os.path.join(tf_written, "model.ckpt")
    assert_same_tensors(read_tf_checkpoint(prefix), EXPECTED_TF)


def test_writer_reproduces_tensorflow_bytes(tf_written, tmp_path):
    write_tf_checkpoint(tmp_path / "model.ckpt", EXPECTED_TF)
    for suffix in (".index", ".data-00000-of-00001"):
        assert (tmp_path / f"model.ckpt{suffix}").read_bytes() == (
            tf_written / f"model.ckpt{suffix}"
        ).read_bytes()


def test_reads_tf2_object_checkpoint_with_strings(tf_written):
    got = read_tf_checkpoint(tf_written / "tf2" / "ckpt")
    assert got["s/.ATTRIBUTES/VARIABLE_VALUE"] == b"hello"
    assert got["s/.ATTRIBUTES/VARIABLE_VALUE"].shape == ()
    np.testing.assert_array_equal(got["v/.ATTRIBUTES/VARIABLE_VALUE"], np.array([1.0, 2.0], np.float32))
    assert got["_CHECKPOINTABLE_OBJECT_GRAPH"].dtype == object


def test_reader_lists_entries_without_reading(tmp_path):
    write_tf_checkpoint(tmp_path / "m", sample_tensors())
    reader = TFCheckpointReader(tmp_path / "m")
    entry = reader.entries["model/h0/attn/c_attn/w"]
    assert entry.shape == (1, 4, 12)
    assert entry.numpy_dtype == np.float32
    assert "half" in reader


# --- errors name the file ------------------------------------------------------------------------


def test_missing_index(tmp_path):
    with pytest.raises(TFCheckpointError, match=r"model\.ckpt\.index"):
        read_tf_checkpoint(tmp_path / "model.ckpt")


def test_missing_data_file(tmp_path):
    write_tf_checkpoint(tmp_path / "m", {"a": np.zeros(3, np.float32)})
    os.remove(tmp_path / "m.data-00000-of-00001")
    with pytest.raises(TFCheckpointError, match=r"missing: .*m\.data-00000-of-00001"):
        read_tf_checkpoint(tmp_path / "m")


def test_truncated_index(tmp_path):
    write_tf_checkpoint(tmp_path / "m", {"a": np.zeros(3, np.float32)})
    index = tmp_path / "m.index"
    index.write_bytes(index.read_bytes()[:-5])
    with pytest.raises(TFCheckpointError, match=r"m\.index: .*(magic|truncated)"):
        read_tf_checkpoint(tmp_path / "m")


def test_truncated_data_file(tmp_path):
    write_tf_checkpoint(tmp_path / "m", {"a": np.zeros(3, np.float32), "b": np.ones(5, np.float32)})
    data = tmp_path / "m.data-00000-of-00001"
    data.write_bytes(data.read_bytes()[:-4])
    with pytest.raises(TFCheckpointError, match=r"m\.data-00000-of-00001: tensor 'b'.*truncated"):
        read_tf_checkpoint(tmp_path / "m")


def test_corrupt_data_fails_crc(tmp_path):
    write_tf_checkpoint(tmp_path / "m", {"a": np.arange(20000, dtype=np.float32)})
    data = tmp_path / "m.data-00000-of-00001"
    raw = bytearray(data.read_bytes())
    raw[12345] ^= 1
    data.write_bytes(bytes(raw))
    with pytest.raises(TFCheckpointError, match=r"m\.data-00000-of-00001: tensor 'a': crc32c mismatch"):
        read_tf_checkpoint(tmp_path / "m")
    assert read_tf_checkpoint(tmp_path / "m", verify_crc=False)["a"].shape == (20000,)


def _write_index(prefix, entries: dict[str, bytes]) -> None:
    header = protowire.field_varint(1, 1)
    items = [(b"", header)] + sorted((k.encode(), v) for k, v in entries.items())
    with open(f"{prefix}.index", "wb") as f:
        f.write(build_sstable(items))
    open(f"{prefix}.data-00000-of-00001", "wb").close()


def test_unsupported_dtype_and_sliced_entries(tmp_path):
    complex64 = protowire.field_varint(1, 8) + protowire.field_bytes(2, b"")
    sliced = protowire.field_varint(1, 1) + protowire.field_bytes(7, b"")
    _write_index(tmp_path / "m", {"c": complex64, "s": sliced})
    reader = TFCheckpointReader(tmp_path / "m")
    with pytest.raises(TFCheckpointError, match=r"m: tensor 'c' has unsupported TF dtype enum 8"):
        reader.read("c")
    with pytest.raises(TFCheckpointError, match="partitioned"):
        reader.read("s")


def test_index_without_header(tmp_path):
    with open(tmp_path / "m.index", "wb") as f:
        f.write(build_sstable([(b"a", b"")]))
    with pytest.raises(TFCheckpointError, match=r"m\.index: no bundle header"):
        TFCheckpointReader(tmp_path / "m")


def test_latest_checkpoint_errors(tmp_path):
    with pytest.raises(TFCheckpointError, match="checkpoint"):
        latest_checkpoint(tmp_path)
    (tmp_path / "checkpoint").write_text("nonsense\n")
    with pytest.raises(TFCheckpointError, match="model_checkpoint_path"):
        latest_checkpoint(tmp_path)
