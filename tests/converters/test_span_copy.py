"""SpanCopier writes exactly the bytes asked for, however they are moved: O_DIRECT with read-ahead
(announced or not, in order or not), copy_file_range, or a buffer; and fails loudly."""

import errno
import fcntl
import os

import pytest

from megadiff.checkpoint.bytecopy import span_copy
from megadiff.checkpoint.bytecopy.byte_spans import Span
from megadiff.checkpoint.bytecopy.span_copy import ALIGN, SpanCopier, _open_direct_output

SMALL = dict(chunk_bytes=2 * ALIGN, read_buffers=3, block_bytes=3 * ALIGN)  # many chunks and blocks


def _direct_io_works(directory) -> bool:
    """Whether this file system takes O_DIRECT writes (ext4 here; tmpfs does not): where it does
    not, the copier falls back to copy_file_range, and the expected counts move accordingly."""
    fd = _open_direct_output(os.path.join(directory, ".probe"))
    os.unlink(os.path.join(directory, ".probe"))
    if fd is not None:
        os.close(fd)
    return fd is not None


@pytest.fixture
def sources(tmp_path):
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    a.write_bytes(os.urandom(50_000))
    b.write_bytes(os.urandom(30_001))
    return str(a), str(b)


def _spans(a, b):
    return [
        Span(a, 7, 5000),  # unaligned start and end
        Span(a, 5007, 9000),  # adjacent to the previous one: read together, across chunk boundaries
        Span(b, 0, 0),  # empty
        Span(b, 4096, 8192),  # aligned
        Span(a, 100, 3),  # backwards in the same file
        Span(b, 20_000, 10_001),  # up to the last byte of b (not a whole block)
        Span(a, 30_000, 20_000),  # larger than a chunk, to the end of a
    ]


def _expected(spans, head=b"head", tail=b"tail"):
    data = {}
    for s in spans:
        if s.path not in data:
            with open(s.path, "rb") as f:
                data[s.path] = f.read()
    return head + b"".join(data[s.path][s.offset : s.offset + s.nbytes] for s in spans) + tail


MODES = ["direct-announced", "direct-not-announced", "direct-announced-out-of-order", "page-cache", "buffer"]


@pytest.mark.parametrize("mode", MODES)
def test_every_copy_path_writes_exactly_the_asked_bytes(tmp_path, sources, monkeypatch, mode):
    spans = _spans(*sources)
    if mode == "buffer":
        monkeypatch.setattr(os, "copy_file_range", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.EXDEV, "x")))
        monkeypatch.setattr(span_copy, "_BUFFER_BYTES", 1000)  # several buffer rounds
    copier = SpanCopier("page-cache" if mode in ("page-cache", "buffer") else "direct", **SMALL)
    if mode == "direct-announced":
        copier.read_ahead(spans)
    elif mode == "direct-announced-out-of-order":  # what the writer copies differs from what it announced
        copier.read_ahead(spans[1:] + spans[:1])
    out = copier.create(str(tmp_path / "out.bin"))
    assert out.write(b"head") == 4
    for span in spans:
        out.copy([span])
        assert out.tell() == 4 + sum(s.nbytes for s in spans[: spans.index(span) + 1])
    out.write(b"tail")
    out.close()
    copier.close()
    assert (tmp_path / "out.bin").read_bytes() == _expected(spans)  # exact size: no block padding left
    total = sum(s.nbytes for s in spans)
    direct = mode.startswith("direct") and _direct_io_works(tmp_path)
    want = {
        "direct": total if direct else 0,
        "kernel": total if mode == "page-cache" or (mode != "buffer" and not direct) else 0,
        "buffer": total if mode == "buffer" else 0,
    }
    assert (copier.direct_bytes, copier.kernel_bytes, copier.buffered_bytes) == (
        want["direct"],
        want["kernel"],
        want["buffer"],
    )
    if direct:  # read ahead exactly when announced in the order copied
        assert copier.unannounced_bytes == (total if mode != "direct-announced" else 0)


