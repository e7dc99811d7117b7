"""Which data files a checkpoint was trained on, recorded so that a resume can tell whether the data
behind its saved position is still the same (megadiff.training.resume_config).

Each file is recorded as its realpath, its size and the SHA-256 of its first and last MiB. Why not
size and mtime: the mtime changes whenever the same bytes are copied (to a node's scratch disk, out
of an archive, by `cp` without -p), which would refuse a resume on identical data; and it stays the
same when a tool restores it (`rsync -a`, `touch -r`) after an edit. Content decides here. The hash
reads at most 2 MiB per file, so it is cheap at any data size; what it misses is an edit of the
middle of a file larger than 2 MiB that keeps its size (regenerated, appended, truncated or
re-shuffled files change the size or the ends).
"""

import hashlib
import os

from megadiff.data.rows import list_data_files

EDGE_BYTES = 1 << 20  # hashed from each end of a file


def fingerprint(path: str) -> dict:
    """{path (realpath), size, edges_sha256} of one data file."""
    real = os.path.realpath(path)
    size = os.path.getsize(real)
    digest = hashlib.sha256()
    with open(real, "rb") as f:
        digest.update(f.read(EDGE_BYTES))
        if size > EDGE_BYTES:
            f.seek(max(size - EDGE_BYTES, EDGE_BYTES))
            digest.update(f.read(EDGE_BYTES))
    return {"path": real, "size": size, "edges_sha256": digest.hexdigest()}


def data_fingerprints(train_files) -> list[dict] | None:
    """The fingerprints of the files `data.train_files` names (a file, a list, a directory), in
    reading order; None without train_files (data.blend / data.mock)."""
    if not train_files:
        return None
    return [fingerprint(str(p)) for p in list_data_files(train_files)]


def data_change(saved: list[dict], now: list[dict]) -> str | None:
    """How the data files `now` differ from the `saved` ones (None when the same)."""
    saved_paths, now_paths = [f.get("path") for f in saved], [f["path"] for f in now]
    if saved_paths != now_paths:
        gone, new = sorted(set(saved_paths) - set(now_paths)), sorted(set(now_paths) - set(saved_paths))
        what = "; ".join(
            part
            for part in (f"{', '.join(map(str, gone))} gone" if gone else "", f"{', '.join(new)} new" if new else "")
            if part
        )
        return f"the data files changed ({what or 'their order'})"
    for old, cur in zip(saved, now, strict=True):
        if old.get("size") != cur["size"]:
            return f"{cur['path']} changed since the checkpoint (size {old.get('size')} -> {cur['size']} bytes)"
        if old.get("edges_sha256") != cur["edges_sha256"]:
            return f"{cur['path']} changed since the checkpoint (same size, other content)"
    return None
