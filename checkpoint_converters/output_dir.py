"""Output directories that appear only when complete, and the non-weight files of an HF dir.

Every converter writes into `OUT.tmp-<nonce>` next to OUT and renames it to OUT at the end. An
exception or Ctrl-C removes the staging dir; a hard kill leaves a `.tmp-` dir that neither HF loaders
(pointed at OUT) nor `latest_iteration` pick up.
"""

import contextlib
import json
import os
import shutil
from typing import Dict, Iterator, List, Optional, Sequence

from megadiff.checkpoint.format import fsync_dir, remove_tree, staging_path

from .hf_io import CheckpointError
from .hf_layout import AUTO_MAP, REMOTE_CODE_FILES, remote_code_dir

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".distcp")


def check_output_dir(output: str, overwrite: bool, inputs: Sequence[str] = ()) -> str:
    """Refuse an existing OUT without --overwrite, and an OUT that is (or contains) an input."""
    output = os.path.abspath(output)
    for src in inputs:
        src = os.path.realpath(src)
        real = os.path.realpath(output)
        if real == src or real.startswith(src + os.sep) or src.startswith(real + os.sep):
            raise CheckpointError(f"{output}: output overlaps the input {src}; choose another output directory")
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
    """Rename a finished staging dir to `output`, replacing an existing one (--overwrite)."""
    fsync_dir(staging)
    old = None
    if os.path.exists(output):
        old = staging_path(output)
        os.rename(output, old)
    os.rename(staging, output)
    fsync_dir(os.path.dirname(output))
    if old:
        remove_tree(old)


@contextlib.contextmanager
def staged_output(output: str, nonce: Optional[str] = None) -> Iterator[str]:
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


def copy_non_weight_files(src: str, dst: str, skip: Sequence[str] = ()) -> List[str]:
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


def ensure_remote_code(out_dir: str, config: Dict) -> List[str]:
    """Make the model classes of `config['auto_map']` loadable from `out_dir`: when a module they
    name is missing (or there is no auto_map), use megadiff's own LLaDA2 remote code for them (other
    entries, e.g. a tokenizer's, are kept). Returns the files copied."""
    auto_map = config.get("auto_map") if isinstance(config.get("auto_map"), dict) else {}
    model_entries = [v for k, v in auto_map.items() if k == "AutoConfig" or k.startswith("AutoModel")]
    modules = {str(v).split("--")[-1].rsplit(".", 1)[0] for v in model_entries if isinstance(v, str)}
    if model_entries and all(os.path.isfile(os.path.join(out_dir, m + ".py")) for m in modules):
        return []
    for name in REMOTE_CODE_FILES:
        shutil.copyfile(os.path.join(remote_code_dir(), name), os.path.join(out_dir, name))
    config["auto_map"] = {k: v for k, v in auto_map.items() if not (k == "AutoConfig" or k.startswith("AutoModel"))}
    config["auto_map"].update(AUTO_MAP)
    return list(REMOTE_CODE_FILES)


def write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
