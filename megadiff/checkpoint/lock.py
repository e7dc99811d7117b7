"""One run per checkpoint directory: an exclusive lock on `SAVE_DIR/.megadiff.lock`.

The lock is an `flock` on that file, held for the life of the run. The kernel drops it when the
holder dies however it dies (SIGKILL included), so a lock left by a dead run never blocks: the file
stays behind and is simply locked again. The file holds the holder's pid, host and start time,
which the refusal quotes. (On NFS, flock is a lease the server drops when the client is gone.)
A lock file that is a link, or has a second name, is refused rather than written through: a
save_dir received from someone else could point it at any file of the user's.
"""

import datetime
import fcntl
import json
import os
import socket

from megadiff.errors import CheckpointError
from megadiff.files.outputs import OutputPathError, open_no_follow

LOCK_NAME = ".megadiff.lock"


class SaveDirInUseError(CheckpointError):
    """Another live process holds the save_dir."""


class SaveDirLock:
    """`with SaveDirLock(save_dir):` or `lock = SaveDirLock(save_dir).acquire(); ...; lock.release()`."""

    def __init__(self, save_dir: str):
        self.save_dir = os.path.abspath(save_dir)
        self.path = os.path.join(self.save_dir, LOCK_NAME)
        self._fd: int | None = None

    def acquire(self) -> "SaveDirLock":
        """Take the lock or raise SaveDirInUseError naming the holder. The dir must exist."""
        try:  # never through a link or a second name planted in the save_dir (megadiff.files.outputs)
            fd = open_no_follow(self.path, os.O_RDWR | os.O_CREAT, "the lock file")
        except OutputPathError as e:
            raise CheckpointError(f"{self.save_dir}: {e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(_read_holder(fd))
            os.close(fd)
            raise SaveDirInUseError(
                f"{self.save_dir}: in use by another run ({holder}); wait for it to finish, stop it, "
                f"or set another checkpoint.save_dir"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": datetime.datetime.now().isoformat(timespec="seconds"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the file drops the flock
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __del__(self):
        self.release()

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def _read_holder(fd: int) -> dict:
    try:
        data = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _describe(holder: dict) -> str:
    if not holder:
        return "holder unknown"
    return f"pid {holder.get('pid')} on {holder.get('host')}, since {holder.get('since')}"
