"""TensorFlow V2 checkpoints ("tensor bundles"), read and written without TensorFlow.

A checkpoint with prefix ``P`` is two files:

- ``P.index``: a LevelDB-format SSTable. Its keys are tensor names, its values serialized
  ``BundleEntryProto`` messages (dtype, shape, shard_id, offset, size, masked crc32c); the empty key
  holds the ``BundleHeaderProto`` (num_shards, endianness, version).
- ``P.data-00000-of-00001``: the raw tensor bytes, one tensor after another.

This is the format of OpenAI's original GPT-2 release (``model.ckpt.*``). The SSTable
(`gpt2jax.sstable`) and protobuf (`gpt2jax.protowire`) code covers exactly what those files use, so
loading them never needs TensorFlow.
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

from gpt2jax.protowire import (
    WireFormatError,
    as_int64,
    field_bytes,
    field_fixed32,
    field_varint,
    parse_proto,
    read_varint,
)
from gpt2jax.sstable import SSTableError, build_sstable, crc32c, mask_crc, read_sstable, unmask_crc


class TFCheckpointError(ValueError):
    """A TensorFlow checkpoint is missing, truncated, corrupt, or uses a feature not supported here."""


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
    fields = parse_proto(buf)
    if fields.get(3, [0])[-1]:
        raise TFCheckpointError("tensor shape of unknown rank")
    return tuple(as_int64(parse_proto(dim).get(1, [0])[-1]) for dim in fields.get(2, []))


def _parse_entry(name: str, buf: bytes) -> BundleEntry:
    f = parse_proto(buf)
    crc = f.get(6)
    return BundleEntry(
        name=name,
        dtype=f.get(1, [0])[-1],
        shape=_parse_shape(f[2][-1]) if 2 in f else (),
        shard_id=f.get(3, [0])[-1],
        offset=as_int64(f.get(4, [0])[-1]),
        size=as_int64(f.get(5, [0])[-1]),
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
                    header = parse_proto(value)
                else:
                    name = key.decode("utf-8")
                    self.entries[name] = _parse_entry(name, value)
        except (TFCheckpointError, SSTableError, WireFormatError, UnicodeDecodeError) as e:
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
                n, pos = read_varint(buf, pos)
                lengths.append(n)
                crc = crc32c(struct.pack("<I" if n <= 0xFFFFFFFF else "<Q", n), crc)
        except WireFormatError as e:
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
            shape = b"".join(field_bytes(2, field_varint(1, d)) for d in arr.shape)
            entries[name] = (
                field_varint(1, enum)
                + field_bytes(2, shape)
                + field_varint(4, offset)
                + field_varint(5, raw.size)
                + field_fixed32(6, mask_crc(crc32c(raw)))
            )
            offset += raw.size
            yield raw

    _atomic_write(_data_path(prefix, 0, 1), data_chunks())
    header = field_varint(1, 1) + field_bytes(3, field_varint(1, _BUNDLE_VERSION))
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
