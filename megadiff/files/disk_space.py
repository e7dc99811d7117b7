"""A write that fails on a full disk says so: the file, the disk, its free space.

torch's zip writer reports a full disk as `unexpected pos 704 vs 598`, safetensors and plain
writes as `OSError: [Errno 28] No space left on device`, each as a traceback. Whatever megadiff
writes (a trainer's checkpoint, a converter's or an exporter's output) turns such a failure into
`NoSpaceError` naming the file being written, the filesystem and its free space.
"""

import errno
import os
import re
import shutil

from megadiff.errors import CheckpointError


class NoSpaceError(CheckpointError):
    """The output does not fit on its filesystem."""


def filesystem_of(path: str) -> tuple[str, str]:
    """(device, mount point) holding `path` (device from /proc/mounts; the mount point elsewhere)."""
    mount = os.path.realpath(path)
    while not os.path.exists(mount):
        mount = os.path.dirname(mount)
    while not os.path.ismount(mount):
        mount = os.path.dirname(mount)
    device = mount
    try:
        with open("/proc/mounts") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 1 and fields[1].replace("\\040", " ") == mount:
                    device = fields[0]  # the last mount on a point is the visible one
    except OSError:
        pass
    return device, mount


def human_bytes(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def _errors(error: BaseException | None):
    """`error`, the errors it was raised from, and those a torch DCP CheckpointException collected
    from its ranks (`failures`: {rank: exception or (exception, traceback)})."""
    pending, seen = [error], set()
    while pending:
        error = pending.pop()
        if error is None or id(error) in seen:
            continue
        seen.add(id(error))
        yield error
        pending += [error.__cause__ or error.__context__]
        failures = getattr(error, "failures", None)
        if isinstance(failures, dict):
            pending += [f[0] if isinstance(f, tuple) else f for f in failures.values() if f is not None]


def is_disk_full(error: BaseException | None) -> bool:
    """True when `error` (or an error it was raised from) is the disk filling up."""
    for e in _errors(error):
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "unexpected pos" in str(e) or "No space left" in str(e):
            return True
    return False


def failed_file(error: BaseException | None) -> str | None:
    """The file an OSError in `error`'s chain names, if any."""
    for e in _errors(error):
        if isinstance(e, OSError) and e.filename:
            return os.fsdecode(e.filename)
    return None


def free_bytes(path: str) -> int:
    while not os.path.exists(path):
        path = os.path.dirname(path) or "."
    return shutil.disk_usage(path).free


def disk_full_error(output: str, error: BaseException, needed: int | None = None) -> NoSpaceError | None:
    """The NoSpaceError to raise when writing `output` failed with `error` because its disk is full
    (None when `error` is something else). Names the file being written when the error says which,
    the filesystem, its free space and, given `needed`, the bytes the output needs. Raise it after
    deleting the partial output (the message says nothing of it was kept)."""
    if not is_disk_full(error):
        return None
    device, mount = filesystem_of(output)
    # the file as it would have been named in the output (not inside its staging dir, now deleted)
    where = re.sub(r"\.tmp-[^/]+", "", failed_file(error) or output)
    need = f"needed ~{human_bytes(needed)}, " if needed else ""
    return NoSpaceError(
        f"no space left on {device} (mounted at {mount}) while writing {where}: {need}"
        f"{human_bytes(free_bytes(output))} free; free some space or write {os.path.basename(output)} to a "
        f"larger disk (the partial output was deleted)"
    )
