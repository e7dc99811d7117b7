"""Write output files front to back from small in-memory pieces and large byte ranges of inputs.

A converter's output file is headers and small tensors (from memory) and big byte ranges of the
input files (`byte_spans.Span`: expert matrices, QKV rows, embeddings). `SpanCopier.create(path)`
opens such a file as a stream with `write(bytes)`, `copy(spans)` and `tell()`;
`SpanCopier.read_ahead(spans)` announces the ranges that will be copied next, in order.

Two ways to move the bytes (`io_mode`; the tools' `--io direct|page-cache`, whose `auto` picks
"direct" and whose `plain` does not use this engine at all: checkpoint_converters/io_paths.py):

- "direct": the page cache is bypassed both ways (O_DIRECT). A reader thread reads
  the announced ranges into a few reused aligned buffers, the copy puts them into 32 MiB blocks,
  a writer thread writes each full block. A conversion reads and writes tens to hundreds of GB
  once; through the page cache that evicts everything else, and has the kernel find fresh memory
  for every page, which on a VM that hands free pages back to its hypervisor makes copies slow
  and erratic; direct I/O touches no new memory (numbers: benchmarks/RESULTS.md, convert). Where a file system refuses O_DIRECT (tmpfs, some network
  file systems) the copier switches to "page-cache" from that output file on: same bytes.
- "page-cache": os.copy_file_range from page cache to page cache (like shutil.copyfile), with
  posix_fadvise(WILLNEED) read-ahead; one reused buffer where the kernel cannot copy (EXDEV...).

Either way the bytes never become tensors: memory stays at a few buffers whatever the model size.
"""

import errno
import fcntl
import io
import mmap
import os
import queue
import threading
from collections import deque
from collections.abc import Iterator, Sequence

from .byte_spans import Span

IO_MODES = ("direct", "page-cache")
ALIGN = 4096  # O_DIRECT offsets, lengths and buffer addresses: a multiple of the logical block size
_KERNEL_FALLBACK_ERRNOS = {errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EBADF, errno.EPERM}
_DIRECT_REFUSED_ERRNOS = {errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP}
_BUFFER_BYTES = 16 * 2**20  # page-cache mode's buffer where copy_file_range is refused


def _ends_early(span: Span) -> ValueError:
    return ValueError(f"{span.path}: ends before byte {span.offset + span.nbytes}")


class SpanCopier:
    """Opens output files (`create`) and copies spans into them; counts how bytes were moved:
    `direct_bytes` (O_DIRECT), `kernel_bytes` (copy_file_range), `buffered_bytes` (a buffer)."""

    def __init__(
        self,
        io_mode: str = "direct",
        chunk_bytes: int = 8 * 2**20,
        read_buffers: int = 8,
        block_bytes: int = 32 * 2**20,
    ):
        if io_mode not in IO_MODES:
            raise ValueError(f"io mode must be one of {', '.join(IO_MODES)}, not {io_mode!r}")
        self.io_mode = io_mode if hasattr(os, "O_DIRECT") else "page-cache"
        self.block_bytes = _round_up(block_bytes)
        self.direct_bytes = self.kernel_bytes = self.buffered_bytes = 0
        self._sources = _SourceFiles(direct=False)  # page-cache mode's
        self._kernel = hasattr(os, "copy_file_range")  # until the kernel says it cannot
        self._buffer = None
        self._prefetch = _Prefetcher(chunk_bytes, read_buffers) if self.io_mode == "direct" else None

    @property
    def copied_bytes(self) -> int:
        return self.direct_bytes + self.kernel_bytes + self.buffered_bytes

    @property
    def unannounced_bytes(self) -> int:
        """Direct-I/O bytes copied without read-ahead: announced out of order, or not at all."""
        return self._prefetch.unannounced_bytes if self._prefetch is not None else 0

    def create(self, path: str) -> "OutputFile":
        """A new (truncated) output file, written front to back."""
        if self.io_mode == "direct":
            fd = _open_direct_output(path)
            if fd is not None:
                return _DirectOutput(fd, path, self)
            self.io_mode = "page-cache"  # this file system refuses O_DIRECT: the page cache from here on
            self._prefetch.stop()
        return _PageCacheOutput(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), path, self)

    def read_ahead(self, spans: Sequence[Span]) -> None:
        """These ranges are copied next (after those announced before), in this order: start reading."""
        if self.io_mode == "direct":
            self._prefetch.announce(spans)
        elif hasattr(os, "posix_fadvise"):
            for span in spans:
                if span.nbytes:
                    os.posix_fadvise(self._sources.fd(span.path), span.offset, span.nbytes, os.POSIX_FADV_WILLNEED)

    def close(self) -> None:
        if self._prefetch is not None:
            self._prefetch.close()
        self._sources.close()

    # page-cache mode

    def _copy_in_kernel(self, span: Span, out_fd: int) -> None:
        """Append `span` at `out_fd`'s position: copy_file_range, else through one buffer."""
        src, offset, left = self._sources.fd(span.path), span.offset, span.nbytes
        while left and self._kernel:
            try:
                n = os.copy_file_range(src, out_fd, min(left, 1 << 30), offset)
            except OSError as e:
                if e.errno not in _KERNEL_FALLBACK_ERRNOS:
                    raise
                self._kernel = False
                break
            if n == 0:
                raise _ends_early(span)
            offset, left = offset + n, left - n
            self.kernel_bytes += n
        while left:
            if self._buffer is None:
                self._buffer = memoryview(bytearray(_BUFFER_BYTES))
            n = os.preadv(src, [self._buffer[: min(left, _BUFFER_BYTES)]], offset)
            if n == 0:
                raise _ends_early(span)
            _write_all(out_fd, self._buffer[:n])
            offset, left = offset + n, left - n
            self.buffered_bytes += n

    # direct mode
    def _pieces(self, span: Span) -> Iterator[memoryview]:
        """`span`'s bytes in order, as views of read buffers valid until the next piece."""
        for piece in self._prefetch.take(span):
            self.direct_bytes += len(piece)
            yield piece