def test_direct_read_ahead_reads_announced_ranges_in_order_in_few_requests(tmp_path, sources, monkeypatch):
    if not _direct_io_works(tmp_path):
        pytest.skip("this file system refuses O_DIRECT")
    a, b = sources
    reads = []
    real = span_copy._SourceFiles.read_aligned

    def recorded(self, buffer, path, start, end):
        reads.append((os.path.basename(path), start, end))
        return real(self, buffer, path, start, end)

    monkeypatch.setattr(span_copy._SourceFiles, "read_aligned", recorded)
    copier = SpanCopier("direct", chunk_bytes=4 * ALIGN, read_buffers=8)
    spans = [Span(a, 10, 1000), Span(a, 1010, 2000), Span(b, 5, 100), Span(a, 3010, 20_000)]
    copier.read_ahead(spans)
    out = copier.create(str(tmp_path / "out.bin"))
    out.copy(spans)
    out.close()
    copier.close()
    assert (tmp_path / "out.bin").read_bytes() == _expected(spans, b"", b"")
    # adjacent ranges of a file share a request; a request holds at most chunk_bytes
    assert reads == [
        ("a.bin", 10, 3010),
        ("b.bin", 5, 105),
        ("a.bin", 3010, 3010 + 4 * ALIGN),
        ("a.bin", 3010 + 4 * ALIGN, 23_010),
    ]


def test_sources_whose_o_direct_reads_are_refused_are_read_plainly(tmp_path, sources, monkeypatch):
    """Some file systems accept O_DIRECT at open and refuse the read (EINVAL): same bytes."""
    real = os.preadv

    def preadv(fd, buffers, offset):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", preadv)
    spans = _spans(*sources)
    copier = SpanCopier("direct", **SMALL)
    copier.read_ahead(spans[:3])  # read-ahead thread and direct reads both
    out = copier.create(str(tmp_path / "out.bin"))
    out.write(b"head")
    out.copy(spans)
    out.write(b"tail")
    out.close()
    copier.close()
    assert (tmp_path / "out.bin").read_bytes() == _expected(spans)


@pytest.mark.parametrize("mode", ["direct-announced", "direct-not-announced", "page-cache", "buffer"])
def test_a_source_that_ends_early_is_an_error_naming_it(tmp_path, monkeypatch, mode):
    src = tmp_path / "short.bin"
    src.write_bytes(b"0123456789")
    if mode == "buffer":
        monkeypatch.setattr(os, "copy_file_range", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.ENOSYS, "no")))
    copier = SpanCopier("direct" if mode.startswith("direct") else "page-cache")
    span = Span(str(src), 5, 15)
    if mode == "direct-announced":
        copier.read_ahead([span])
    out = copier.create(str(tmp_path / "out.bin"))
    with pytest.raises(ValueError, match="short.bin: ends before byte 20"):
        out.copy([span])
    out.abort()
    copier.close()


def test_a_failed_block_write_is_raised_with_the_file_name(tmp_path, sources, monkeypatch):
    if not _direct_io_works(tmp_path):
        pytest.skip("this file system refuses O_DIRECT")
    real = os.pwrite
    calls = {"n": 0}

    def pwrite(fd, data, offset):
        calls["n"] += 1
        if calls["n"] == 3:  # the probe block, the first data block, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    copier = SpanCopier("direct", **SMALL)
    out = copier.create(str(tmp_path / "out.bin"))
    with pytest.raises(OSError, match=r"out.bin: writing failed: .*No space left"):
        for _ in range(10):
            out.copy([Span(sources[0], 0, 40_000)])
        out.close()
    out.abort()
    copier.close()


def test_unknown_io_mode_is_refused():
    with pytest.raises(ValueError, match="io mode must be one of direct, page-cache"):
        SpanCopier("mmap")
