"""Read a checkpoint someone else made without running code from it.

A torch_dist checkpoint holds pickles, and each of them can run any code when unpickled:
- `.metadata`, which torch DCP's FileSystemReader unpickles with a plain `pickle.load`;
- its byte items (megatron-core's `_extra_state` objects, its common state on 0.17+), which DCP's
  load planner unpickles with `torch.load(weights_only=False)`;
- non-empty `_extra_state` (Transformer Engine's FP8 metadata), which TE unpickles again with a plain
  `pickle.loads` when the model takes it;
- `common.pt` (megatron-core 0.16), `torch.load`ed by megatron-core.

By default megadiff therefore unpickles `.metadata` itself with an allow-list of what DCP writes
(`read_dcp_metadata`, `SafeFileSystemReader`), and before megatron-core reads a checkpoint,
`vet_checkpoint` unpickles every byte item and `common.pt` with torch's weights-only unpickler
and refuses `_extra_state` that is not empty. megatron-core then reads the vetted files with its
own readers (the same bytes, so the same objects). `trust=True` (`--trust-checkpoint`,
`checkpoint.trust_checkpoint: true`) turns all of this off, for one's own FP8 checkpoints.
The classes allowed are the ones found in converter- and trainer-made checkpoints of
megatron-core 0.16.1 (torch 2.13) and 0.19.2 (torch 2.11) with a recording unpickler.
"""

import dataclasses
import enum
import importlib
import math
import os
import pathlib
import pickle
import re

import torch
import torch.distributed.checkpoint.filesystem as fs
import torch.distributed.checkpoint.metadata as md
import torch.distributed.checkpoint.planner as planner
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, TensorStorageMetadata

from megadiff.errors import CheckpointError

from .format import DCP_METADATA_NAME

TRUST_HINT = (
    "if you made this checkpoint yourself (e.g. with Transformer Engine FP8), pass --trust-checkpoint "
    "(checkpoint.trust_checkpoint=true in a training config) to load it without these checks"
)
COMMON_STATE_NAME = "common.pt"  # megatron-core <= 0.16's non-sharded state

# DCP metadata: every dataclass / enum defined in these modules, and the named classes of others.
_DCP_MODULES_ALL_CLASSES = ("torch.distributed.checkpoint.metadata",)
_DCP_CLASSES = {
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.distributed.checkpoint.planner": {
        "SavePlan",
        "LoadPlan",
        "WriteItem",
        "ReadItem",
        "WriteItemType",
        "LoadItemType",
        "TensorWriteData",
        "BytesIOWriteData",
    },
}
_PLAIN_GLOBALS = {
    ("torch", "Size"),
    ("collections", "OrderedDict"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "slice"),
    ("builtins", "complex"),
    ("builtins", "bytearray"),
}


def _layout(name: str):
    """torch.serialization._get_layout, minus its module-level cache (which BUILD could rewrite)."""
    layouts = {str(v): v for v in vars(torch).values() if isinstance(v, torch.layout)}
    if name not in layouts:
        raise pickle.UnpicklingError(f"unknown torch layout {name!r}")
    return layouts[name]


def _allowed_global(module: str, name: str):
    """The object a `.metadata` pickle may name, or None."""
    if (module, name) == ("torch.serialization", "_get_layout"):
        return _layout
    if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
        return getattr(torch, name)
    if (module, name) in _PLAIN_GLOBALS:
        return getattr(importlib.import_module(module), name)
    if module in _DCP_MODULES_ALL_CLASSES or name in _DCP_CLASSES.get(module, ()):
        obj = getattr(importlib.import_module(module), name, None)
        # Only classes defined there (not whatever that module imported), and only plain data ones.
        if (
            isinstance(obj, type)
            and obj.__module__ == module
            and (dataclasses.is_dataclass(obj) or issubclass(obj, enum.Enum))
        ):
            return obj
    return None


class _DCPMetadataUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        obj = _allowed_global(module, name)
        if obj is None:
            raise pickle.UnpicklingError(f"'{module}.{name}' is not torch DCP metadata")
        return obj

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("persistent ids are not torch DCP metadata")


def _class_attributes() -> dict[type, dict]:
    """The attributes of the allowed Python classes: a pickle's BUILD can set attributes of a
    class object it names, which would outlive the load; compared before and after."""

    classes = [pathlib.PosixPath, pathlib.PurePosixPath]
    for module in (md, fs, planner):
        classes += [_allowed_global(module.__name__, n) for n in dir(module)]
    return {cls: dict(vars(cls)) for cls in classes if isinstance(cls, type)}


def unpickle_dcp_metadata(data, source: str):
    """A DCP Metadata from a `.metadata` pickle (file object), with the allow-list above."""
    before = _class_attributes()
    try:
        metadata = _DCPMetadataUnpickler(data).load()
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{source}: refused to unpickle it ({e}); a checkpoint's {DCP_METADATA_NAME} "
            f"holds only torch DCP metadata, this one would run code or build other "
            f"objects when loaded; {TRUST_HINT}"
        ) from None
    except Exception as e:
        raise CheckpointError(f"{source}: unreadable ({e!r})") from None
    finally:
        changed = [cls for cls, attrs in before.items() if dict(vars(cls)) != attrs]
        for cls in changed:  # undo, then refuse
            for key in set(vars(cls)) - set(before[cls]):
                delattr(cls, key)
            for key, value in before[cls].items():
                if vars(cls).get(key) is not value:
                    setattr(cls, key, value)
    if changed:
        raise CheckpointError(
            f"{source}: refused: its pickle sets attributes of {changed[0].__qualname__}; {TRUST_HINT}"
        )
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"{source}: holds a {type(metadata).__name__}, not torch DCP Metadata")
    return metadata


