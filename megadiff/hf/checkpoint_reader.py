"""Streaming access to Hugging Face safetensors checkpoints (single file or sharded + index).

Tensors are read one at a time with `safe_open`, so memory stays bounded by the largest tensor
whatever the model size. Every error names the file and, where it applies, the tensor.
Needs neither transformers nor megatron-core, so tools that only move bytes start fast.
"""

import json
import os
from collections.abc import Iterator

import torch
from safetensors import safe_open

from megadiff.errors import CheckpointError
from megadiff.files.inside import check_links_inside, file_inside

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


MCORE_MARKERS = ("megadiff.json", "latest_checkpointed_iteration.txt")  # megadiff.checkpoint.format's


def read_json(path: str, kind: type = dict) -> dict:
    """The JSON file at `path`, which must hold a `kind` (a JSON object by default)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: file not found")
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    except (UnicodeDecodeError, RecursionError) as e:
        raise CheckpointError(f"{path}: not a JSON file ({type(e).__name__})") from None
    if not isinstance(data, kind):
        raise CheckpointError(
            f"{path}: holds a JSON {type(data).__name__}, expected a JSON {'object' if kind is dict else kind.__name__}"
        )
    return data


def _megatron_checkpoint_error(hf_dir: str) -> CheckpointError | None:
    """The error for a megadiff megatron checkpoint given where an HF dir is expected."""
    names = os.listdir(hf_dir)
    if any(n in MCORE_MARKERS or n.startswith("iter_") for n in names):
        return CheckpointError(
            f"{hf_dir}: a megadiff megatron checkpoint, not a Hugging Face model directory (no config.json); pass "
            f"it as --mcore-dir (tools/convert_mcore_to_hf.py exports it as an HF dir; in training: "
            f"model.init_from_mcore, with model.hf_dir the HF dir it came from)"
        )
    return None


def read_hf_config(hf_dir: str) -> dict:
    """config.json of an HF model dir, which must be a JSON object inside the dir."""
    if not os.path.isdir(hf_dir):
        raise CheckpointError(f"{hf_dir}: model directory not found")
    path = file_inside(hf_dir, "config.json", "config.json")
    if not os.path.isfile(path) and _megatron_checkpoint_error(hf_dir):
        raise _megatron_checkpoint_error(hf_dir)
    return read_json(path)


class HFCheckpointReader:
    """Tensor names, shapes, dtypes and values of an HF checkpoint, read lazily."""

    def __init__(self, hf_dir: str):
        if not os.path.isdir(hf_dir):
            raise CheckpointError(f"{hf_dir}: model directory not found")
        self.hf_dir = hf_dir
        self._file_of: dict[str, str] = {}
        self._handles: dict[str, object] = {}
        check_links_inside(hf_dir, "model directory")  # no shard, index or config read from elsewhere
        index_path = os.path.join(hf_dir, INDEX_NAME)
        single_path = os.path.join(hf_dir, SINGLE_NAME)
        if os.path.isfile(index_path):
            weight_map = read_json(index_path).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{index_path}: no 'weight_map' entries")
            if not all(isinstance(v, str) for v in weight_map.values()):
                raise CheckpointError(f"{index_path}: 'weight_map' values must be shard file names")
            for shard in sorted(set(weight_map.values())):
                path = file_inside(hf_dir, shard, f"shard listed in {INDEX_NAME}")
                if not os.path.isfile(path):
                    raise CheckpointError(f"{index_path}: shard '{shard}' is listed but missing")
            self._file_of = dict(weight_map)
        elif os.path.isfile(single_path):
            for name in self._open(SINGLE_NAME).keys():
                self._file_of[name] = SINGLE_NAME
        else:
            raise _megatron_checkpoint_error(hf_dir) or CheckpointError(
                f"{hf_dir}: neither {INDEX_NAME} nor {SINGLE_NAME} found"
            )
        for shard in sorted(set(self._file_of.values())):
            present = set(self._open(shard).keys())
            listed = {n for n, f in self._file_of.items() if f == shard}
            missing = sorted(listed - present)
            if missing:
                raise CheckpointError(
                    f"{os.path.join(hf_dir, shard)}: tensor '{missing[0]}' is listed in the index "
                    f"but not stored in this shard ({len(missing)} missing)"
                )

    def _open(self, shard: str):
        if shard not in self._handles:
            path = os.path.join(self.hf_dir, shard)
            try:
                self._handles[shard] = safe_open(path, framework="pt")
            except Exception as e:  # safetensors raises several types for corrupt files
                raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
        return self._handles[shard]

    def names(self) -> list[str]:
        return sorted(self._file_of)

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def file_of(self, name: str) -> str:
        return self._file_of[name]

    def _slice(self, name: str):
        if name not in self._file_of:
            raise CheckpointError(f"{self.hf_dir}: tensor '{name}' not found in the checkpoint")
        return self._open(self._file_of[name]).get_slice(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._slice(name).get_shape())

    def dtype_str(self, name: str) -> str:
        return self._slice(name).get_dtype()

    def get(self, name: str) -> torch.Tensor:
        if name not in self._file_of:
            raise CheckpointError(f"{self.hf_dir}: tensor '{name}' not found in the checkpoint")
        path = os.path.join(self.hf_dir, self._file_of[name])
        try:
            return self._open(self._file_of[name]).get_tensor(name)
        except Exception as e:
            raise CheckpointError(f"{path}: tensor '{name}' could not be read ({e})") from None

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.names():
            yield name, self.get(name)

    def get_index(self, name: str, index: int) -> torch.Tensor:
        """`tensor[index]` along dim 0 (e.g. one expert of a stacked [E, ...] tensor), reading only
        those bytes."""
        path = os.path.join(self.hf_dir, self._file_of.get(name, "?"))
        piece = self._slice(name)
        try:
            return piece[index]
        except Exception as e:
            raise CheckpointError(f"{path}: tensor '{name}'[{index}] could not be read ({e})") from None

    def nbytes(self, name: str) -> int:
        """Size of a tensor's data in bytes, from the header (nothing is read)."""
        count = 1
        for s in self.shape(name):
            count *= s
        dtype = self.dtype_str(name)
        if dtype not in SAFETENSORS_DTYPE_BYTES:
            raise CheckpointError(f"{self.file_of(name)}: tensor '{name}' has unsupported dtype {dtype}")
        return count * SAFETENSORS_DTYPE_BYTES[dtype]


SAFETENSORS_DTYPES = {
    "F32": torch.float32,
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
}
SAFETENSORS_DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}


def check_tensors_match(
    reader: HFCheckpointReader, expected: dict[str, tuple[int, ...]], ignore: frozenset[str] = frozenset()
) -> None:
    """Raise naming the first missing, unexpected or wrongly shaped tensor (`ignore`: names that
    may be there and are not read, e.g. a Ling-2.0 model's multi-token-prediction layers)."""
    names = set(reader.names()) - set(ignore)
    missing = sorted(set(expected) - names)
    if missing:
        raise CheckpointError(f"{reader.hf_dir}: tensor '{missing[0]}' is missing ({len(missing)} missing in all)")
    extra = sorted(names - set(expected))
    if extra:
        raise CheckpointError(
            f"{reader.file_of(extra[0])}: unexpected tensor '{extra[0]}' "
            f"({len(extra)} unexpected in all); is config.json for this checkpoint?"
        )
    for name, shape in sorted(expected.items()):
        got = reader.shape(name)
        if tuple(got) != tuple(shape):
            raise CheckpointError(
                f"{reader.file_of(name)}: tensor '{name}' has shape {list(got)}, config.json implies {list(shape)}"
            )
