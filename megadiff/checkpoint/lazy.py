"""Write a megatron-core dist checkpoint whose tensors are computed one at a time.

Converters build the model on the meta device (no memory), take megatron-core's own sharded state
dict of it (so keys, global shapes, shard offsets and ShardedObjects are exactly what the trainer
would save and load), and let this module ask for each real tensor only when it is written.

Two writers, the same checkpoint (tensors, keys, chunks, dtypes; tests/converters compare them):

- plain (`plain=True`): torch DCP's own `FileSystemWriter`, one file per item so that it holds one
  tensor at a time (it keeps every tensor of a file until the file is closed). Public torch DCP
  API plus its `_Checkpointable` protocol (as megatron-core's LocalShardsContainer uses it).
- fast (default here): megadiff.checkpoint.bytecopy's `StreamingWriter`, one file per rank like
  megatron-core writes; a value may be `RowAddresses` (rows already in the HF files), copied file
  to file without becoming a tensor.
"""

from collections.abc import Callable

import torch
from torch.distributed.checkpoint import CheckpointException, FileSystemWriter
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

from megadiff.platform.compat import save_common_state, sharded_items_by_key

from .bytecopy.byte_spans import RowAddresses, Spans
from .bytecopy.dcp_records import StreamingWriter
from .bytecopy.span_copy import SpanCopier


class _LazyShards(torch.Tensor):
    """The shards of one global tensor held by this rank, computed when DCP asks for them.

    Implements torch DCP's _Checkpointable protocol (like megatron-core's LocalShardsContainer)."""

    @staticmethod
    def __new__(cls, key, global_shape, dtype, shards):
        return torch.Tensor._make_wrapper_subclass(cls, torch.Size(global_shape), dtype=dtype, device="cpu")

    def __init__(self, key, global_shape, dtype, shards: list[tuple[tuple, tuple, Callable, Callable]]):
        self._key = key
        self._shards = shards  # (global offsets, sizes, compute, peek)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise NotImplementedError(f"_LazyShards is a placeholder for checkpoint writing, not a tensor ({func})")

    def __repr__(self):
        return f"_LazyShards({self._key}, {list(self.shape)}, {len(self._shards)} shards)"

    def __create_write_items__(self, fqn, obj):
        props = TensorProperties(dtype=self.dtype)
        return [
            WriteItem(
                index=MetadataIndex(fqn, torch.Size(offsets), i),
                type=WriteItemType.SHARD,
                tensor_data=TensorWriteData(
                    chunk=ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes)),
                    properties=props,
                    size=self.shape,
                ),
            )
            for i, (offsets, sizes, _, _) in enumerate(self._shards)
        ]

    def __create_chunk_list__(self):
        return [ChunkStorageMetadata(offsets=torch.Size(o), sizes=torch.Size(s)) for o, s, _, _ in self._shards]

    def peek_spans(self, index) -> Spans | None:
        """Where the shard's bytes already are, if it will be copied from there; reads nothing."""
        for offsets, _, _, peek in self._shards:
            if torch.Size(offsets) == index.offset:
                rows = peek()
                return rows.spans() if rows is not None else None
        return None

    def __get_tensor_shard__(self, index):
        for offsets, sizes, compute, _ in self._shards:  # index.index is a global hint: match offsets
            if torch.Size(offsets) == index.offset:
                tensor = compute()
                if tuple(tensor.shape) != tuple(sizes) or tensor.dtype != self.dtype:
                    raise ValueError(
                        f"{self._key} at {list(offsets)}: computed {tensor.dtype} {list(tensor.shape)}, "
                        f"expected {self.dtype} {list(sizes)}"
                    )
                return tensor
        raise ValueError(f"{self._key}: no shard at offset {list(index.offset)}")


def _owner(path: str, owners: dict[str, torch.Tensor]) -> str:
    """The state-dict entry a (factory-built) shard at `path` came from: its longest prefix."""
    for candidate in (path, *(path[:i] for i in reversed(range(len(path))) if path[i] == ".")):
        if candidate in owners:
            return candidate
    raise KeyError(f"{path}: no state-dict entry owns this sharded tensor")


def _row_piece(rows: RowAddresses, base: torch.Tensor, view: torch.Tensor) -> RowAddresses | None:
    """The rows of `rows` (the value of `base`) that `view` covers, when it is a block of whole rows."""
    if view is base:
        return rows
    if base.dim() != 2 or view.dim() != 2 or view.shape[1:] != base.shape[1:] or not view.is_contiguous():
        return None
    start, rem = divmod(view.storage_offset() - base.storage_offset(), base.shape[1])
    return rows.rows(start, view.shape[0]) if rem == 0 else None


def _piece(real, base: torch.Tensor, view: torch.Tensor):
    """The part of `real` (the value of `base`) that `view` (a view of `base`) covers. For
    `RowAddresses`, a block of whole rows stays addresses; anything else is read first."""
    if view is base:
        return real
    if isinstance(real, RowAddresses):
        rows = _row_piece(real, base, view)
        if rows is not None:
            return rows
        real = real.spans().read()
    return real.as_strided(view.size(), view.stride(), view.storage_offset() - base.storage_offset())


