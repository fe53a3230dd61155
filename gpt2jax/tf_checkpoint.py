"""TensorFlow V2 checkpoints ("tensor bundles"), read and written without TensorFlow.

A checkpoint with prefix ``P`` is two files:

- ``P.index``: a LevelDB-format SSTable. Its keys are tensor names, its values serialized
  ``BundleEntryProto`` messages (dtype, shape, shard_id, offset, size, masked crc32c); the empty key
  holds the ``BundleHeaderProto`` (num_shards, endianness, version).
- ``P.data-00000-of-00001``: the raw tensor bytes, one tensor after another.

This is the format of OpenAI's original GPT-2 release (``model.ckpt.*``). The SSTable, protobuf and
crc32c code below covers exactly what those files use, so loading them never needs TensorFlow.
"""

from __future__ import annotations

import dataclasses
import os
import re
import struct
from collections.abc import Iterator, Mapping
from typing import Any

import ml_dtypes
import numpy as np


class TFCheckpointError(ValueError):
    """A TensorFlow checkpoint is missing, truncated, corrupt, or uses a feature not supported here."""


# --- crc32c (Castagnoli), as TF and LevelDB use it --------------------------------------------------

_CRC_POLY = 0x82F63B78  # reflected Castagnoli polynomial


def _crc_byte_table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ (_CRC_POLY if c & 1 else 0)
        table.append(c)
    return table


_CRC_T0 = _crc_byte_table()
# Below this size a plain byte loop beats numpy's per-call overhead.
_CRC_VECTOR_MIN = 1 << 14


def _crc_bytes_loop(state: int, data: memoryview) -> int:
    t = _CRC_T0
    for b in data:
        state = t[(state ^ b) & 0xFF] ^ (state >> 8)
    return state


# A GF(2) linear map on the 32-bit crc register, as the images of the 32 unit vectors.
_Op = tuple[int, ...]


def _op_apply(op: _Op, v: int) -> int:
    out = 0
    i = 0
    while v:
        if v & 1:
            out ^= op[i]
        v >>= 1
        i += 1
    return out


def _op_compose(a: _Op, b: _Op) -> _Op:
    """a after b."""
    return tuple(_op_apply(a, col) for col in b)


def _op_apply_vec(op: _Op, v: np.ndarray) -> np.ndarray:
    out = np.zeros_like(v)
    for i, col in enumerate(op):
        out ^= ((v >> np.uint32(i)) & np.uint32(1)) * np.uint32(col)
    return out


# Feeding zero bytes to the register is linear; powers of two are cached and composed on demand.
_ZERO_OPS: list[_Op] = [tuple(_crc_bytes_loop(1 << i, memoryview(b"\0")) for i in range(32))]


def _zeros_op(n: int) -> _Op:
    """The effect of n zero bytes on the register."""
    op: _Op = tuple(1 << i for i in range(32))
    k = 0
    while n:
        while len(_ZERO_OPS) <= k:
            _ZERO_OPS.append(_op_compose(_ZERO_OPS[-1], _ZERO_OPS[-1]))
        if n & 1:
            op = _op_compose(_ZERO_OPS[k], op)
        n >>= 1
        k += 1
    return op


# One step of 4 bytes: with x = register ^ word, the new register is zeros_op(4)(x), split over x's two
# 16-bit halves into two 65536-entry lookups (fewer numpy calls per byte than byte-wise tables).
_Z4 = _zeros_op(4)
_CRC_LO16 = _op_apply_vec(_Z4, np.arange(1 << 16, dtype=np.uint32))
_CRC_HI16 = _op_apply_vec(_Z4, np.arange(1 << 16, dtype=np.uint32) << np.uint32(16))


