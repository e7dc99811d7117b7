"""Write a megatron-core dist checkpoint whose tensors are computed one at a time.

Converters build the model on the meta device (no memory), take megatron-core's own sharded state
dict of it (so keys, global shapes, shard offsets and ShardedObjects are exactly what the trainer
would save and load), and let this module ask for each real tensor only when its bytes are written.

Memory: torch's FileSystemWriter keeps every tensor of a file alive until the file is closed (it
collects them for its safetensors mode), so `_StreamingWriter` writes the items itself, one at a
time, with torch's own `_write_item` (the same helper megatron-core's writer uses): the files and
`.metadata` are byte-compatible with megatron-core's torch_dist backend.

Speed: a value may also be `byte_spans.RowAddresses` (rows already in files, e.g. HF safetensors):
its record is written by torch.save with `skip_data` (pickle, zip headers) and the hole torch.save
leaves for the bytes is filled by `span_copy.SpanCopier` from the source files (direct I/O by
default), the bytes never made a tensor. Records are written without CRC-32: torch.load never
checks it, and computing it cost more than the copy (benchmarks/RESULTS.md, "measured in passing").
"""

import io
import os
from collections.abc import Callable

import torch
from torch.distributed.checkpoint import CheckpointException, FileSystemWriter
from torch.distributed.checkpoint.filesystem import DEFAULT_SUFFIX
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future

from checkpoint_converters.byte_spans import RowAddresses, Spans
from checkpoint_converters.span_copy import SpanCopier
from megadiff.platform.compat import dcp_storage_info, save_common_state, sharded_items_by_key, write_dcp_item


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


def _item_nbytes(item: WriteItem) -> int:
    count = 1
    for s in item.tensor_data.chunk.sizes:
        count *= s
    return count * torch.empty((), dtype=item.tensor_data.properties.dtype).element_size()


class _StreamingWriter(FileSystemWriter):
    """One `__<rank>_0.distcp` file per rank, tensors resolved and written one at a time."""

    def __init__(self, path, on_tensor: Callable[[int, int], None] | None = None, copier: SpanCopier | None = None):
        super().__init__(path, single_file_per_rank=True, sync_files=True, thread_count=1)
        self._on_tensor = on_tensor
        self.copier = copier or SpanCopier()

    def write_data(self, plan, planner):
        storage_key = f"{plan.storage_data.prefix}0{DEFAULT_SUFFIX}"
        path = self.fs.concat_path(self.path, storage_key)
        results = []
        total = sum(_item_nbytes(i) for i in plan.items if i.type != WriteItemType.BYTE_IO)
        crc = torch.serialization.get_crc32_options()
        torch.serialization.set_crc32_options(False)
        read_ahead = self._read_ahead(plan.items, planner)
        stream = self.copier.create(os.fspath(path))
        try:
            for item in plan.items:
                next(read_ahead)
                data = planner.resolve_data(item)
                if isinstance(data, RowAddresses):
                    results.append(self._write_spans(stream, data.spans(), item, storage_key))
                else:
                    if item.type != WriteItemType.BYTE_IO:
                        data = data.detach()
                        if data.untyped_storage().nbytes() != data.nbytes or not data.is_contiguous():
                            data = data.contiguous().clone()
                    results.append(write_dcp_item(self.transforms, stream, data, item, storage_key))
                if item.type != WriteItemType.BYTE_IO and self._on_tensor:
                    self._on_tensor(_item_nbytes(item), total)
                del data
            stream.close()  # fsyncs
        except BaseException:
            stream.abort()
            raise
        finally:
            torch.serialization.set_crc32_options(crc)
            self.copier.close()
        future: Future = Future()
        future.set_result(results)
        return future

    def _read_ahead(self, items, planner, window_bytes: int = 256 * 2**20):
        """Before each item is written (one `next` per item), announce to the copier the source
        ranges of the items up to `window_bytes` ahead, in write order: the HF files are read from
        disk while the current item is copied, not item by item on demand (faster with the page
        cache: benchmarks/RESULTS.md, "measured in passing")."""
        state = getattr(planner, "state_dict", {})
        ahead, pending = 0, 0  # next item to look at; bytes looked at but not yet written
        for i, item in enumerate(items):
            while ahead < len(items) and (ahead <= i or pending < window_bytes):
                upcoming = items[ahead]
                entry = state.get(upcoming.index.fqn)
                if upcoming.type != WriteItemType.BYTE_IO and isinstance(entry, _LazyShards):
                    spans = entry.peek_spans(upcoming.index)
                    if spans is not None:
                        self.copier.read_ahead(spans.spans)
                    pending += _item_nbytes(upcoming)
                ahead += 1
            yield
            if item.type != WriteItemType.BYTE_IO:
                pending -= _item_nbytes(item)

    def _write_spans(self, stream, spans: Spans, item: WriteItem, storage_key: str) -> WriteResult:
        """One torch.save record whose tensor bytes are copied from `spans` (see the module doc)."""
        offset = stream.tell()
        placeholder = torch.empty(spans.shape, dtype=spans.dtype)  # never touched: no memory used
        with torch.serialization.skip_data():
            torch.save(placeholder, _HoleFillingStream(stream, lambda n: self._fill(stream, spans, n)))
        length = stream.tell() - offset
        return WriteResult(
            index=item.index, size_in_bytes=length, storage_data=dcp_storage_info(storage_key, offset, length)
        )

    def _fill(self, stream, spans: Spans, nbytes: int) -> None:
        if nbytes != spans.nbytes:
            raise ValueError(f"torch.save left {nbytes} bytes for a tensor of {spans.nbytes}")
        stream.copy(spans.spans)


