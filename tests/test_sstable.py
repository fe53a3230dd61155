"""LevelDB tables (the index of a TF checkpoint) without LevelDB, and their crc32c."""

from __future__ import annotations

import struct
import sys

import numpy as np
import pytest

from gpt2jax import sstable
from gpt2jax.protowire import varint
from gpt2jax.sstable import SSTableError, build_sstable, crc32c, mask_crc, read_sstable, unmask_crc

# --- crc32c --------------------------------------------------------------------------------------


def test_crc32c_known_values():
    # RFC 3720 (iSCSI) test vectors, and the usual check value.
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(b"") == 0
    assert crc32c(bytes(32)) == 0x8A9136AA
    assert crc32c(b"\xff" * 32) == 0x62A8AB43
    assert crc32c(bytes(range(32))) == 0x46DD794E


def bitwise_crc32c(data: bytes) -> int:
    """The definition: reflected Castagnoli polynomial, one bit at a time."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


@pytest.mark.parametrize("n", [1, 1000, 20001])
def test_crc32c_matches_the_definition_and_extends(n):
    data = np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8).tobytes()
    want = bitwise_crc32c(data)
    assert crc32c(data) == want
    assert crc32c(data[n // 3 :], crc32c(data[: n // 3])) == want  # extending, as TF's crc32c::Extend
    assert crc32c(bytearray(data)) == crc32c(memoryview(data)) == want  # any bytes-like object


def test_crc_mask_round_trip():
    for v in (0, 1, 0xFFFFFFFF, 0x12345678):
        assert unmask_crc(mask_crc(v)) == v
    assert mask_crc(0) == 0xA282EAD8


# --- SSTable -------------------------------------------------------------------------------------


def _entry(shared: int, key_delta: bytes, value: bytes) -> bytes:
    return bytes([shared, len(key_delta), len(value)]) + key_delta + value


def _with_trailer(contents: bytes, kind: int = 0) -> bytes:
    body = contents + bytes([kind])
    return body + struct.pack("<I", mask_crc(crc32c(body)))


def test_read_hand_built_sstable_with_prefix_compression_and_restarts():
    # Block 1: "apple", "apricot" shares "ap" with it; "banana" is a restart point (restart interval 2).
    e0 = _entry(0, b"apple", b"1")
    e1 = _entry(2, b"ricot", b"22")
    e2 = _entry(0, b"banana", b"")
    block1 = e0 + e1 + e2 + struct.pack("<3I", 0, len(e0 + e1), 2)
    block2 = _entry(0, b"cherry", b"x") + struct.pack("<2I", 0, 1)
    table = bytearray(_with_trailer(block1))
    handle1 = (0, len(block1))
    handle2 = (len(table), len(block2))
    table += _with_trailer(block2)
    meta = (len(table), 8)
    table += _with_trailer(struct.pack("<2I", 0, 1))

    def enc(h):
        return varint(h[0]) + varint(h[1])

    i0 = _entry(0, b"c", enc(handle1))
    i1 = _entry(0, b"d", enc(handle2))
    index = i0 + i1 + struct.pack("<3I", 0, len(i0), 2)
    index_handle = (len(table), len(index))
    table += _with_trailer(index)
    table += (enc(meta) + enc(index_handle)).ljust(40, b"\0") + struct.pack("<Q", 0xDB4775248B80FB57)

    assert list(read_sstable(bytes(table))) == [
        (b"apple", b"1"),
        (b"apricot", b"22"),
        (b"banana", b""),
        (b"cherry", b"x"),
    ]


def test_build_sstable_many_blocks_round_trip():
    items = [
        (f"model/h{i}/attn/c_attn/{w}".encode(), bytes([i % 256]) * (i % 5)) for i in range(200) for w in "bw"
    ]
    items.sort()
    table = build_sstable(items, block_size=256, restart_interval=3)
    assert list(read_sstable(table)) == items
    # Several data blocks, each indexed by a short separator key.
    index_handle, _ = sstable._read_block_handle(table[-48:], sstable._read_block_handle(table[-48:], 0)[1])
    index = list(sstable._block_entries(sstable._read_block(table, index_handle)))
    assert len(index) > 10


def test_build_sstable_rejects_unsorted_keys():
    with pytest.raises(ValueError, match="sorted"):
        build_sstable([(b"b", b""), (b"a", b"")])


def test_sstable_corruption_detected():
    table = bytearray(build_sstable([(b"a", b"1"), (b"b", b"2")]))
    table[3] ^= 0xFF
    with pytest.raises(SSTableError, match="crc32c mismatch"):
        list(read_sstable(bytes(table)))
    with pytest.raises(SSTableError, match="magic"):
        list(read_sstable(bytes(table[:-1]) + b"\0"))
    with pytest.raises(SSTableError, match="too short"):
        list(read_sstable(b"\0" * 10))


def test_snappy_block_gives_clear_error(monkeypatch):
    # An index whose data block claims snappy compression (as LevelDB does when compression is on).
    block = _entry(0, b"a", b"1") + struct.pack("<2I", 0, 1)
    table = bytearray(_with_trailer(block, kind=1))
    meta = (len(table), 8)
    table += _with_trailer(struct.pack("<2I", 0, 1))
    idx = _entry(0, b"b", varint(0) + varint(len(block))) + struct.pack("<2I", 0, 1)
    index_handle = (len(table), len(idx))
    table += _with_trailer(idx)
    handles = b"".join(varint(v) for v in (*meta, *index_handle))
    table += handles.ljust(40, b"\0") + struct.pack("<Q", 0xDB4775248B80FB57)
    monkeypatch.setitem(sys.modules, "snappy", None)  # as if not installed
    with pytest.raises(SSTableError, match="snappy"):
        list(read_sstable(bytes(table)))
