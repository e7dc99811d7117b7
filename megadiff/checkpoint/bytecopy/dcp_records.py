"""torch.save records of a dist checkpoint, written and read by hand (the engine's DCP side).

Writing: `StreamingWriter` is a torch DCP `FileSystemWriter` that writes one `__<rank>_0.distcp`
file per rank itself, one item at a time, with torch's private per-item writer (`_write_item`,
the helper megatron-core's writer uses too), so the files and `.metadata` are byte-compatible
with megatron-core's torch_dist backend. torch's own writer keeps every tensor of a file alive
until the file is closed (it collects them for its safetensors mode); this one holds one item.
A value may also be `RowAddresses` (rows already in files, e.g. HF safetensors): its record is
written by torch.save with `skip_data` (pickle, zip headers) and the hole torch.save leaves for
the bytes is filled by `SpanCopier` from the source files, the bytes never made a tensor.
Records are written without CRC-32: torch.load never checks it, and computing it cost more than
the copy (benchmarks/RESULTS.md, convert).

Reading: `record_data_offset` finds where a record's raw tensor bytes are by parsing its zip
headers, so a converter can copy them file to file.

What this relies on beyond torch's documented API (private names, the record layout) is listed
and checked in megadiff.platform.compat ('torch_dcp_writer_internals'); the plain path
(megadiff.checkpoint.lazy with `plain=True`, the converters' `--io plain`) needs none of it.
"""

import io
import os
import struct
import zipfile
from collections.abc import Callable

import torch
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.filesystem import DEFAULT_SUFFIX
from torch.distributed.checkpoint.planner import WriteItem, WriteItemType
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future

from megadiff.platform.compat import dcp_storage_info, write_dcp_item

from ..file_slice import FileSlice
from .byte_spans import RowAddresses, Spans
from .span_copy import SpanCopier


def item_nbytes(item: WriteItem) -> int:
    count = 1
    for s in item.tensor_data.chunk.sizes:
        count *= s
    return count * torch.empty((), dtype=item.tensor_data.properties.dtype).element_size()


class StreamingWriter(FileSystemWriter):
    """One `__<rank>_0.distcp` file per rank, items resolved and written one at a time.
    `peek_spans(fqn, index)` says where an upcoming item's bytes already are (or None), for
    read-ahead; `on_tensor(nbytes, total)` after each tensor (progress)."""

    def __init__(
        self,
        path,
        on_tensor: Callable[[int, int], None] | None = None,
        copier: SpanCopier | None = None,
        peek_spans: Callable[[str, object], Spans | None] | None = None,
    ):
        super().__init__(path, single_file_per_rank=True, sync_files=True, thread_count=1)
        self._on_tensor = on_tensor
        self._peek_spans = peek_spans
        self.copier = copier or SpanCopier()

    def write_data(self, plan, planner):
        storage_key = f"{plan.storage_data.prefix}0{DEFAULT_SUFFIX}"
        path = self.fs.concat_path(self.path, storage_key)
        results = []
        total = sum(item_nbytes(i) for i in plan.items if i.type != WriteItemType.BYTE_IO)
        crc = torch.serialization.get_crc32_options()
        torch.serialization.set_crc32_options(False)
        read_ahead = self._read_ahead(plan.items)
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
                    self._on_tensor(item_nbytes(item), total)
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

    def _read_ahead(self, items, window_bytes: int = 256 * 2**20):
        """Before each item is written (one `next` per item), announce to the copier the source
        ranges of the items up to `window_bytes` ahead, in write order: the HF files are read from
        disk while the current item is copied, not item by item on demand (benchmarks/RESULTS.md)."""
        ahead, pending = 0, 0  # next item to look at; bytes looked at but not yet written
        for i, item in enumerate(items):
            while ahead < len(items) and (ahead <= i or pending < window_bytes):
                upcoming = items[ahead]
                if upcoming.type != WriteItemType.BYTE_IO:
                    spans = self._peek_spans(upcoming.index.fqn, upcoming.index) if self._peek_spans else None
                    if spans is not None:
                        self.copier.read_ahead(spans.spans)
                    pending += item_nbytes(upcoming)
                ahead += 1
            yield
            if item.type != WriteItemType.BYTE_IO:
                pending -= item_nbytes(item)

    def _write_spans(self, stream, spans: Spans, item: WriteItem, storage_key: str) -> WriteResult:
        """One torch.save record whose tensor bytes are copied from `spans` (see the module doc)."""
        offset = stream.tell()
        placeholder = torch.empty(spans.shape, dtype=spans.dtype)  # never touched: no memory used
        with torch.serialization.skip_data():
            torch.save(placeholder, HoleFillingStream(stream, lambda n: self._fill(stream, spans, n)))
        length = stream.tell() - offset
        return WriteResult(
            index=item.index, size_in_bytes=length, storage_data=dcp_storage_info(storage_key, offset, length)
        )

    def _fill(self, stream, spans: Spans, nbytes: int) -> None:
        if nbytes != spans.nbytes:
            raise ValueError(f"torch.save left {nbytes} bytes for a tensor of {spans.nbytes}")
        stream.copy(spans.spans)


class HoleFillingStream(io.RawIOBase):
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


def record_data_offset(path: str, offset: int, length: int, dtype: torch.dtype) -> int | None:
    """Absolute file offset of the raw bytes (C order) of the tensor in the torch.save record at
    [offset, offset + length) of `path`, when the record is one uncompressed, contiguous tensor of
    `dtype` (what DCP and megatron-core write); None otherwise (then read it). Reads only the
    record's zip headers and pickle."""
    try:
        with open(path, "rb") as f:
            record = zipfile.ZipFile(FileSlice(f, offset, length))
            data = [i for i in record.infolist() if i.filename.split("/")[-2:-1] == ["data"]]
            with torch.serialization.skip_data():  # shape / strides / storage, no bytes read
                tensor = torch.load(FileSlice(f, offset, length), map_location="cpu", weights_only=True)
            if (
                len(data) != 1
                or data[0].compress_type != zipfile.ZIP_STORED
                or not tensor.is_contiguous()
                or tensor.storage_offset() != 0
                or data[0].file_size != tensor.nbytes
                or tensor.dtype != dtype
                or tensor.untyped_storage().nbytes() != tensor.nbytes
            ):
                return None
            f.seek(offset + data[0].header_offset)
            header = f.read(30)
            if header[:4] != b"PK\x03\x04":
                return None
            name_len, extra_len = struct.unpack("<HH", header[26:30])
            return offset + data[0].header_offset + 30 + name_len + extra_len
    except Exception:  # anything unexpected: this item is simply read the ordinary way
        return None
