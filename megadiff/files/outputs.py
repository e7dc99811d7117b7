"""What a tool writes never replaces what it reads, and never lands through a planted name.

`refuse_overlaps` compares every output path of a tool with every input path (after `realpath`,
so a link or a `..` spelling is no way around it) before anything is loaded: `generate.py --output
MODEL/config.json`, an eval `--output-dir` that is the model dir, or a converter writing into its
input are refused with the two flags named.

`open_output` opens a file a tool writes into a directory the user named (the trainer's lock
file, a generate / eval output) without following a link there and without writing into a file that
has a second name: `O_NOFOLLOW` refuses a link, and a file with more than one hard link (another
name for someone's file) is refused before it is truncated.
"""

import os
import stat
from collections.abc import Iterable

from megadiff.errors import UserError


class OutputPathError(UserError):
    """An output path that would overwrite an input, or write through a link."""


Named = tuple[str, str | None]  # (how the user named it, e.g. "--output" or "model.hf_dir"; the path)


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def overlap(output: str, source: str) -> str | None:
    """How writing `output` touches the input `source` (both after realpath): "is", "is inside"
    or "contains"; None when they are apart."""
    out, src = os.path.realpath(output), os.path.realpath(source)
    if out == src:
        return "is"
    if _within(out, src):
        return "is inside"
    if _within(src, out):
        return "contains"
    return None


def refuse_overlaps(outputs: Iterable[Named], inputs: Iterable[Named], contains_ok: bool = False) -> None:
    """Raise OutputPathError when an output is an input or lies inside an input dir, or (unless
    `contains_ok`: outputs that are files, or dirs a tool only adds files to) contains an input.
    Entries whose path is None are skipped."""
    inputs = [(label, path) for label, path in inputs if path]
    for out_label, output in outputs:
        if not output:
            continue
        for in_label, source in inputs:
            how = overlap(output, source)
            if how is None or (how == "contains" and contains_ok):
                continue
            raise OutputPathError(
                f"{out_label} {output} {how} the input {in_label} {source}; a tool never writes over or into "
                f"its own inputs, so choose another {out_label}"
            )


def open_output(path: str, append: bool = False, label: str = "output"):
    """The text file `path` opened for writing (truncated, or appended to), refusing a link or a
    file with a second hard link at that name (see the module docstring). OutputPathError names
    `label`."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if append else 0)
    fd = open_no_follow(path, flags, label)
    if not append:
        os.ftruncate(fd, 0)
    return os.fdopen(fd, "a" if append else "w", encoding="utf-8")


def open_no_follow(path: str, flags: int, label: str = "output", mode: int = 0o644) -> int:
    """os.open(path, flags | O_NOFOLLOW) of a regular file with a single name; never truncates
    (pass no O_TRUNC: truncate after this check). Raises OutputPathError naming `label`."""
    if flags & os.O_TRUNC:
        raise ValueError("open_no_follow: truncate after the checks, not with O_TRUNC")
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | getattr(os, "O_NONBLOCK", 0), mode)
    except OSError as e:
        if os.path.islink(path):
            raise OutputPathError(
                f"{label} {path} is a symbolic link (to {os.path.realpath(path)}); megadiff does not write "
                f"through links it did not make: remove it or name the target itself"
            ) from None
        raise OutputPathError(f"{label} {path}: cannot be opened for writing ({e.strerror})") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_nlink > 1:
        os.close(fd)
        what = "is not a regular file" if not stat.S_ISREG(info.st_mode) else "has other hard links (other names)"
        raise OutputPathError(
            f"{label} {path} {what}; writing there could change another file: remove it or choose another path"
        )
    os.set_blocking(fd, True)
    return fd


def check_output_file(path: str, label: str = "output") -> None:
    """Before any expensive work: `path` can be written as a file (its directory exists, it is not
    a directory, a link or a file with other hard links). Raises OutputPathError naming `label`."""
    if os.path.isdir(path) and not os.path.islink(path):
        raise OutputPathError(f"{label} {path} is a directory; name a file")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise OutputPathError(f"{label} {path}: directory {parent} does not exist; create it first")
    if os.path.islink(path):
        raise OutputPathError(
            f"{label} {path} is a symbolic link (to {os.path.realpath(path)}); megadiff does not write through links "
            f"it did not make: remove it or name the target itself"
        )
    if os.path.exists(path):
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode) or info.st_nlink > 1:
            raise OutputPathError(f"{label} {path} is not a regular file with a single name; choose another path")


def check_output_directory(path: str, label: str = "output directory") -> None:
    """Before any expensive work: `path` is a directory or can be created as one."""
    here = os.path.abspath(path)
    while not os.path.exists(here):
        here = os.path.dirname(here)
    if not os.path.isdir(here):
        what = "is a file" if here == os.path.abspath(path) else f"cannot be created: {here} is a file"
        raise OutputPathError(f"{label} {path} {what}; name a directory")