def _crc_state(state: int, data: memoryview) -> int:
    """Feeds data to the raw crc register.

    Large inputs are cut into lanes that numpy advances together, 4 bytes a step; the register is
    linear over GF(2), so each lane's result shifted past the bytes after it, XORed together, is the
    crc of the whole. That makes a pure-numpy crc32c fast enough (~400 MB/s) to check every tensor.
    """
    n = len(data)
    if n < _CRC_VECTOR_MIN:
        return _crc_bytes_loop(state, data)
    lanes = 1 << min(14, (n // 4096).bit_length() - 1)  # >= 1024 steps per lane amortize numpy calls
    words_per_lane = n // (4 * lanes)
    main = lanes * 4 * words_per_lane
    words = np.frombuffer(data[:main], dtype="<u4").reshape(lanes, words_per_lane)
    regs = np.zeros(lanes, dtype=np.uint32)
    regs[0] = state
    x = np.empty_like(regs)
    hi = np.empty_like(regs)
    for j in range(0, words_per_lane, 64):
        # Transposed in small slabs: contiguous rows per step without copying the whole input.
        for row in np.ascontiguousarray(words[:, j : j + 64].T):
            np.bitwise_xor(regs, row, out=x)
            np.right_shift(x, np.uint32(16), out=hi)
            np.bitwise_and(x, np.uint32(0xFFFF), out=x)
            regs = np.take(_CRC_HI16, hi) ^ np.take(_CRC_LO16, x)
    # Fold neighbouring lanes pairwise: left lane shifted past the right lane's bytes, XOR the right.
    op = _zeros_op(4 * words_per_lane)
    while len(regs) > 1:
        regs = _op_apply_vec(op, regs[0::2]) ^ regs[1::2]
        op = _op_compose(op, op)
    return _crc_state(int(regs[0]), data[main:])


def crc32c(data: Any, value: int = 0) -> int:
    """crc32c of a bytes-like object, extending an earlier ``value`` (as TF's crc32c::Extend)."""
    mv = memoryview(data).cast("B")
    return _crc_state(value ^ 0xFFFFFFFF, mv) ^ 0xFFFFFFFF


def mask_crc(crc: int) -> int:
    """LevelDB/TF store crcs masked, so that a crc of data that itself holds crcs stays well mixed."""
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def unmask_crc(masked: int) -> int:
    rot = (masked - 0xA282EAD8) & 0xFFFFFFFF
    return ((rot >> 17) | (rot << 15)) & 0xFFFFFFFF


# --- protobuf wire format: just the varint/fixed32/bytes fields the bundle protos use ---------------


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = 0
    shift = 0
    while True:
        if pos >= len(buf):
            raise TFCheckpointError("varint runs past the end of its buffer")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise TFCheckpointError("varint longer than 10 bytes")


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # negative int64 encode as 10-byte two's complement, as protobuf does
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _int64(n: int) -> int:
    return n - (1 << 64) if n >= 1 << 63 else n


def _parse_proto(buf: bytes) -> dict[int, list[Any]]:
    """Field number -> values (ints for varint/fixed fields, bytes for length-delimited ones)."""
    fields: dict[int, list[Any]] = {}
    pos = 0
    while pos < len(buf):
        tag, pos = _read_varint(buf, pos)
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            value, pos = _read_varint(buf, pos)
        elif wire == 1:
            if pos + 8 > len(buf):
                raise TFCheckpointError("truncated fixed64 field")
            (value,) = struct.unpack_from("<Q", buf, pos)
            pos += 8
        elif wire == 2:
            length, pos = _read_varint(buf, pos)
            if pos + length > len(buf):
                raise TFCheckpointError("truncated length-delimited field")
            value = bytes(buf[pos : pos + length])
            pos += length
        elif wire == 5:
            if pos + 4 > len(buf):
                raise TFCheckpointError("truncated fixed32 field")
            (value,) = struct.unpack_from("<I", buf, pos)
            pos += 4
        else:
            raise TFCheckpointError(f"unsupported protobuf wire type {wire} (field {number})")
        fields.setdefault(number, []).append(value)
    return fields


def _field_varint(number: int, value: int) -> bytes:
    return _varint(number << 3) + _varint(value) if value else b""


def _field_bytes(number: int, value: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(value)) + value


def _field_fixed32(number: int, value: int) -> bytes:
    return _varint(number << 3 | 5) + struct.pack("<I", value)


# --- SSTable (LevelDB table format) ------------------------------------------------------------------

_TABLE_MAGIC = 0xDB4775248B80FB57
_FOOTER_SIZE = 48  # two block handles padded to 40 bytes, then the 8-byte magic
_BLOCK_TRAILER_SIZE = 5  # 1 byte compression type, 4 bytes masked crc32c
_NO_COMPRESSION, _SNAPPY = 0, 1


def _read_block_handle(buf: bytes, pos: int) -> tuple[tuple[int, int], int]:
    offset, pos = _read_varint(buf, pos)
    size, pos = _read_varint(buf, pos)
    return (offset, size), pos


def _read_block(table: bytes, handle: tuple[int, int]) -> bytes:
    offset, size = handle
    end = offset + size + _BLOCK_TRAILER_SIZE
    if end > len(table):
        raise TFCheckpointError(f"block at {offset} (+{size}) runs past the end of the file (truncated?)")
    contents = table[offset : offset + size]
    kind = table[offset + size]
    (stored,) = struct.unpack_from("<I", table, offset + size + 1)
    if unmask_crc(stored) != crc32c(table[offset : offset + size + 1]):
        raise TFCheckpointError(f"block at {offset}: crc32c mismatch (corrupt file)")
    if kind == _NO_COMPRESSION:
        return contents
    if kind == _SNAPPY:
        try:
            import snappy
        except ImportError:
            raise TFCheckpointError(
                "block is snappy-compressed; install python-snappy (`pip install python-snappy`) to read it"
            ) from None
        return snappy.uncompress(contents)
    raise TFCheckpointError(f"block at {offset}: unknown compression type {kind}")


def _block_entries(block: bytes) -> Iterator[tuple[bytes, bytes]]:
    """Entries of one block: keys share a prefix with the previous key; restart points reset it."""
    if len(block) < 4:
        raise TFCheckpointError("block shorter than its restart count")
    (num_restarts,) = struct.unpack_from("<I", block, len(block) - 4)
    limit = len(block) - 4 - 4 * num_restarts
    if limit < 0:
        raise TFCheckpointError(f"block claims {num_restarts} restarts, more than fit in {len(block)} bytes")
    pos = 0
    key = b""
    while pos < limit:
        shared, pos = _read_varint(block, pos)
        non_shared, pos = _read_varint(block, pos)
        value_len, pos = _read_varint(block, pos)
        if shared > len(key) or pos + non_shared + value_len > limit:
            raise TFCheckpointError("malformed block entry (corrupt file)")
        key = key[:shared] + block[pos : pos + non_shared]
        pos += non_shared
        yield key, block[pos : pos + value_len]
        pos += value_len


def read_sstable(table: bytes) -> Iterator[tuple[bytes, bytes]]:
    """All (key, value) pairs of an SSTable held in memory, in key order."""
    if len(table) < _FOOTER_SIZE:
        raise TFCheckpointError(f"{len(table)} bytes is too short for an SSTable footer (truncated?)")
    (magic,) = struct.unpack_from("<Q", table, len(table) - 8)
    if magic != _TABLE_MAGIC:
        raise TFCheckpointError("bad SSTable magic number (not a TF index file, or truncated)")
    footer = table[len(table) - _FOOTER_SIZE :]
    _metaindex, pos = _read_block_handle(footer, 0)
    index_handle, _ = _read_block_handle(footer, pos)
    prev = None
    for _, handle_bytes in _block_entries(_read_block(table, index_handle)):
        handle, _ = _read_block_handle(handle_bytes, 0)
        for key, value in _block_entries(_read_block(table, handle)):
            if prev is not None and key <= prev:
                raise TFCheckpointError("SSTable keys out of order (corrupt file)")
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
        self.buf += _varint(shared) + _varint(len(key) - shared) + _varint(len(value))
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
        handle = _varint(len(out)) + _varint(len(contents) - 1)
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


# --- tensor bundles -----------------------------------------------------------------------------------

# TF DataType enum values -> numpy dtypes (all little-endian on disk).
_DTYPES: dict[int, np.dtype] = {
    1: np.dtype("<f4"),  # DT_FLOAT
    2: np.dtype("<f8"),  # DT_DOUBLE
    3: np.dtype("<i4"),  # DT_INT32
    4: np.dtype("u1"),  # DT_UINT8
    5: np.dtype("<i2"),  # DT_INT16
    6: np.dtype("i1"),  # DT_INT8
    9: np.dtype("<i8"),  # DT_INT64
    10: np.dtype("?"),  # DT_BOOL
    14: np.dtype(ml_dtypes.bfloat16),  # DT_BFLOAT16
    17: np.dtype("<u2"),  # DT_UINT16
    19: np.dtype("<f2"),  # DT_HALF
    22: np.dtype("<u4"),  # DT_UINT32
    23: np.dtype("<u8"),  # DT_UINT64
}
_DT_STRING = 7
_DT_FROM_NUMPY = {dt.newbyteorder("="): enum for enum, dt in _DTYPES.items()}
# Written in the header, as TF's kTensorBundleVersion.
_BUNDLE_VERSION = 1


@dataclasses.dataclass(frozen=True)
class BundleEntry:
    """Where one tensor lives in the data files, from its BundleEntryProto."""

    name: str
    dtype: int  # TF DataType enum
    shape: tuple[int, ...]
    shard_id: int
    offset: int
    size: int
    crc32c: int | None  # unmasked; None when the entry stores none
    sliced: bool  # a partitioned variable, stored as slices under other keys

    @property
    def numpy_dtype(self) -> np.dtype | None:
        """None for dtypes this module cannot turn into numpy arrays."""
        if self.dtype == _DT_STRING:
            return np.dtype(object)
        return _DTYPES.get(self.dtype)


def _parse_shape(buf: bytes) -> tuple[int, ...]:
    fields = _parse_proto(buf)
    if fields.get(3, [0])[-1]:
        raise TFCheckpointError("tensor shape of unknown rank")
    return tuple(_int64(_parse_proto(dim).get(1, [0])[-1]) for dim in fields.get(2, []))


def _parse_entry(name: str, buf: bytes) -> BundleEntry:
    f = _parse_proto(buf)
    crc = f.get(6)
    return BundleEntry(
        name=name,
        dtype=f.get(1, [0])[-1],
        shape=_parse_shape(f[2][-1]) if 2 in f else (),
        shard_id=f.get(3, [0])[-1],
        offset=_int64(f.get(4, [0])[-1]),
        size=_int64(f.get(5, [0])[-1]),
        crc32c=unmask_crc(crc[-1]) if crc else None,
        sliced=7 in f,
    )


def _data_path(prefix: str, shard: int, num_shards: int) -> str:
    return f"{prefix}.data-{shard:05d}-of-{num_shards:05d}"


class TFCheckpointReader:
    """Reads tensors one at a time from a checkpoint prefix (e.g. ``models/124M/model.ckpt``).

    The index is parsed up front (so missing data files are reported at once); tensor bytes are
    read on demand, and their crc32c checked when ``verify_crc`` is set.
    """

    def __init__(self, prefix: str | os.PathLike, *, verify_crc: bool = True) -> None:
        self.prefix = os.fspath(prefix)
        self.verify_crc = verify_crc
        index_path = self.prefix + ".index"
        try:
            with open(index_path, "rb") as f:
                table = f.read()
        except OSError as e:
            raise TFCheckpointError(f"{index_path}: cannot read the checkpoint index ({e.strerror})") from e
        header = None
        self.entries: dict[str, BundleEntry] = {}
        try:
            for key, value in read_sstable(table):
                if key == b"":
                    header = _parse_proto(value)
                else:
                    name = key.decode("utf-8")
                    self.entries[name] = _parse_entry(name, value)
        except (TFCheckpointError, UnicodeDecodeError) as e:
            raise TFCheckpointError(f"{index_path}: {e}") from e
        if header is None:
            raise TFCheckpointError(f"{index_path}: no bundle header (not a TF V2 checkpoint index?)")
        if header.get(2, [0])[-1] != 0:
            raise TFCheckpointError(f"{index_path}: big-endian checkpoints are not supported")
        self.num_shards = header.get(1, [1])[-1] or 1
        self.data_paths = [_data_path(self.prefix, i, self.num_shards) for i in range(self.num_shards)]
        missing = [p for p in self.data_paths if not os.path.isfile(p)]
        if missing:
            raise TFCheckpointError(f"{index_path}: data file(s) missing: {', '.join(missing)}")

    def keys(self) -> list[str]:
        return list(self.entries)

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def read(self, name: str) -> np.ndarray:
        """One tensor as a numpy array (strings come back as an object array of bytes)."""
        entry = self.entries[name]
        what = f"{self.prefix}: tensor {name!r}"
        if entry.sliced:
            raise TFCheckpointError(f"{what} is a partitioned (sliced) variable, which is not supported")
        dtype = entry.numpy_dtype
        if dtype is None:
            raise TFCheckpointError(f"{what} has unsupported TF dtype enum {entry.dtype}")
        if not 0 <= entry.shard_id < self.num_shards:
            raise TFCheckpointError(f"{what} names shard {entry.shard_id} of {self.num_shards}")
        path = self.data_paths[entry.shard_id]
        buf = bytearray(entry.size)
        with open(path, "rb") as f:
            f.seek(entry.offset)
            got = f.readinto(buf)
        if got != entry.size:
            raise TFCheckpointError(
                f"{path}: tensor {name!r} needs bytes {entry.offset}..{entry.offset + entry.size}, "
                f"the file ends before (truncated?)"
            )
        if entry.dtype == _DT_STRING:
            return self._strings(entry, buf, path)
        count = int(np.prod(entry.shape, dtype=np.int64))
        if count * dtype.itemsize != entry.size:
            raise TFCheckpointError(
                f"{what}: shape {entry.shape} of {dtype} needs {count * dtype.itemsize} bytes, "
                f"the index says {entry.size} (corrupt index)"
            )
        if self.verify_crc and entry.crc32c is not None and crc32c(buf) != entry.crc32c:
            raise TFCheckpointError(f"{path}: tensor {name!r}: crc32c mismatch (corrupt data file)")
        return np.frombuffer(buf, dtype=dtype.newbyteorder("=")).reshape(entry.shape)

    def _strings(self, entry: BundleEntry, buf: bytearray, path: str) -> np.ndarray:
        # Layout: varint64 length per element, masked crc32c of the lengths, then the bytes. TF's
        # whole-tensor crc runs over the lengths as fixed-width ints (uint32 unless too large, as
        # older checkpoints had it), that checksum, then the bytes.
        what = f"{path}: string tensor {entry.name!r}"
        count = int(np.prod(entry.shape, dtype=np.int64))
        lengths = []
        pos = 0
        crc = 0
        try:
            for _ in range(count):
                n, pos = _read_varint(buf, pos)
                lengths.append(n)
                crc = crc32c(struct.pack("<I" if n <= 0xFFFFFFFF else "<Q", n), crc)
        except TFCheckpointError as e:
            raise TFCheckpointError(f"{what}: {e}") from e
        if pos + 4 + sum(lengths) != len(buf):
            raise TFCheckpointError(f"{what}: lengths do not add up to the stored size (corrupt file)")
        crc = crc32c(buf[pos : pos + 4], crc)
        pos += 4
        out = np.empty(count, dtype=object)
        for i, n in enumerate(lengths):
            out[i] = bytes(buf[pos : pos + n])
            pos += n
        if self.verify_crc and entry.crc32c is not None:
            crc = crc32c(buf[len(buf) - sum(lengths) :], crc)
            if crc != entry.crc32c:
                raise TFCheckpointError(f"{what}: crc32c mismatch (corrupt data file)")
        return out.reshape(entry.shape)


def read_tf_checkpoint(prefix: str | os.PathLike, *, verify_crc: bool = True) -> dict[str, np.ndarray]:
    """Every tensor of a TF V2 checkpoint, by name."""
    reader = TFCheckpointReader(prefix, verify_crc=verify_crc)
    return {name: reader.read(name) for name in reader.entries}


def _tensor_bytes(name: str, value: Any) -> tuple[int, np.ndarray, np.ndarray]:
    """TF dtype enum, the array as written (contiguous, little-endian), and its bytes as uint8."""
    arr = np.asarray(value)
    enum = _DT_FROM_NUMPY.get(arr.dtype.newbyteorder("="))
    if enum is None:
        raise TypeError(f"tensor {name!r}: dtype {arr.dtype} cannot be written to a TF checkpoint")
    arr = np.require(arr, dtype=_DTYPES[enum], requirements="C")  # contiguous, little-endian, keeps 0-d
    return enum, arr, arr.reshape(-1).view(np.uint8)


def _atomic_write(path: str, chunks: Iterator[Any]) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_tf_checkpoint(
    prefix: str | os.PathLike,
    tensors: Mapping[str, Any],
    *,
    block_size: int = 262144,
    restart_interval: int = 16,
) -> None:
    """Writes ``prefix.index``, ``prefix.data-00000-of-00001`` and a ``checkpoint`` file beside them.

    The result is what TF's own saver writes for these tensors (one shard, no compression), so
    ``tf.train.load_checkpoint`` and TF1 ``Saver.restore`` read it. Files are written to temporary
    names and renamed, so a crash never leaves a half-written checkpoint under the real name.
    """
    prefix = os.fspath(prefix)
    folder = os.path.dirname(prefix) or "."
    os.makedirs(folder, exist_ok=True)
    names = sorted(tensors, key=lambda n: n.encode("utf-8"))
    if "" in tensors:
        raise ValueError("the empty tensor name is reserved for the bundle header")
    entries: dict[str, bytes] = {}

    def data_chunks() -> Iterator[Any]:
        offset = 0
        for name in names:
            enum, arr, raw = _tensor_bytes(name, tensors[name])
            shape = b"".join(_field_bytes(2, _field_varint(1, d)) for d in arr.shape)
            entries[name] = (
                _field_varint(1, enum)
                + _field_bytes(2, shape)
                + _field_varint(4, offset)
                + _field_varint(5, raw.size)
                + _field_fixed32(6, mask_crc(crc32c(raw)))
            )
            offset += raw.size
            yield raw

    _atomic_write(_data_path(prefix, 0, 1), data_chunks())
    header = _field_varint(1, 1) + _field_bytes(3, _field_varint(1, _BUNDLE_VERSION))
    items = [(b"", header)] + [(n.encode("utf-8"), entries[n]) for n in names]
    table = build_sstable(items, block_size=block_size, restart_interval=restart_interval)
    _atomic_write(prefix + ".index", iter([table]))
    base = os.path.basename(prefix).replace("\\", "\\\\").replace('"', '\\"')
    text = f'model_checkpoint_path: "{base}"\nall_model_checkpoint_paths: "{base}"\n'
    _atomic_write(os.path.join(folder, "checkpoint"), iter([text.encode("utf-8")]))


def latest_checkpoint(folder: str | os.PathLike) -> str:
    """The prefix named by ``folder/checkpoint`` (TF's text file ``model_checkpoint_path: "..."``)."""
    folder = os.fspath(folder)
    path = os.path.join(folder, "checkpoint")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise TFCheckpointError(f"{path}: cannot read ({e.strerror})") from e
    m = re.search(r'^\s*model_checkpoint_path:\s*"((?:[^"\\]|\\.)*)"', text, re.MULTILINE)
    if not m:
        raise TFCheckpointError(f'{path}: no model_checkpoint_path: "..." line')
    name = re.sub(r"\\(.)", r"\1", m.group(1))
    prefix = os.path.join(folder, name)
    # Checkpoints moved from another machine may hold an absolute path that no longer exists there.
    if not os.path.exists(prefix + ".index"):
        prefix = os.path.join(folder, os.path.basename(name))
    return prefix
