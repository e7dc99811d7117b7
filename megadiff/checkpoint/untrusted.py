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

Trusted or not, what the metadata names is checked against the files on disk before anything is
read (`check_data_files`): every file read resolves inside the checkpoint dir (no link or `../`
name leads elsewhere: megadiff.files.inside), is there and long enough, and no tensor claims more
bytes than its record holds, so a crafted `.metadata` cannot make a reader allocate more memory
than the checkpoint's files hold. A `.metadata` is unpickled from its bytes in memory (a pickle
that declares a huge frame or string reads no more than the file) and may not build a
`bytearray` of a given length.
"""

import dataclasses
import enum
import importlib
import io
import json
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
from megadiff.files.inside import check_links_inside, file_inside

from .format import DCP_METADATA_NAME, MCORE_CONFIG_NAME

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
}
_BYTEARRAY_FROM_LENGTH_LIMIT = 1 << 16  # bytearray(n) of a pickle allocates n bytes; DCP stores none


def _bytearray(*args):
    """builtins.bytearray for a `.metadata` pickle, which may copy bytes it holds but not ask for
    `bytearray(1_500_000_000)` (an allocation out of a 30-byte file)."""
    if args and isinstance(args[0], int) and args[0] > _BYTEARRAY_FROM_LENGTH_LIMIT:
        raise pickle.UnpicklingError(f"bytearray({args[0]}) asks for {args[0]} bytes")
    return bytearray(*args)


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
    if (module, name) == ("builtins", "bytearray"):
        return _bytearray
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


def _is_truncation(error: BaseException) -> bool:
    return isinstance(error, EOFError) or "truncated" in str(error)


def _unreadable(path: str, error: BaseException) -> CheckpointError:
    if _is_truncation(error):
        return CheckpointError(f"{path}: truncated (the file ends inside its pickle); copy the checkpoint again")
    return CheckpointError(f"{path}: unreadable ({error!r})")


def unpickle_dcp_metadata(data, source: str):
    """A DCP Metadata from a `.metadata` pickle (file object), with the allow-list above."""
    before = _class_attributes()
    try:
        metadata = _DCPMetadataUnpickler(data).load()
    except (EOFError, pickle.UnpicklingError) as e:
        if _is_truncation(e):
            raise _unreadable(source, e) from None
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
    """The DCP Metadata of a torch_dist checkpoint dir, checked against its files
    (`check_data_files`); unpickled with the allow-list, with a plain `pickle.load` only if `trust`."""
    if not os.path.isfile(os.path.join(ckpt_dir, DCP_METADATA_NAME)):
        raise CheckpointError(f"{ckpt_dir}: {DCP_METADATA_NAME} missing; not a dist_checkpointing directory")
    check_links_inside(ckpt_dir, "checkpoint directory")
    path = file_inside(ckpt_dir, DCP_METADATA_NAME)
    with open(path, "rb") as f:
        data = io.BytesIO(f.read())  # a declared frame or string length reads no more than the file
    if trust:
        try:
            metadata = pickle.load(data)
        except Exception as e:
            raise _unreadable(path, e) from None
        if not isinstance(metadata, Metadata):
            raise CheckpointError(f"{path}: holds a {type(metadata).__name__}, not torch DCP Metadata")
    else:
        metadata = unpickle_dcp_metadata(data, path)
    check_data_files(ckpt_dir, metadata)
    return metadata


def _element_size(dtype) -> int:
    return dtype.itemsize if isinstance(dtype, torch.dtype) else 1


def check_data_files(ckpt_dir: str, metadata) -> None:
    """Raise CheckpointError naming the item and the file unless every data file the metadata
    names is a plain name inside the checkpoint dir (a path such as '../../home/me/.ssh/id_rsa', or
    a link to it, would make the readers read, or the exporter copy, that file), exists and is long
    enough, and unless the tensors claim no more bytes than their records hold (each stored chunk
    at most its record's length, all of them together at most the data files' sizes): what a
    reader allocates is then bounded by the checkpoint's size on disk."""
    meta_path = os.path.join(ckpt_dir, DCP_METADATA_NAME)
    storage = metadata.storage_data or {}
    sizes: dict[str, int] = {}
    for index, info in storage.items():
        name = getattr(info, "relative_path", None)
        if name not in sizes:
            if not isinstance(name, str) or "/" in name or os.sep in name:
                raise CheckpointError(
                    f"{meta_path}: data file {name!r} is not a file name inside the checkpoint directory; "
                    f"refusing to read it"
                )
            path = file_inside(ckpt_dir, name, f"data file named in {DCP_METADATA_NAME}")
            if not os.path.isfile(path):
                raise CheckpointError(f"{path}: data file listed in {DCP_METADATA_NAME} is missing")
            sizes[name] = os.path.getsize(path)
        if not (
            isinstance(info.offset, int) and isinstance(info.length, int) and info.offset >= 0 and info.length >= 0
        ):
            raise CheckpointError(
                f"{meta_path}: item '{index.fqn}' has offset {info.offset!r}, length {info.length!r}; the metadata is corrupt"
            )
        if info.offset + info.length > sizes[name]:
            raise CheckpointError(
                f"{os.path.join(ckpt_dir, name)}: truncated ({sizes[name]} bytes, item '{index.fqn}' of "
                f"{DCP_METADATA_NAME} needs {info.offset + info.length}); the checkpoint is incomplete"
            )
    claimed = 0
    for fqn, item in metadata.state_dict_metadata.items():
        if not isinstance(item, TensorStorageMetadata):
            continue
        element = _element_size(getattr(item.properties, "dtype", None))
        for chunk in item.chunks:
            if any(not isinstance(n, int) or n < 0 for n in (*chunk.offsets, *chunk.sizes)):
                raise CheckpointError(
                    f"{meta_path}: tensor '{fqn}' has a chunk at {list(chunk.offsets)} of size {list(chunk.sizes)}; "
                    f"the metadata is corrupt"
                )
            nbytes = math.prod(chunk.sizes) * element
            if nbytes == 0:
                continue
            info = storage.get(md.MetadataIndex(fqn, chunk.offsets))
            if info is None:
                raise CheckpointError(
                    f"{meta_path}: tensor '{fqn}' at {list(chunk.offsets)} has no stored data; the checkpoint is "
                    f"incomplete"
                )
            if nbytes > info.length and not getattr(info, "transform_descriptors", None):
                raise CheckpointError(
                    f"{meta_path}: tensor '{fqn}' at {list(chunk.offsets)} claims {list(chunk.sizes)} "
                    f"{item.properties.dtype} ({nbytes} bytes) but its record in {info.relative_path} holds "
                    f"{info.length} bytes; refusing a metadata file that asks for more memory than the "
                    f"checkpoint's files hold"
                )
            claimed += nbytes
    on_disk = sum(sizes.values())
    if claimed > on_disk:
        raise CheckpointError(
            f"{meta_path}: its tensors claim {claimed} bytes in all, but the checkpoint's data files hold "
            f"{on_disk}; refusing a metadata file that asks for more memory than the checkpoint's files hold"
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


def check_common_state(ckpt_dir: str) -> None:
    """Before megatron-core loads `ckpt_dir`: its common (non-sharded) state is there. megatron-core
    0.16 keeps it in `common.pt` (its metadata.json then names a `common_backend`) and fails on a
    missing one with an AttributeError from its own error path; 0.17+ keeps it inside the DCP files."""
    config_path = file_inside(ckpt_dir, MCORE_CONFIG_NAME, "megatron-core metadata.json")
    try:
        with open(config_path) as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{config_path}: unreadable ({e})") from None
    common = file_inside(ckpt_dir, COMMON_STATE_NAME, "megatron-core common state")
    if isinstance(config, dict) and config.get("common_backend") and not os.path.isfile(common):
        raise CheckpointError(
            f"{common}: missing; megatron-core's {MCORE_CONFIG_NAME} says the checkpoint's common state is stored "
            f"there (common_backend {config['common_backend']!r}); the checkpoint is incomplete: copy it again"
        )


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
    except (EOFError, RuntimeError) as e:
        if isinstance(e, EOFError) or "central directory" in str(e) or "file_size" in str(e):
            raise CheckpointError(f"{source}: truncated or corrupt (not a complete torch.save file)") from None
        raise CheckpointError(f"{source}: unreadable ({e!r})") from None
    except Exception as e:
        raise CheckpointError(f"{source}: unreadable ({e!r})") from None


def vet_checkpoint(ckpt_dir: str, trust: bool = False, metadata=None, extra_state_is_loaded: bool = True):
    """Check, without running anything from it, every pickle of a torch_dist checkpoint dir that
    megatron-core would unpickle when loading it; returns its DCP Metadata (None if `trust`: then
    only its files are checked, `check_data_files`). `extra_state_is_loaded=False` (readers that never hand `_extra_state` to a
    model, e.g. the exporter) accepts non-empty extra state that holds only tensors. Raises
    CheckpointError naming the file and the item refused."""
    if trust:  # the files are still checked: inside the dir, present, long enough (check_data_files)
        if metadata is None:
            read_dcp_metadata(ckpt_dir, trust=True)
        else:
            check_data_files(ckpt_dir, metadata)
        return None

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
    common = file_inside(ckpt_dir, COMMON_STATE_NAME, "megatron-core common state")
    if os.path.isfile(common):
        with open(common, "rb") as f:
            _weights_only_load(f, common)
    return metadata
