"""HF safetensors reads with plain file I/O, for converters that stream whole checkpoints.

`HFCheckpointReader.get` goes through safetensors' mmap: every page read stays mapped, and counted
in the process's resident memory, until the shard is closed, so streaming a 30 GB checkpoint looks
like a 30 GB process (the pages are clean and reclaimable, but RSS limits and OOM heuristics see
them). `DirectHFReader` validates exactly like its parent (index, shards, headers, names) and then
reads each tensor's bytes with `readinto` into a fresh tensor: resident memory is the tensors the
converter holds, nothing more. `spans` / `row_addresses` say where a tensor's bytes are without
reading them (for converters that copy bytes file to file: byte_spans).
"""

import json
import math
import os
import struct

import torch

from megadiff.checkpoint.bytecopy.byte_spans import FileTable, Span, Spans, read_range_into
from megadiff.errors import CheckpointError
from megadiff.hf.checkpoint_reader import SAFETENSORS_DTYPE_BYTES, HFCheckpointReader

_TORCH_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class DirectHFReader(HFCheckpointReader):
    def __init__(self, hf_dir: str):
        super().__init__(hf_dir)
        self._handles.clear()  # the validation mmaps; headers reopen lazily (shape / dtype queries)
        self._headers: dict[str, tuple[int, dict]] = {}

    def _header(self, shard: str) -> tuple[int, dict]:
        if shard not in self._headers:
            path = os.path.join(self.hf_dir, shard)
            with open(path, "rb") as f:
                (length,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(length))
            self._headers[shard] = (8 + length, header)
        return self._headers[shard]

    def _location(self, name: str, index: int | None = None) -> tuple[str, int, str, list]:
        """(file path, absolute offset of the data, dtype code, shape) of tensor `name`, or of its
        `index` along dim 0."""
        if name not in self._file_of:
            raise CheckpointError(f"{self.hf_dir}: tensor '{name}' not found in the checkpoint")
        shard = self._file_of[name]
        path = os.path.join(self.hf_dir, shard)
        start, header = self._header(shard)
        entry = header[name]
        code, shape = entry["dtype"], list(entry["shape"])
        if code not in _TORCH_DTYPES:
            raise CheckpointError(f"{path}: tensor '{name}' has unsupported dtype {code}")
        begin = start + entry["data_offsets"][0]
        if index is not None:
            if not 0 <= index < shape[0]:
                raise CheckpointError(f"{path}: tensor '{name}' has no index {index} (dim 0 is {shape[0]})")
            shape = shape[1:]
            begin += index * _nbytes(code, shape)
        return path, begin, code, shape

    def spans(self, name: str, index: int | None = None) -> Spans:
        """Where tensor `name` (or its `index` along dim 0) lies in its file."""
        path, begin, code, shape = self._location(name, index)
        return Spans(tuple(shape), _TORCH_DTYPES[code], (Span(path, begin, _nbytes(code, shape)),))

    def row_addresses(
        self, files: FileTable, name: str, index: int | None = None
    ) -> tuple[torch.Tensor, int, torch.dtype] | None:
        """([rows, 1] byte addresses of the rows of `name` (or of its `index` along dim 0), bytes
        per row, dtype): the input of byte_spans' transforms-on-addresses. None for a vector."""
        path, begin, code, shape = self._location(name, index)
        if len(shape) < 2:
            return None
        row = _nbytes(code, shape[-1:])
        return files.row_addresses(path, begin, math.prod(shape[:-1]), row), row, _TORCH_DTYPES[code]

    def _read(self, name: str, index: int | None = None) -> torch.Tensor:
        path, begin, code, shape = self._location(name, index)
        tensor = torch.empty(shape, dtype=_TORCH_DTYPES[code])
        if tensor.numel():
            view = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
            if read_range_into(path, begin, view) < len(view):
                raise CheckpointError(f"{path}: tensor '{name}' could not be read (file ends early)")
        return tensor

    def get(self, name: str) -> torch.Tensor:
        return self._read(name)

    def get_index(self, name: str, index: int) -> torch.Tensor:
        return self._read(name, index)


def _nbytes(code: str, shape) -> int:
    return SAFETENSORS_DTYPE_BYTES[code] * math.prod(shape)