def write_lazily(
    sharded_state_dict: dict,
    checkpoint_dir: str,
    materialize: Callable[[str], torch.Tensor],
    on_tensor: Callable[[int, int], None] | None = None,
    copier: SpanCopier | None = None,
    peek: Callable[[str], RowAddresses | None] | None = None,
    plain: bool = False,
) -> None:
    """Collective. Save `sharded_state_dict` (placeholders; consumed) into `checkpoint_dir` the way
    dist_checkpointing.save would, calling `materialize(path)` for each entry's real value (a
    tensor, or with the fast writer also `RowAddresses`). `on_tensor(bytes_written,
    total_bytes_of_this_rank)` is called after each tensor (progress). `plain`: torch DCP's own
    writer (see the module doc); else the fast one, where `copier` counts the bytes copied file to
    file and `peek(path)` returns an entry's `RowAddresses` (or None) without reading anything,
    for read-ahead."""
    from megatron.core.dist_checkpointing.core import CheckpointingConfig, save_config
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    from megatron.core.dist_checkpointing.state_dict_utils import save_preprocess
    from megatron.core.dist_checkpointing.strategies.torch import (
        MCoreSavePlanner,
        flatten_state_dict,
        mcore_to_pyt_state_dict,
    )

    # Each entry's placeholder tensor, before factories (e.g. gated fc1 -> [gate; up]) split it.
    owners = {
        path: item.data
        for path, item in flatten_state_dict(sharded_state_dict)[0].items()
        if isinstance(getattr(item, "data", None), torch.Tensor)
    }
    sharded, common = save_preprocess(sharded_state_dict, validate_access_integrity=True)
    sharded = save_common_state(sharded, common, checkpoint_dir)  # common.pt or ShardedObject 'common_state'
    groups, _, paths_of = sharded_items_by_key(sharded)

    cache: dict[str, torch.Tensor] = {}

    def value_of(owner: str) -> torch.Tensor:
        if owner not in cache:
            cache.clear()  # one entry at a time: bounded memory
            base = owners[owner]
            real = materialize(owner)
            if tuple(real.shape) != tuple(base.shape):
                raise ValueError(f"{owner}: materialized shape {list(real.shape)}, expected {list(base.shape)}")
            if isinstance(real, RowAddresses) and real.dtype != base.dtype:
                real = real.spans().read()
            cache[owner] = real if isinstance(real, RowAddresses) else real.to(base.dtype).contiguous()
        return cache[owner]

    to_save = {}
    for key, items in groups.items():
        if isinstance(items[0], ShardedObject):
            to_save.update(mcore_to_pyt_state_dict({key: items}))
            continue
        shards = []
        for path, sh in zip(paths_of[key], items, strict=True):
            if sh.flattened_range is not None:
                raise NotImplementedError(f"{key}: flattened shards cannot be written lazily")
            owner = _owner(path, owners)
            base, view = owners[owner], sh.data
            if not (view is base or view._base is base or (base._base is not None and view._base is base._base)):
                raise NotImplementedError(f"{path}: shard data is not a view of its entry's tensor")
            if not base.is_contiguous():
                raise NotImplementedError(f"{owner}: placeholder tensor must be contiguous")
            sizes = (1,) * sh.prepend_axis_num + tuple(sh.local_shape)

            def compute(owner=owner, base=base, view=view, sizes=sizes):
                value = _piece(value_of(owner), base, view).reshape(sizes)
                if plain:  # torch's writer has no per-item callback: count where DCP asks
                    if isinstance(value, RowAddresses):
                        raise TypeError(f"{owner}: the plain writer needs tensors, got row addresses")
                    progress(value.nbytes)
                return value

            def peek_rows(owner=owner, base=base, view=view, sizes=sizes):
                rows = peek(owner) if peek is not None else None
                if rows is None or rows.dtype != base.dtype:
                    return None
                rows = _row_piece(rows, base, view)
                return rows.reshape(sizes) if rows is not None else None

            shards.append((tuple(sh.global_offset), sizes, compute, peek_rows))
        to_save[key] = _LazyShards(key, items[0].global_shape, items[0].dtype, shards)

    total = sum(
        v.dtype.itemsize * _numel(sizes)
        for v in to_save.values()
        if isinstance(v, _LazyShards)
        for _, sizes, _, _ in v._shards
    )

    def progress(nbytes: int) -> None:
        if on_tensor is not None:
            on_tensor(nbytes, total)

    def peek_spans(fqn: str, index) -> Spans | None:
        entry = to_save.get(fqn)
        return entry.peek_spans(index) if isinstance(entry, _LazyShards) else None

    if plain:
        # One file per item: torch's writer holds a file's tensors until the file is written.
        writer = FileSystemWriter(checkpoint_dir, single_file_per_rank=False, sync_files=True, thread_count=1)
    else:
        writer = StreamingWriter(checkpoint_dir, on_tensor, copier, peek_spans)
    try:
        torch.distributed.checkpoint.save(
            to_save, storage_writer=writer, planner=MCoreSavePlanner(flatten_state_dict=False)
        )
    except CheckpointException as e:  # DCP wraps everything, Ctrl-C included: let a Ctrl-C be one
        if any(isinstance(f[0] if isinstance(f, tuple) else f, KeyboardInterrupt) for f in e.failures.values()):
            raise KeyboardInterrupt from e
        raise
    cache.clear()
    if torch.distributed.get_rank() == 0:
        save_config(CheckpointingConfig("torch_dist", 1), checkpoint_dir)
    torch.distributed.barrier()


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
