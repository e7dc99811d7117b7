"""Tensors as byte ranges of files.

Most converter outputs are the input bytes rearranged: a merged expert stack is its experts one
after another, megatron-core's fused QKV is the HF rows in another order, gated fc1 is [gate; up].
Such a tensor is described by `Spans` (where its bytes already are, in output order) and copied
as bytes by `span_copy.SpanCopier`, never made a tensor.

Row addresses: a tensor whose rows (all dims but the last) are contiguous byte runs is described by
one int64 per row (its file offset, file number in the top bits). The converters' own transforms
(QKV regroup, gate/up concat, TP row splits) work on such an address tensor shaped [rows, 1] exactly
as on the data, so the parameter table is not written twice.
"""

from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch

_FILE_SHIFT = 48  # file offsets below 256 TiB; the file number above


@dataclass(frozen=True)
class Span:
    path: str
    offset: int
    nbytes: int


@dataclass(frozen=True)
class Spans:
    """A tensor's value, as byte ranges of files in order (no data held)."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    spans: tuple[Span, ...]

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.spans)

    def read(self) -> torch.Tensor:
        """The tensor itself (for the paths that must compute on the data, e.g. a dtype cast)."""
        out = torch.empty(self.shape, dtype=self.dtype)
        view = memoryview(out.reshape(-1).view(torch.uint8).numpy()) if out.numel() else memoryview(b"")
        done = 0
        for span in self.spans:
            if read_range_into(span.path, span.offset, view[done : done + span.nbytes]) < span.nbytes:
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
        self._paths: list[str] = []
        self._number: dict[str, int] = {}

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
        out = tuple(
            Span(self._paths[a >> _FILE_SHIFT], a & mask, (e - s) * row_bytes)
            for a, s, e in zip(firsts, starts, ends, strict=True)
        )
        return Spans(tuple(shape), dtype, out)


def with_read_ahead(
    items: Iterable[tuple[str, object]], copier, window_bytes: int = 256 * 2**20
) -> Iterator[tuple[str, object]]:
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
    out: list[Span] = []
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
    shape: tuple[int, ...]
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
        return RowAddresses(
            self.addresses[start : start + count],
            self.row_bytes,
            (count,) + tuple(self.shape[1:]),
            self.dtype,
            self.files,
        )

    def spans(self) -> Spans:
        return self.files.spans(self.addresses, self.row_bytes, self.shape, self.dtype)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
