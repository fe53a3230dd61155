"""LevelDB's table format (SSTable), read and written: the index file of a TF V2 checkpoint.

A table is data blocks of sorted key/value entries (keys prefix-compressed against the previous key, with
restart points), an index block pointing at them, and a footer with the index's place and a magic number.
Each block is followed by its compression type and a masked crc32c, computed with google-crc32c.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from typing import Any

import google_crc32c
import numpy as np

from gpt2jax.protowire import read_varint, varint


class SSTableError(ValueError):
    """A table that is truncated, corrupt, or uses a feature not supported here."""


def crc32c(data: Any, value: int = 0) -> int:
    """crc32c (Castagnoli) of a bytes-like object, extending an earlier ``value`` (as TF's
    crc32c::Extend)."""
    return google_crc32c.extend(value, np.frombuffer(data, np.uint8))


def mask_crc(crc: int) -> int:
    """LevelDB/TF store crcs masked, so that a crc of data that itself holds crcs stays well mixed."""
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def unmask_crc(masked: int) -> int:
    rot = (masked - 0xA282EAD8) & 0xFFFFFFFF
    return ((rot >> 17) | (rot << 15)) & 0xFFFFFFFF


_TABLE_MAGIC = 0xDB4775248B80FB57
_FOOTER_SIZE = 48  # two block handles padded to 40 bytes, then the 8-byte magic
_BLOCK_TRAILER_SIZE = 5  # 1 byte compression type, 4 bytes masked crc32c
_NO_COMPRESSION, _SNAPPY = 0, 1


def _read_block_handle(buf: bytes, pos: int) -> tuple[tuple[int, int], int]:
    offset, pos = read_varint(buf, pos)
    size, pos = read_varint(buf, pos)
    return (offset, size), pos


def _read_block(table: bytes, handle: tuple[int, int]) -> bytes:
    offset, size = handle
    end = offset + size + _BLOCK_TRAILER_SIZE
    if end > len(table):
        raise SSTableError(f"block at {offset} (+{size}) runs past the end of the file (truncated?)")
    contents = table[offset : offset + size]
    kind = table[offset + size]
    (stored,) = struct.unpack_from("<I", table, offset + size + 1)
    if unmask_crc(stored) != crc32c(table[offset : offset + size + 1]):
        raise SSTableError(f"block at {offset}: crc32c mismatch (corrupt file)")
    if kind == _NO_COMPRESSION:
        return contents
    if kind == _SNAPPY:
        try:
            import snappy
        except ImportError:
            raise SSTableError(
                "block is snappy-compressed; install python-snappy (`pip install python-snappy`) to read it"
            ) from None
        return snappy.uncompress(contents)
    raise SSTableError(f"block at {offset}: unknown compression type {kind}")


def _block_entries(block: bytes) -> Iterator[tuple[bytes, bytes]]:
    """Entries of one block: keys share a prefix with the previous key; restart points reset it."""
    if len(block) < 4:
        raise SSTableError("block shorter than its restart count")
    (num_restarts,) = struct.unpack_from("<I", block, len(block) - 4)
    limit = len(block) - 4 - 4 * num_restarts
    if limit < 0:
        raise SSTableError(f"block claims {num_restarts} restarts, more than fit in {len(block)} bytes")
    pos = 0
    key = b""
    while pos < limit:
        shared, pos = read_varint(block, pos)
        non_shared, pos = read_varint(block, pos)
        value_len, pos = read_varint(block, pos)
        if shared > len(key) or pos + non_shared + value_len > limit:
            raise SSTableError("malformed block entry (corrupt file)")
        key = key[:shared] + block[pos : pos + non_shared]
        pos += non_shared
        yield key, block[pos : pos + value_len]
        pos += value_len


def read_sstable(table: bytes) -> Iterator[tuple[bytes, bytes]]:
    """All (key, value) pairs of an SSTable held in memory, in key order."""
    if len(table) < _FOOTER_SIZE:
        raise SSTableError(f"{len(table)} bytes is too short for an SSTable footer (truncated?)")
    (magic,) = struct.unpack_from("<Q", table, len(table) - 8)
    if magic != _TABLE_MAGIC:
        raise SSTableError("bad SSTable magic number (not a TF index file, or truncated)")
    footer = table[len(table) - _FOOTER_SIZE :]
    _metaindex, pos = _read_block_handle(footer, 0)
    index_handle, _ = _read_block_handle(footer, pos)
    prev = None
    for _, handle_bytes in _block_entries(_read_block(table, index_handle)):
        handle, _ = _read_block_handle(handle_bytes, 0)
        for key, value in _block_entries(_read_block(table, handle)):
            if prev is not None and key <= prev:
                raise SSTableError("SSTable keys out of order (corrupt file)")
            prev = key
            yield key, value


class _BlockBuilder:
    """One block: each key stores only what differs from the previous key, except at restart points
    (every ``restart_interval`` entries), whose offsets are listed at the end for binary search."""

    def __init__(self, restart_interval: int) -> None:
        self.restart_interval = restart_interval
        self.buf = bytearray()
        self.restarts = [0]
        self.count = 0
        self.last_key = b""

    def add(self, key: bytes, value: bytes) -> None:
        if self.count and self.count % self.restart_interval == 0:
            self.restarts.append(len(self.buf))
            shared = 0
        else:
            shared = len(os.path.commonprefix([self.last_key, key]))
        self.buf += varint(shared) + varint(len(key) - shared) + varint(len(value))
        self.buf += key[shared:] + value
        self.last_key = key
        self.count += 1

    def size_estimate(self) -> int:
        return len(self.buf) + 4 * len(self.restarts) + 4

    def finish(self) -> bytes:
        return bytes(
            self.buf + struct.pack(f"<{len(self.restarts) + 1}I", *self.restarts, len(self.restarts))
        )


def _shortest_separator(start: bytes, limit: bytes) -> bytes:
    """A short key in [start, limit), as LevelDB's bytewise comparator picks for index entries."""
    n = len(os.path.commonprefix([start, limit]))
    if n < min(len(start), len(limit)) and start[n] < 0xFF and start[n] + 1 < limit[n]:
        return start[:n] + bytes([start[n] + 1])
    return start


