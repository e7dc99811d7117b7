"""Files read from a directory someone else made stay inside it.

A received checkpoint or model dir is a tree of names its sender chose. A link such as
`__0_0.distcp -> /home/me/.ssh/id_rsa`, or a safetensors index entry `../elsewhere/model.safetensors`,
would make a reader read (and an export copy, a `.metadata` reader unpickle) a file outside what the
user named. So every name read from such a dir is resolved with `realpath` (every link followed) and
must land inside the dir's own realpath: `file_inside` for a name the dir itself lists (index
entries, DCP storage names), `check_links_inside` for every link the dir holds, before anything in
it is read.

The one layout whose links leave a model dir on purpose is the Hugging Face hub cache
(`models--org--name/snapshots/<revision>/config.json -> ../../blobs/<hash>`): links of a snapshot dir
may land in the `blobs` dir of the same repo.
"""

import os

from megadiff.errors import CheckpointError

HUB_SNAPSHOTS, HUB_BLOBS = "snapshots", "blobs"


def _roots(directory: str) -> list[str]:
    """The real dirs that files of `directory` may resolve into."""
    real = os.path.realpath(directory)
    roots = [real]
    parent = os.path.dirname(real)
    if os.path.basename(parent) == HUB_SNAPSHOTS:  # <repo>/snapshots/<revision>: hub cache layout
        roots.append(os.path.join(os.path.dirname(parent), HUB_BLOBS))
    return roots


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def is_inside(path: str, directory: str) -> bool:
    """True when `path`, all links followed, is `directory` or lies below it."""
    real = os.path.realpath(path)
    return any(_within(real, root) for root in _roots(directory))


def _escape_error(directory: str, path: str, what: str) -> CheckpointError:
    return CheckpointError(
        f"{path}: {what} resolves to {os.path.realpath(path)}, outside {directory}; refusing to read it "
        f"(a directory you received must not point at files elsewhere on this machine)"
    )


def file_inside(directory: str, name: str, what: str = "file") -> str:
    """`directory/name`, checked: `name` is a relative path without `..` whose realpath stays inside
    `directory` (see the module docstring). Raises CheckpointError naming `what` (e.g. "shard
    listed in model.safetensors.index.json")."""
    if (
        not isinstance(name, str)
        or not name
        or os.path.isabs(name)
        or "\x00" in name
        or any(part in ("", ".", "..") for part in name.replace(os.sep, "/").split("/"))
    ):
        raise CheckpointError(
            f"{directory}: {what} {name!r} is not a plain file name inside the directory; refusing to read it"
        )
    path = os.path.join(directory, name)
    if not is_inside(path, directory):
        raise _escape_error(directory, path, what)
    return path


def check_links_inside(directory: str, what: str = "directory") -> None:
    """Raise CheckpointError at the first link in `directory` (its whole tree; links to dirs are
    not descended) whose target, all links followed, lies outside it. `directory` itself may be a
    link (a checkpoint kept on another disk): what counts is where it leads."""
    roots = _roots(directory)
    pending = [directory]
    while pending:
        try:
            entries = list(os.scandir(pending.pop()))
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            continue
        for entry in entries:
            if entry.is_symlink():
                real = os.path.realpath(entry.path)
                if not any(_within(real, root) for root in roots):
                    raise _escape_error(directory, entry.path, f"a link in the {what}")
            elif entry.is_dir(follow_symlinks=False):
                pending.append(entry.path)
