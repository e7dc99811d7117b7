"""A read-only window on part of an open file (one DCP record), for torch.load and zipfile."""

import io


class FileSlice(io.RawIOBase):
    """A seekable read-only window [offset, offset + length) of an open file (one DCP item)."""

    def __init__(self, f, offset: int, length: int):
        self._f, self._base, self._length, self._pos = f, offset, length, 0

    def readable(self):
        return True

    def seekable(self):
        return True

    def tell(self):
        return self._pos

    def seek(self, offset, whence=0):
        self._pos = {0: offset, 1: self._pos + offset, 2: self._length + offset}[whence]
        return self._pos

    def readinto(self, buffer):
        n = max(0, min(len(buffer), self._length - self._pos))
        self._f.seek(self._base + self._pos)
        got = self._f.readinto(memoryview(buffer)[:n])
        self._pos += got
        return got