def _short_successor(key: bytes) -> bytes:
    """A short key >= key (the last data block's index entry)."""
    for i, b in enumerate(key):
        if b != 0xFF:
            return key[:i] + bytes([b + 1])
    return key


def build_sstable(
    items: list[tuple[bytes, bytes]], *, block_size: int = 262144, restart_interval: int = 16
) -> bytes:
    """An uncompressed SSTable of sorted, unique keys, laid out byte for byte as LevelDB's TableBuilder
    does (TF's defaults for block size and restart interval)."""
    keys = [k for k, _ in items]
    if any(a >= b for a, b in zip(keys, keys[1:], strict=False)):
        raise ValueError("SSTable keys must be unique and sorted")
    out = bytearray()

    def write_block(block: _BlockBuilder) -> bytes:
        contents = block.finish() + bytes([_NO_COMPRESSION])
        handle = varint(len(out)) + varint(len(contents) - 1)
        out.extend(contents + struct.pack("<I", mask_crc(crc32c(contents))))
        return handle

    index = _BlockBuilder(1)
    data = _BlockBuilder(restart_interval)
    last_key = b""
    pending: bytes | None = None  # last flushed block's handle, indexed once the next key is known
    for key, value in items:
        if pending is not None:
            index.add(_shortest_separator(last_key, key), pending)
            pending = None
        data.add(key, value)
        last_key = key
        if data.size_estimate() >= block_size:
            pending = write_block(data)
            data = _BlockBuilder(restart_interval)
    if data.count:
        pending = write_block(data)
    if pending is not None:
        index.add(_short_successor(last_key), pending)
    metaindex = write_block(_BlockBuilder(1))
    index_handle = write_block(index)
    footer = (metaindex + index_handle).ljust(_FOOTER_SIZE - 8, b"\0") + struct.pack("<Q", _TABLE_MAGIC)
    return bytes(out + footer)