class OutputFile(io.RawIOBase):
    """An output file being written front to back, never seeked (what `SpanCopier.create` returns)."""

    def __init__(self, fd: int, path: str, copier: SpanCopier):
        self._fd, self.path, self._copier = fd, path, copier

    def writable(self):
        return True

    def copy(self, spans: Sequence[Span]) -> int:
        """Append the bytes of `spans`; returns how many."""
        raise NotImplementedError

    def close(self) -> None:
        """Finish the file: every byte on disk (fsync) before this returns."""
        if not self.closed:
            try:
                self._finish()
            finally:
                self.abort()
                super().close()

    def _finish(self) -> None:
        raise NotImplementedError

    def abort(self) -> None:
        """Stop without finishing (the caller removes the file); also what garbage collection does."""
        raise NotImplementedError

    def __del__(self):
        self.abort()


class _PageCacheOutput(OutputFile):
    def write(self, b) -> int:
        data = memoryview(b).cast("B")
        _write_all(self._fd, data)
        return len(data)

    def tell(self) -> int:
        return os.lseek(self._fd, 0, os.SEEK_CUR)

    def copy(self, spans: Sequence[Span]) -> int:
        for span in spans:
            self._copier._copy_in_kernel(span, self._fd)
        return sum(s.nbytes for s in spans)

    def _finish(self) -> None:
        os.fsync(self._fd)

    def abort(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class _DirectOutput(OutputFile):
    """Bytes gather in aligned blocks; a writer thread writes each full block with O_DIRECT while
    the next one fills. The last, partial block is written padded and the file cut to its size."""

    def __init__(self, fd: int, path: str, copier: SpanCopier):
        super().__init__(fd, path, copier)
        self._size = copier.block_bytes
        self._free: queue.Queue[mmap.mmap] = queue.Queue()
        for _ in range(2):
            self._free.put(mmap.mmap(-1, self._size))
        self._block = self._free.get()
        self._fill = 0  # bytes in the current block
        self._flushed = 0  # bytes handed to the writer thread (the current block's file offset)
        self._writes: queue.Queue = queue.Queue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._write_blocks, name="megadiff-direct-writer", daemon=True)
        self._thread.start()

    def _write_blocks(self) -> None:
        while True:
            job = self._writes.get()
            if job is None:
                return
            block, length, offset = job
            try:
                if self._error is None:
                    view = memoryview(block)[:length]
                    done = 0
                    while done < length:  # O_DIRECT writes are whole or fail; loop anyway
                        done += os.pwrite(self._fd, view[done:], offset + done)
                    view.release()
            except BaseException as e:  # reported to the main thread at its next block or close
                self._error = e
            self._free.put(block)

    def _raise_writer_error(self) -> None:
        if self._error is not None:
            code = getattr(self._error, "errno", None)  # kept, with the file, for the caller (a full disk)
            raise OSError(code, f"{self.path}: writing failed: {self._error}", self.path) from self._error

    def _hand_off(self, length: int) -> None:
        self._raise_writer_error()
        self._writes.put((self._block, length, self._flushed))
        self._flushed += self._fill
        self._block, self._fill = self._free.get(), 0

    def write(self, b) -> int:
        data = memoryview(b).cast("B")
        done = 0
        while done < len(data):
            n = min(len(data) - done, self._size - self._fill)
            self._block[self._fill : self._fill + n] = data[done : done + n]
            self._fill += n
            done += n
            if self._fill == self._size:
                self._hand_off(self._size)
        return done

    def tell(self) -> int:
        return self._flushed + self._fill

    def copy(self, spans: Sequence[Span]) -> int:
        total = 0
        for span in spans:
            for piece in self._copier._pieces(span):
                total += self.write(piece)
        return total

    def _finish(self) -> None:
        size = self.tell()
        padded = _round_up(self._fill)
        self._block[self._fill : padded] = bytes(padded - self._fill)
        self._hand_off(padded)
        self._stop_writer()
        self._raise_writer_error()
        os.ftruncate(self._fd, size)  # drop the padding of the last block
        os.fsync(self._fd)

    def _stop_writer(self) -> None:
        if getattr(self, "_thread", None) is not None and self._thread.is_alive():
            self._writes.put(None)
            self._thread.join()

    def abort(self) -> None:
        self._stop_writer()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class _Prefetcher:
    """Reads announced ranges ahead with O_DIRECT, in announcement order, on one thread.

    Announced ranges are cut into requests of at most `chunk_bytes` (adjacent ranges of one file
    share a request); at most `buffers` requests are read and not yet consumed. `take(span)` must
    ask for the announced bytes in the same order; anything else (a span never announced, or out
    of order) stops the read-ahead and is read directly, so the bytes are right either way."""

    def __init__(self, chunk_bytes: int, buffers: int):
        self._chunk = _round_up(chunk_bytes)
        self._free: queue.Queue[mmap.mmap] = queue.Queue()
        for _ in range(buffers):
            self._free.put(mmap.mmap(-1, self._chunk + 2 * ALIGN))
        self._requests: queue.Queue = queue.Queue()
        self._done: queue.Queue = queue.Queue()
        self._open: list | None = None  # request being extended: [path, start, end], not sent yet
        self._sent: deque = deque()  # requests sent, not yet consumed: [path, start, end]
        self._current = None  # (request, buffer, error) being consumed
        self._position = None  # (path, file offset) the next take must start at
        self._thread: threading.Thread | None = None
        self._stopped = False
        self._files = _SourceFiles()  # the reader thread's
        self._own_files = _SourceFiles()  # the main thread's (reads that were not announced)
        self._buffer: mmap.mmap | None = None
        self.unannounced_bytes = 0  # bytes taken without read-ahead (not announced, or out of order)

    def announce(self, spans: Sequence[Span]) -> None:
        if self._stopped:
            return
        for span in spans:
            offset, end = span.offset, span.offset + span.nbytes
            while offset < end:
                r = self._open
                if r is None or r[0] != span.path or r[2] != offset or r[2] - r[1] >= self._chunk:
                    self._send()
                    r = self._open = [span.path, offset, offset]
                r[2] = min(end, r[1] + self._chunk)
                offset = r[2]
        if self._thread is None:
            self._thread = threading.Thread(target=self._read_requests, name="megadiff-direct-reader", daemon=True)
            self._thread.start()

    def _send(self) -> None:
        if self._open is not None:
            self._sent.append(self._open)
            self._requests.put(self._open)
            self._open = None

    def _read_requests(self) -> None:
        while True:
            request = self._requests.get()
            if request is None or self._stopped:
                return
            buffer = self._free.get()
            if self._stopped:
                return
            try:
                self._files.read_aligned(buffer, *request)
                self._done.put((request, buffer, None))
            except BaseException as e:  # raised where the bytes are taken
                self._done.put((request, buffer, e))

    def take(self, span: Span) -> Iterator[memoryview]:
        offset, end = span.offset, span.offset + span.nbytes
        while offset < end:
            if self._current is None and not self._next_request(span.path, offset):
                yield from self._read_directly(Span(span.path, offset, end - offset))
                return
            request, buffer, error = self._current
            if self._position != (span.path, offset):
                self.stop()  # not what was announced next: no more read-ahead
                yield from self._read_directly(Span(span.path, offset, end - offset))
                return
            if error is not None:
                if isinstance(error, EOFError):
                    raise _ends_early(span) from None
                raise error
            n = min(end, request[2]) - offset
            skip = offset - request[1] + request[1] % ALIGN
            view = memoryview(buffer)[skip : skip + n]
            yield view
            view.release()
            offset += n
            self._position = (span.path, offset)
            if offset == request[2]:
                self._free.put(buffer)
                self._current = None

    def _next_request(self, path: str, offset: int) -> bool:
        """Make the next announced request current; False when nothing announced is left."""
        if self._stopped:
            return False
        if not self._sent:
            self._send()
            if not self._sent:
                return False
        request = self._sent[0]
        if request[0] != path or request[1] != offset:
            self.stop()
            return False
        self._sent.popleft()
        self._current = self._done.get()
        self._position = (path, offset)
        return True

    def _read_directly(self, span: Span) -> Iterator[memoryview]:
        if self._buffer is None:
            self._buffer = mmap.mmap(-1, self._chunk + 2 * ALIGN)
        self.unannounced_bytes += span.nbytes
        offset, end = span.offset, span.offset + span.nbytes
        while offset < end:
            stop = min(end, offset + self._chunk)
            try:
                self._own_files.read_aligned(self._buffer, span.path, offset, stop)
            except EOFError:
                raise _ends_early(span) from None
            skip = offset % ALIGN
            view = memoryview(self._buffer)[skip : skip + stop - offset]
            yield view
            view.release()
            offset = stop

    def stop(self) -> None:
        """No more read-ahead: the reader thread ends and its buffers are dropped."""
        if self._stopped:
            return
        self._stopped = True
        self._open, self._current = None, None
        self._sent.clear()
        if self._thread is not None:
            self._requests.put(None)
            self._free.put(mmap.mmap(-1, ALIGN))  # wakes a reader waiting for a buffer
            while self._thread.is_alive():
                try:
                    self._done.get(timeout=0.1)
                except queue.Empty:
                    pass

    def close(self) -> None:
        self.stop()
        self._files.close()
        self._own_files.close()


