"""Tensors as byte ranges of files, copied file to file inside the kernel.

Most converter outputs are the input bytes rearranged: a merged expert stack is its experts one
after another, megatron-core's fused QKV is the HF rows in another order, gated fc1 is [gate; up].
Such a tensor is described by `Spans` (where its bytes already are, in output order) and written
with `os.copy_file_range`: the page cache copies to the page cache, as `shutil.copyfile` does, and
no byte passes through this process's memory. Where the kernel or file system cannot do that
(cross-device copies on older kernels, some network file systems), the bytes go through one
reusable buffer instead.

Row addresses: a tensor whose rows (all dims but the last) are contiguous byte runs is described by
one int64 per row (its file offset, file number in the top bits). The converters' own transforms
(QKV regroup, gate/up concat, TP row splits) work on such an address tensor shaped [rows, 1] exactly
as on the data, so the parameter table is not written twice.
"""

import errno
import os
from collections import deque
from dataclasses import dataclass
from typing import Dict, Iterable, Iterator, List, Sequence, Tuple

import torch

_FILE_SHIFT = 48  # file offsets below 256 TiB; the file number above
_FALLBACK_ERRNOS = {errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EBADF, errno.EPERM}
_BUFFER_BYTES = 16 * 2**20


@dataclass(frozen=True)
class Span:
    path: str
    offset: int
    nbytes: int


@dataclass(frozen=True)
class Spans:
    """A tensor's value, as byte ranges of files in order (no data held)."""

    shape: Tuple[int, ...]
    dtype: torch.dtype
    spans: Tuple[Span, ...]

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.spans)

    def read(self) -> torch.Tensor:
        """The tensor itself (for the paths that must compute on the data, e.g. a dtype cast)."""
        out = torch.empty(self.shape, dtype=self.dtype)
        view = memoryview(out.reshape(-1).view(torch.uint8).numpy()) if out.numel() else memoryview(b"")
        done = 0
        for span in self.spans:
            if read_range_into(span.path, span.offset, view[done:done + span.nbytes]) < span.nbytes:
                raise ValueError(f"{span.path}: ends before byte {span.offset + span.nbytes}")
            done += span.nbytes
        return out


def read_range_into(path: str, offset: int, view: memoryview) -> int:
    """Read file bytes from `offset` into `view`; returns how many (fewer only at end of file)."""
    done = 0
    with open(path, "rb", buffering=0) as f:
        f.seek(offset)
        while done < len(view):
            n = f.readinto(view[done:])
            if not n:
                break
            done += n
    return done


class FileTable:
    """Numbers files for row addresses (path <-> small int)."""

    def __init__(self):
        self._paths: List[str] = []
        self._number: Dict[str, int] = {}

    def number(self, path: str) -> int:
        if path not in self._number:
            self._number[path] = len(self._paths)
            self._paths.append(path)
        return self._number[path]

    def row_addresses(self, path: str, offset: int, rows: int, row_bytes: int) -> torch.Tensor:
        """[rows, 1] addresses of `rows` consecutive rows of `row_bytes` starting at `offset`."""
        if offset + rows * row_bytes >= 1 << _FILE_SHIFT:
            raise ValueError(f"{path}: offsets beyond 256 TiB are not supported")
        base = (self.number(path) << _FILE_SHIFT) + offset
        return (base + torch.arange(rows, dtype=torch.int64) * row_bytes).reshape(rows, 1)

    def spans(self, addresses: torch.Tensor, row_bytes: int, shape, dtype) -> Spans:
        """Coalesce row addresses (any shape; read in order) into the fewest byte ranges."""
        flat = addresses.reshape(-1)
        if flat.numel() == 0 or row_bytes == 0:
            return Spans(tuple(shape), dtype, ())
        breaks = torch.nonzero(flat[1:] != flat[:-1] + row_bytes).reshape(-1) + 1
        starts = [0] + breaks.tolist()
        ends = breaks.tolist() + [flat.numel()]
        firsts = flat[starts].tolist()
        mask = (1 << _FILE_SHIFT) - 1
        out = tuple(Span(self._paths[a >> _FILE_SHIFT], a & mask, (e - s) * row_bytes)
                    for a, s, e in zip(firsts, starts, ends))
        return Spans(tuple(shape), dtype, out)