class _HoleFillingStream(io.RawIOBase):
    """The checkpoint file as torch.save sees it under `skip_data`: where it would skip over the
    tensor bytes (seek forward), `fill(nbytes)` writes them instead. Exactly one hole per record."""

    def __init__(self, stream, fill: Callable[[int], None]):
        self._stream, self._fill, self._holes = stream, fill, 0

    def writable(self):
        return True

    def seekable(self):
        return True

    def write(self, b):
        return self._stream.write(b)

    def tell(self):
        return self._stream.tell()

    def seek(self, offset, whence=io.SEEK_SET):
        if whence == io.SEEK_CUR and offset > 0 and self._holes == 0:
            self._holes += 1
            self._fill(offset)
            return self._stream.tell()
        if whence == io.SEEK_CUR and offset == 0:
            return self._stream.tell()
        raise io.UnsupportedOperation(f"torch.save seeked ({offset}, {whence}) where a data hole was expected")

    def flush(self):
        self._stream.flush()


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
) -> None:
    """Collective. Save `sharded_state_dict` (placeholders; consumed) into `checkpoint_dir` the way
    dist_checkpointing.save would, calling `materialize(path)` for each entry's real value (a
    tensor or `RowAddresses`). `on_tensor(bytes_written, total_bytes_of_this_rank)` is called after
    each tensor (progress); `copier` counts the bytes copied file to file; `peek(path)` returns an
    entry's `RowAddresses` (or None) without reading anything, for read-ahead."""
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
                return _piece(value_of(owner), base, view).reshape(sizes)

            def peek_rows(owner=owner, base=base, view=view, sizes=sizes):
                rows = peek(owner) if peek is not None else None
                if rows is None or rows.dtype != base.dtype:
                    return None
                rows = _row_piece(rows, base, view)
                return rows.reshape(sizes) if rows is not None else None

            shards.append((tuple(sh.global_offset), sizes, compute, peek_rows))
        to_save[key] = _LazyShards(key, items[0].global_shape, items[0].dtype, shards)

    try:
        torch.distributed.checkpoint.save(
            to_save,
            storage_writer=_StreamingWriter(checkpoint_dir, on_tensor, copier),
            planner=MCoreSavePlanner(flatten_state_dict=False),
        )
    except CheckpointException as e:  # DCP wraps everything, Ctrl-C included: let a Ctrl-C be one
        if any(isinstance(f[0] if isinstance(f, tuple) else f, KeyboardInterrupt) for f in e.failures.values()):
            raise KeyboardInterrupt from e
        raise
    cache.clear()
    if torch.distributed.get_rank() == 0:
        save_config(CheckpointingConfig("torch_dist", 1), checkpoint_dir)
    torch.distributed.barrier()