class _SourceFiles:
    """Input files kept open by path: for O_DIRECT reads (`direct`), plain where the file system
    refuses O_DIRECT, or plain."""

    def __init__(self, direct: bool = True):
        self._direct = direct
        self._fds: dict[str, int] = {}

    def fd(self, path: str) -> int:
        if path not in self._fds:
            try:
                self._fds[path] = os.open(path, os.O_RDONLY | (os.O_DIRECT if self._direct else 0))
            except OSError as e:
                if not self._direct or e.errno not in _DIRECT_REFUSED_ERRNOS:
                    raise
                self._fds[path] = os.open(path, os.O_RDONLY)
        return self._fds[path]

    def refuse_direct(self, path: str) -> bool:
        """Reopen `path` without O_DIRECT after a read refused it; False if it already was."""
        if not fcntl.fcntl(self._fds[path], fcntl.F_GETFL) & os.O_DIRECT:
            return False
        os.close(self._fds.pop(path))
        self._fds[path] = os.open(path, os.O_RDONLY)
        return True

    def read_aligned(self, buffer: mmap.mmap, path: str, start: int, end: int) -> None:
        """File bytes start..end into `buffer` from its offset start % ALIGN, by reading the
        aligned range around them. EOFError if the file ends before `end`."""
        first = start - start % ALIGN
        view = memoryview(buffer)[: _round_up(end - first)]
        try:
            done = 0
            while first + done < end:
                try:
                    n = os.preadv(self.fd(path), [view[done:]], first + done)
                except OSError as e:
                    if e.errno in _DIRECT_REFUSED_ERRNOS and self.refuse_direct(path):
                        continue
                    raise
                if n == 0:
                    raise EOFError(path)
                done += n
        finally:
            view.release()

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def _open_direct_output(path: str) -> int | None:
    """An O_DIRECT fd for a new `path`, or None where the file system refuses O_DIRECT (tried with
    one block write, as some refuse at the first write rather than at open)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
    except OSError as e:
        if e.errno in _DIRECT_REFUSED_ERRNOS:
            return None
        raise
    probe = mmap.mmap(-1, ALIGN)
    try:
        os.pwrite(fd, probe, 0)
        os.ftruncate(fd, 0)
    except OSError as e:
        os.close(fd)
        if e.errno in _DIRECT_REFUSED_ERRNOS:
            return None
        raise
    finally:
        probe.close()
    return fd


def _round_up(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _write_all(fd: int, data: memoryview) -> None:
    """A write may take less than asked (e.g. above 2 GiB on Linux)."""
    done = 0
    while done < len(data):
        done += os.write(fd, data[done:])