class SpanCopier:
    """Copies spans to the current position of an output file; keeps source files open."""

    def __init__(self):
        self._sources: Dict[str, int] = {}
        self._kernel = hasattr(os, "copy_file_range")  # Linux; until the kernel says it cannot
        self._buffer = None
        self.kernel_bytes = 0
        self.buffered_bytes = 0

    def _fd(self, path: str) -> int:
        if path not in self._sources:
            self._sources[path] = os.open(path, os.O_RDONLY)
        return self._sources[path]

    def read_ahead(self, spans: Sequence[Span]) -> None:
        """Ask the kernel to start reading these ranges now (they are copied soon): a cold
        checkpoint is read from disk while earlier ranges are copied (25-35% faster here)."""
        if hasattr(os, "posix_fadvise"):
            for span in spans:
                if span.nbytes:
                    os.posix_fadvise(self._fd(span.path), span.offset, span.nbytes, os.POSIX_FADV_WILLNEED)

    def copy(self, spans: Sequence[Span], out_fd: int) -> int:
        self.read_ahead(spans)
        total = 0
        for span in spans:
            self._copy_one(span, out_fd)
            total += span.nbytes
        return total

    def _copy_one(self, span: Span, out_fd: int) -> None:
        src, offset, left = self._fd(span.path), span.offset, span.nbytes
        while left and self._kernel:
            try:
                n = os.copy_file_range(src, out_fd, min(left, 1 << 30), offset)
            except OSError as e:
                if e.errno not in _FALLBACK_ERRNOS:
                    raise
                self._kernel = False
                break
            if n == 0:
                raise ValueError(f"{span.path}: ends before byte {span.offset + span.nbytes}")
            offset, left = offset + n, left - n
            self.kernel_bytes += n
        while left:
            if self._buffer is None:
                self._buffer = memoryview(bytearray(_BUFFER_BYTES))
            n = os.preadv(src, [self._buffer[:min(left, _BUFFER_BYTES)]], offset)
            if n == 0:
                raise ValueError(f"{span.path}: ends before byte {span.offset + span.nbytes}")
            written = 0
            while written < n:
                written += os.write(out_fd, self._buffer[written:n])
            offset, left = offset + n, left - n
            self.buffered_bytes += n

    def close(self) -> None:
        for fd in self._sources.values():
            os.close(fd)
        self._sources.clear()


def with_read_ahead(items: Iterable[Tuple[str, object]], copier: SpanCopier,
                    window_bytes: int = 256 * 2**20) -> Iterator[Tuple[str, object]]:
    """(name, value) pairs as given, pulled up to `window_bytes` ahead so that the byte ranges of
    the coming `Spans` values are requested from the disk before they are copied. Tensor values
    pulled ahead stay in memory until yielded (at most the window)."""
    ahead: deque = deque()
    size = 0
    source = iter(items)
    for item in source:
        ahead.append(item)
        size += item[1].nbytes
        if isinstance(item[1], Spans):
            copier.read_ahead(item[1].spans)
        while size > window_bytes and len(ahead) > 1:
            name, value = ahead.popleft()
            size -= value.nbytes
            yield name, value
    while ahead:
        yield ahead.popleft()


def concat_spans(parts: Sequence[Spans], shape, dtype) -> Spans:
    """Several tensors' bytes one after another (e.g. experts stacked on a new dim 0), adjacent
    ranges joined."""
    out: List[Span] = []
    for part in parts:
        for span in part.spans:
            last = out[-1] if out else None
            if last is not None and last.path == span.path and last.offset + last.nbytes == span.offset:
                out[-1] = Span(last.path, last.offset, last.nbytes + span.nbytes)
            else:
                out.append(span)
    return Spans(tuple(shape), dtype, tuple(out))


@dataclass(frozen=True)
class RowAddresses:
    """A matrix-like tensor (`shape`, `dtype`) whose rows of `row_bytes` are at `addresses` (one per
    row, C order over all dims but the last): what a converter hands its writer instead of data."""

    addresses: torch.Tensor
    row_bytes: int
    shape: Tuple[int, ...]
    dtype: torch.dtype
    files: FileTable

    def reshape(self, shape) -> "RowAddresses":
        """The same rows under another shape with the same last dim (e.g. leading 1s added)."""
        shape = tuple(shape)
        if not shape or shape[-1] != self.shape[-1] or _numel(shape) != _numel(self.shape):
            raise ValueError(f"cannot view rows of {list(self.shape)} as {list(shape)}")
        return RowAddresses(self.addresses, self.row_bytes, shape, self.dtype, self.files)

    def rows(self, start: int, count: int) -> "RowAddresses":
        """Rows start .. start+count (of a 2-D shape)."""
        return RowAddresses(self.addresses[start:start + count], self.row_bytes,
                            (count,) + tuple(self.shape[1:]), self.dtype, self.files)

    def spans(self) -> Spans:
        return self.files.spans(self.addresses, self.row_bytes, self.shape, self.dtype)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