def read_dcp_metadata(ckpt_dir: str, trust: bool = False):
    """The DCP Metadata of a torch_dist checkpoint dir; plain `pickle.load` only if `trust`."""
    path = os.path.join(ckpt_dir, DCP_METADATA_NAME)
    if not os.path.isfile(path):
        raise CheckpointError(f"{ckpt_dir}: {DCP_METADATA_NAME} missing; not a dist_checkpointing directory")
    with open(path, "rb") as f:
        if trust:
            try:
                return pickle.load(f)
            except Exception as e:
                raise CheckpointError(f"{path}: unreadable ({e!r})") from None
        metadata = unpickle_dcp_metadata(f, path)
    check_storage_paths(ckpt_dir, metadata)
    return metadata


def check_storage_paths(ckpt_dir: str, metadata) -> None:
    """Data files named by the metadata must be plain names inside the checkpoint dir (a path such
    as '../../home/me/.ssh/id_rsa' would make the readers read, or the exporter copy, that file)."""
    for info in (metadata.storage_data or {}).values():
        name = getattr(info, "relative_path", None)
        if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or os.sep in name:
            raise CheckpointError(
                f"{os.path.join(ckpt_dir, DCP_METADATA_NAME)}: data file {name!r} is not a "
                f"file name inside the checkpoint directory; refusing to read it"
            )


try:
    from torch.distributed.checkpoint import FileSystemReader as _FileSystemReader
except ImportError:  # torch without distributed support: nothing to subclass
    _FileSystemReader = object


class SafeFileSystemReader(_FileSystemReader):
    """torch DCP's FileSystemReader whose `.metadata` is unpickled with the allow-list (unless
    `trust`), once: later calls return the same object."""

    def __init__(self, path, trust: bool = False):
        super().__init__(path)
        self._trust = trust
        self._metadata = None

    def read_metadata(self, *args, **kwargs):
        if self._metadata is None:
            from torch.distributed.checkpoint.metadata import StorageMeta

            metadata = read_dcp_metadata(str(self.path), self._trust)
            if getattr(metadata, "storage_meta", None) is None:  # as FileSystemReader does
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            self._metadata = metadata
        return self._metadata


def _is_empty_extra_state(value) -> bool:
    """None or an empty tensor: what megatron-core's local layers and TE without FP8 store."""
    if isinstance(value, (list, tuple)):
        return all(_is_empty_extra_state(v) for v in value)
    return value is None or (isinstance(value, torch.Tensor) and value.numel() == 0)


def _weights_only_load(f, source: str):
    """torch.load with the weights-only unpickler, tensor bytes not read (shapes only)."""
    try:
        with torch.serialization.skip_data():
            return torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        named = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = f"it names {named.group(1)}" if named else str(e).strip().splitlines()[0]
        raise CheckpointError(
            f"{source}: refused to unpickle it ({what}; only tensors and plain values "
            f"are allowed, anything else could run code); {TRUST_HINT}"
        ) from None
    except Exception as e:
        raise CheckpointError(f"{source}: unreadable ({e!r})") from None


def vet_checkpoint(ckpt_dir: str, trust: bool = False, metadata=None, extra_state_is_loaded: bool = True):
    """Check, without running anything from it, every pickle of a torch_dist checkpoint dir that
    megatron-core would unpickle when loading it; returns its DCP Metadata (None if `trust`:
    nothing is checked). `extra_state_is_loaded=False` (readers that never hand `_extra_state` to a
    model, e.g. the exporter) accepts non-empty extra state that holds only tensors. Raises
    CheckpointError naming the file and the item refused."""
    if trust:
        return metadata

    from .file_slice import FileSlice

    metadata = metadata if metadata is not None else read_dcp_metadata(ckpt_dir)
    fp8_refusal = (
        "is non-empty extra state (e.g. Transformer Engine's FP8 metadata, which TE unpickles "
        "without restriction when the model takes it)"
    )
    for index, info in (metadata.storage_data or {}).items():
        item = metadata.state_dict_metadata.get(index.fqn)
        extra_state = extra_state_is_loaded and "_extra_state" in index.fqn
        if isinstance(item, TensorStorageMetadata):
            if extra_state and math.prod(item.size) > 0:
                raise CheckpointError(f"{ckpt_dir}: tensor '{index.fqn}' {fp8_refusal}; {TRUST_HINT}")
            continue
        if not isinstance(item, BytesStorageMetadata):
            continue
        source = f"{os.path.join(ckpt_dir, info.relative_path)}: item '{index.fqn}'"
        if getattr(info, "transform_descriptors", None):
            raise CheckpointError(
                f"{source} is stored with stream transforms {list(info.transform_descriptors)} "
                f"that megadiff cannot check; {TRUST_HINT}"
            )
        path = os.path.join(ckpt_dir, info.relative_path)
        if not os.path.isfile(path) or os.path.getsize(path) < info.offset + info.length:
            raise CheckpointError(f"{source}: the data file is missing or shorter than the metadata says")
        with open(path, "rb") as f:  # only the record's zip headers and pickle are read (skip_data)
            value = _weights_only_load(FileSlice(f, info.offset, info.length), source)
        if extra_state and not _is_empty_extra_state(value):
            raise CheckpointError(f"{source} {fp8_refusal}; {TRUST_HINT}")
    common = os.path.join(ckpt_dir, COMMON_STATE_NAME)
    if os.path.isfile(common):
        with open(common, "rb") as f:
            _weights_only_load(f, common)
    return metadata
