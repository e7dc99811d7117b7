"""Write a sharded HF safetensors checkpoint one tensor at a time.

`safetensors.save_file` needs every tensor of a file in memory at once; a 5 GB shard would cost
5 GB. Here the shard layout is planned up front from (name, shape, dtype) alone, each shard's
header is written first, and tensor bytes are appended as they are produced, so memory holds one
tensor. Output: `model-0000k-of-0000n.safetensors` + `model.safetensors.index.json`, as HF writes
them (the files are ordinary safetensors: `safe_open` and `from_pretrained` read them).

One writer (`ShardedSafetensorsWriter`), two ways of moving bytes, the same shards (names, shapes,
dtypes, bytes, index; tests compare them): `PlainFiles` (`--io plain`, the default: ordinary
buffered file writes of each tensor's bytes; nothing but the safetensors file format) and the
byte-copy engine's `SpanCopier` (`--io fast`: also takes `Spans`, bytes already in files, copied
file to file by megadiff.checkpoint.bytecopy with O_DIRECT or copy_file_range). Memory holds one
tensor either way (safetensors' `save_file` would hold a whole shard: 5 GB by default).
"""

import json
import os
import re
import struct
from collections.abc import Callable, Sequence

import torch

from megadiff.checkpoint.bytecopy.byte_spans import Spans, with_read_ahead
from megadiff.checkpoint.bytecopy.span_copy import SpanCopier

