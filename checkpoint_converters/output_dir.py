"""Output directories that appear only when complete, and the non-weight files of an HF dir.

Every converter writes into `OUT.tmp-<nonce>` next to OUT and renames it to OUT at the end. An
exception or Ctrl-C removes the staging dir; a hard kill leaves a `.tmp-` dir that neither HF loaders
(pointed at OUT) nor `latest_iteration` pick up, and that the next conversion to OUT deletes once
its writer (recorded in the nonce) is dead. `--overwrite` replaces OUT with
`megadiff.checkpoint.format.replace_dir`: at every moment OUT is the old or the new output.
"""

import contextlib
import json
import os
import shutil
from collections.abc import Callable, Iterator, Sequence

from megadiff.checkpoint.format import (
    BACKUP_MARK,
    STAGING_MARK,
    fsync_dir,
    owner_is_dead,
    remove_tree,
    replace_dir,
    restore_interrupted_replace,
    staging_path,
)
from megadiff.errors import CheckpointError
from megadiff.hf.remote_code import AUTO_MAP, REMOTE_CODE_FILES, remote_code_source

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".distcp")


def clean_stale_leftovers(output: str, log: Callable[[str], None] = print) -> list[str]:
    """Delete the `OUT.tmp-*` / `OUT.old-*` dirs next to OUT whose writer is dead (after putting an
    interrupted --overwrite's old copy back at OUT). Returns what was removed; others are named."""
    restored = restore_interrupted_replace(output)
    if restored:
        log(f"note: restored {output} from {restored} (a replace of it was interrupted)")
    parent, base = os.path.split(output)
    removed = []
    for name in sorted(os.listdir(parent)) if os.path.isdir(parent) else []:
        if not (name.startswith(base + STAGING_MARK) or name.startswith(base + BACKUP_MARK)):
            continue
        path = os.path.join(parent, name)
        if owner_is_dead(path):
            remove_tree(path)
            removed.append(path)
        else:
            log(
                f"note: {path} is left from another conversion to {output} (still running, or from another "
                f"host or an older megadiff); delete it yourself once nothing writes it"
            )
    if removed:
        log(f"removed {len(removed)} leftover(s) of interrupted conversions: {', '.join(removed)}")
    return removed


def check_output_dir(
    output: str, overwrite: bool, inputs: Sequence[str] = (), log: Callable[[str], None] = print
) -> str:
    """Refuse an existing OUT without --overwrite, and an OUT that is (or contains) an input.
    Leftovers of interrupted conversions to OUT are cleaned first (`clean_stale_leftovers`)."""
    output = os.path.abspath(output)
    for src in inputs:
        src = os.path.realpath(src)
        real = os.path.realpath(output)
        if real == src or real.startswith(src + os.sep) or src.startswith(real + os.sep):
            raise CheckpointError(f"{output}: output overlaps the input {src}; choose another output directory")
    if os.environ.get("RANK", "0") == "0":  # one cleaner per conversion (ranks of one torchrun share OUT)
        clean_stale_leftovers(output, log)
    if os.path.exists(output) and not overwrite:
        raise CheckpointError(f"{output}: already exists; pass --overwrite to replace it")
    if os.path.exists(output) and not os.path.isdir(output):
        raise CheckpointError(f"{output}: exists and is not a directory")
    parent = os.path.dirname(output)
    if not os.path.isdir(parent):
        raise CheckpointError(f"{parent}: parent directory of the output does not exist")
    if not os.access(parent, os.W_OK):
        raise CheckpointError(f"{parent}: not writable")
    return output


def publish(staging: str, output: str) -> None:
    """Put a finished staging dir at `output`, atomically replacing an existing one (--overwrite)."""
    fsync_dir(staging)
    replace_dir(staging, output)


@contextlib.contextmanager
def staged_output(output: str, nonce: str | None = None) -> Iterator[str]:
    """Yield a fresh staging dir next to `output`; publish it on success, delete it on failure."""
    staging = staging_path(output, nonce)
    os.makedirs(staging)
    try:
        yield staging
    except BaseException:
        remove_tree(staging)
        raise
    publish(staging, output)


def is_weight_file(name: str) -> bool:
    return name.endswith(WEIGHT_SUFFIXES) or name.endswith(".index.json")


def copy_non_weight_files(src: str, dst: str, skip: Sequence[str] = ()) -> list[str]:
    """Copy the top-level regular files of `src` that are not weights or weight indexes (config,
    tokenizer, remote code, generation config, README, ...). Returns the names copied."""
    copied = []
    for name in sorted(os.listdir(src)):
        path = os.path.join(src, name)
        if name in skip or name.startswith(".") or is_weight_file(name) or not os.path.isfile(path):
            continue
        shutil.copyfile(path, os.path.join(dst, name))
        copied.append(name)
    return copied


def ensure_remote_code(out_dir: str, config: dict) -> list[str]:
    """Make the model classes of `config['auto_map']` loadable from `out_dir`: when a module they
    name is missing (or there is no auto_map), use megadiff's own LLaDA2 remote code for them (other
    entries, e.g. a tokenizer's, are kept). Returns the files copied."""
    auto_map = config.get("auto_map") if isinstance(config.get("auto_map"), dict) else {}
    model_entries = [v for k, v in auto_map.items() if k == "AutoConfig" or k.startswith("AutoModel")]
    modules = {str(v).split("--")[-1].rsplit(".", 1)[0] for v in model_entries if isinstance(v, str)}
    if model_entries and all(os.path.isfile(os.path.join(out_dir, m + ".py")) for m in modules):
        return []
    for name in REMOTE_CODE_FILES:
        shutil.copyfile(remote_code_source(name), os.path.join(out_dir, name))
    config["auto_map"] = {k: v for k, v in auto_map.items() if not (k == "AutoConfig" or k.startswith("AutoModel"))}
    config["auto_map"].update(AUTO_MAP)
    return list(REMOTE_CODE_FILES)


def write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