INDEX_NAME = "model.safetensors.index.json"
DTYPE_CODES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_UNITS = {
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_size(text) -> int:
    """'5GB' -> 5_000_000_000 (HF's decimal units; KiB/MiB/GiB are binary); ints pass through."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)?\s*", str(text).upper())
    if not m:
        raise ValueError(f"cannot parse size {text!r}; use e.g. 5GB, 500MB, 2GiB or a number of bytes")
    value = float(m.group(1)) * _UNITS[m.group(2) or "B"]
    if value < 1:
        raise ValueError(f"size {text!r} must be at least 1 byte")
    return int(value)


Entry = tuple[str, tuple[int, ...], torch.dtype]


def _nbytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    n = 1
    for s in shape:
        n *= s
    return n * torch.empty((), dtype=dtype).element_size()


def plan_shards(entries: Sequence[Entry], max_shard_size: int) -> list[list[Entry]]:
    """Greedy in order (like HF): a shard closes before a tensor would push it over the limit; a
    tensor larger than the limit gets a shard of its own."""
    shards: list[list[Entry]] = [[]]
    size = 0
    for entry in entries:
        n = _nbytes(entry[1], entry[2])
        if shards[-1] and n and size + n > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += n
    return shards if shards[0] else []


def shard_file_name(k: int, n: int) -> str:
    return f"model-{k:05d}-of-{n:05d}.safetensors"


class _PlainOutput:
    """An output file written front to back with ordinary writes; fsync'd on close."""

    def __init__(self, path: str):
        self.path, self._f = path, open(path, "wb")

    def write(self, data) -> int:
        return self._f.write(data)

    def copy(self, spans) -> int:
        raise TypeError(f"{self.path}: the plain writer copies no byte ranges; give it tensors")

    def close(self) -> None:
        if not self._f.closed:
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()

    def abort(self) -> None:
        self._f.close()


class PlainFiles:
    """The plain way of writing output files (`--io plain`): `create(path)` -> a file taking
    `write(bytes)`; no byte ranges, no statistics (data_phase_line prints none)."""

    def create(self, path: str) -> _PlainOutput:
        return _PlainOutput(path)

    def read_ahead(self, spans) -> None:
        pass

    def close(self) -> None:
        pass


class ShardedSafetensorsWriter:
    """Call `write(name, value)` in exactly the order of `entries`, then `close()`. A value is a
    tensor, or `Spans` (bytes already in files: copied by `copier`, a SpanCopier, never made a
    tensor). `copier`: how files are written; default `PlainFiles()` (tensors only)."""

    def __init__(
        self,
        out_dir: str,
        entries: Sequence[Entry],
        max_shard_size,
        metadata: dict[str, str] | None = None,
        copier: "SpanCopier | PlainFiles | None" = None,
    ):
        names = [e[0] for e in entries]
        if len(set(names)) != len(names):
            raise ValueError("duplicate tensor names in the output plan")
        for name, _, dtype in entries:
            if dtype not in DTYPE_CODES:
                raise ValueError(f"{name}: dtype {dtype} cannot be stored in safetensors")
        self.out_dir = out_dir
        self.metadata = dict(metadata or {"format": "pt"})
        self.shards = plan_shards(list(entries), parse_size(max_shard_size))
        self.files = [shard_file_name(k + 1, len(self.shards)) for k in range(len(self.shards))]
        self._queue = [(i, e) for i, shard in enumerate(self.shards) for e in shard]
        self._pos = 0
        self._file = None
        self._file_index = -1
        self.total_size = sum(_nbytes(s, d) for _, s, d in entries)
        self.copier = copier or PlainFiles()

    def _open(self, index: int) -> None:
        header: dict[str, dict] = {"__metadata__": self.metadata}
        offset = 0
        for name, shape, dtype in self.shards[index]:
            n = _nbytes(shape, dtype)
            header[name] = {"dtype": DTYPE_CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # tensor data starts 8-byte aligned, as safetensors writes it
        self._file = self.copier.create(os.path.join(self.out_dir, self.files[index]))
        self._file.write(struct.pack("<Q", len(blob)))
        self._file.write(blob)
        self._file_index = index

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.close()  # fsyncs
            self._file = None

    def write(self, name: str, tensor) -> None:
        if self._pos >= len(self._queue):
            raise ValueError(f"{name}: more tensors written than planned")
        index, (want, shape, dtype) = self._queue[self._pos]
        if name != want:
            raise ValueError(f"tensor '{name}' written where the plan expects '{want}'")
        if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
            raise ValueError(f"{name}: got {tensor.dtype} {list(tensor.shape)}, planned {dtype} {list(shape)}")
        if index != self._file_index:
            self._close_file()
            self._open(index)
        if isinstance(tensor, Spans):
            if tensor.nbytes != _nbytes(shape, dtype):
                raise ValueError(f"{name}: byte ranges hold {tensor.nbytes} bytes, planned {_nbytes(shape, dtype)}")
            self._file.copy(tensor.spans)
        else:
            data = tensor.detach().contiguous().reshape(-1)
            if data.numel():
                self._file.write(memoryview(data.view(torch.uint8).numpy()))
        self._pos += 1

    def close(self) -> str:
        """Finish the last shard and write the index; returns the index path."""
        if self._pos != len(self._queue):
            missing = self._queue[self._pos][1][0]
            raise ValueError(f"output incomplete: '{missing}' and {len(self._queue) - self._pos - 1} more not written")
        self._close_file()
        self.copier.close()
        weight_map = {name: self.files[i] for i, (name, _, _) in self._queue}
        return write_index(self.out_dir, weight_map, self.total_size)

    def abort(self) -> None:
        if self._file is not None:
            self._file.abort()
            self._file = None
        self.copier.close()


def write_index(out_dir: str, weight_map: dict[str, str], total_size: int) -> str:
    """model.safetensors.index.json as HF writes it; returns its path."""
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    path = os.path.join(out_dir, INDEX_NAME)
    with open(path, "w") as f:
        json.dump(index, f, indent=2)
        f.write("\n")
    return path


def write_sharded_safetensors(
    out_dir: str,
    entries: Sequence[Entry],
    max_shard_size,
    values,
    on_value: Callable[[int], None] | None = None,
    io_mode: str = "direct",
) -> ShardedSafetensorsWriter:
    """Write `values` ((name, tensor or Spans) pairs in the order of `entries`) as shards + index,
    the byte ranges of coming `Spans` requested from the disk ahead of their copy. `on_value(nbytes)`
    after each (progress); `io_mode`: "plain" (tensors only: `PlainFiles`) or a SpanCopier mode.
    Returns the closed writer (total_size, copier statistics)."""
    copier = PlainFiles() if io_mode == "plain" else SpanCopier(io_mode)
    writer = ShardedSafetensorsWriter(out_dir, entries, max_shard_size, copier=copier)
    try:
        values = values if io_mode == "plain" else with_read_ahead(values, writer.copier)
        for name, value in values:
            writer.write(name, value)
            if on_value is not None:
                on_value(value.nbytes)
        writer.close()
    except BaseException:
        writer.abort()
        raise
    return writer


class PlainWriteResult:
    """What `write_sharded_safetensors_plain` wrote (the fields data_phase_line reads)."""

    def __init__(self, total_size: int, copier=None):
        self.total_size, self.copier = total_size, copier


def write_sharded_safetensors_plain(
    out_dir: str,
    entries: Sequence[Entry],
    max_shard_size,
    values,
    on_value: Callable[[int], None] | None = None,
) -> PlainWriteResult:
    """`write_sharded_safetensors` through `PlainFiles`: `values` are (name, tensor) pairs in the
    order of `entries`; memory holds one tensor, whatever `max_shard_size`."""
    writer = write_sharded_safetensors(out_dir, entries, max_shard_size, values, on_value, io_mode="plain")
    return PlainWriteResult(writer.total_size)
