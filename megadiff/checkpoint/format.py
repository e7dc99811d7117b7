"""The on-disk layout of a megadiff checkpoint root, without megatron-core.

    ROOT/latest_checkpointed_iteration.txt     newest saved iteration (Megatron-LM's tracker file)
    ROOT/iter_0000010/                          megatron-core dist_checkpointing dir (torch_dist)
    ROOT/iter_0000010/megadiff.json             our metadata, written LAST: its presence = complete

An iteration is written to `ROOT/iter_0000010.tmp-<nonce>` and renamed into place once complete, so a
crash leaves either nothing or a `.tmp-` dir that no function here will ever pick. Everything in this
module is plain file handling: tools that only read checkpoints do not need megatron-core.
"""

import datetime
import json
import os
import re
import shutil
import uuid
from dataclasses import asdict, is_dataclass
from typing import Dict, List, Optional

import torch

from checkpoint_converters.hf_io import CheckpointError

FORMAT_NAME = "megadiff-mcore-checkpoint"
FORMAT_VERSION = 1
META_NAME = "megadiff.json"
TRACKER_NAME = "latest_checkpointed_iteration.txt"
MCORE_CONFIG_NAME = "metadata.json"  # written last by megatron-core's dist_checkpointing.save
DCP_METADATA_NAME = ".metadata"
_ITER_DIR = re.compile(r"^iter_(\d{7,})$")

DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
DTYPES = {name: dtype for dtype, name in DTYPE_NAMES.items()}
_META_FIELDS = ("hf_config", "hf_source_dir", "layout", "dtype", "spec", "extra")
SPECS = ("local", "te")  # megatron-core layer spec whose names the tensors are stored under


def iteration_dir_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def new_nonce() -> str:
    return uuid.uuid4().hex[:12]


def staging_path(final_path: str, nonce: Optional[str] = None) -> str:
    """Where a directory is built before being renamed to `final_path` (same parent, `.tmp-` suffix)."""
    final_path = os.path.abspath(final_path)
    return f"{final_path}.tmp-{nonce or new_nonce()}"


def dtype_name(dtype) -> str:
    if isinstance(dtype, str):
        if dtype in DTYPES:
            return dtype
        aliases = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32", "float": "fp32"}
        if dtype.replace("torch.", "") in aliases:
            return aliases[dtype.replace("torch.", "")]
    elif dtype in DTYPE_NAMES:
        return DTYPE_NAMES[dtype]
    raise ValueError(f"unsupported checkpoint dtype {dtype!r}; use one of {sorted(DTYPES)}")


def layout_dict(layout) -> Dict:
    """A ParallelLayout (or a dict with its fields) as a plain JSON dict."""
    if is_dataclass(layout):
        layout = asdict(layout)
    if not isinstance(layout, dict):
        raise ValueError(f"layout must be a ParallelLayout or a dict, got {type(layout).__name__}")
    unknown = sorted(set(layout) - {"tp", "ep", "etp", "pp", "vpp"})
    if unknown:
        raise ValueError(f"layout: unknown field(s) {unknown}; expected tp, ep, etp, pp, vpp")
    return {k: layout.get(k) for k in ("tp", "ep", "etp", "pp", "vpp")}


def build_meta(iteration: int, meta: Dict, world_size: int) -> Dict:
    """The megadiff.json content from the caller's `meta` (hf_config, layout, dtype required;
    hf_source_dir, spec ("local" default, or "te"), extra optional). Raises ValueError naming a
    missing or unknown field."""
    unknown = sorted(set(meta) - set(_META_FIELDS))
    if unknown:
        raise ValueError(f"checkpoint meta: unknown field(s) {unknown}; put free-form values under 'extra'")
    for field in ("hf_config", "layout", "dtype"):
        if meta.get(field) is None:
            raise ValueError(f"checkpoint meta: '{field}' is required")
    if not isinstance(meta["hf_config"], dict):
        raise ValueError("checkpoint meta: 'hf_config' must be the HF config.json dict")
    extra = meta.get("extra") or {}
    if not isinstance(extra, dict):
        raise ValueError("checkpoint meta: 'extra' must be a dict")
    spec = meta.get("spec") or "local"
    if spec not in SPECS:
        raise ValueError(f"checkpoint meta: 'spec' is {spec!r}; expected one of {', '.join(SPECS)}")
    source = meta.get("hf_source_dir")
    out = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "iteration": int(iteration),
        "hf_config": meta["hf_config"],
        "hf_source_dir": os.path.abspath(source) if source else None,
        "layout": layout_dict(meta["layout"]),
        "dtype": dtype_name(meta["dtype"]),
        "spec": spec,
        "world_size": int(world_size),
        "saved_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "extra": extra,
    }
    json.dumps(out)  # fail here, before any heavy work, if something is not JSON-serialisable
    return out


def write_json_atomic(path: str, obj) -> None:
    """Write JSON to `path.tmp-*`, fsync, rename: readers see the old file or the new one, never half."""
    tmp = f"{path}.tmp-{new_nonce()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_text_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{new_nonce()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _read_meta_file(path: str) -> Dict:
    try:
        with open(path) as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not found") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{path}: not a megadiff checkpoint metadata file (format != {FORMAT_NAME!r})")
    if int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format_version {meta['format_version']} is newer than this megadiff "
            f"understands ({FORMAT_VERSION}); update megadiff"
        )
    return meta


def is_complete_iteration_dir(path: str) -> bool:
    """True for a finished iteration dir: not a staging dir, megadiff.json (written last) parses."""
    name = os.path.basename(os.path.normpath(path))
    if ".tmp-" in name or not os.path.isdir(path):
        return False
    if not os.path.isfile(os.path.join(path, MCORE_CONFIG_NAME)):
        return False
    try:
        _read_meta_file(os.path.join(path, META_NAME))
    except CheckpointError:
        return False
    return True


def complete_iterations(root: str) -> List[int]:
    """Sorted iterations of ROOT whose `iter_XXXXXXX` dir is complete."""
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        m = _ITER_DIR.match(name)
        if m and is_complete_iteration_dir(os.path.join(root, name)):
            found.append(int(m.group(1)))
    return sorted(found)


def latest_iteration(root: str) -> Optional[int]:
    """The newest COMPLETE iteration under ROOT, or None. `.tmp-` dirs and dirs without
    megadiff.json (an interrupted save) are never picked, whatever the tracker file says."""
    its = complete_iterations(root)
    return its[-1] if its else None


def resolve_checkpoint_dir(root_or_iter_dir: str, iteration: Optional[int] = None) -> str:
    """The complete iteration dir meant by a checkpoint ROOT (latest, or `iteration`) or by an
    iteration dir itself. Raises CheckpointError saying what is there instead."""
    path = os.path.abspath(root_or_iter_dir)
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: checkpoint directory not found")
    if ".tmp-" in os.path.basename(path):
        raise CheckpointError(f"{path}: a staging directory of an unfinished save, not a checkpoint")
    if os.path.isfile(os.path.join(path, META_NAME)) or _ITER_DIR.match(os.path.basename(path)):
        if not is_complete_iteration_dir(path):
            raise CheckpointError(
                f"{path}: incomplete checkpoint ({META_NAME} or {MCORE_CONFIG_NAME} missing or invalid); "
                f"the save was interrupted or this is not a megadiff checkpoint"
            )
        meta = _read_meta_file(os.path.join(path, META_NAME))
        if iteration is not None and int(meta["iteration"]) != iteration:
            raise CheckpointError(
                f"{path}: holds iteration {meta['iteration']}, not the requested --iteration {iteration}"
            )
        return path
    available = complete_iterations(path)
    if iteration is not None:
        candidate = os.path.join(path, iteration_dir_name(iteration))
        if iteration not in available:
            raise CheckpointError(
                f"{candidate}: no complete checkpoint for iteration {iteration}; "
                f"complete iterations here: {available or 'none'}"
            )
        return candidate
    if not available:
        raise CheckpointError(
            f"{path}: no complete checkpoint (looked for iter_XXXXXXX/{META_NAME}); "
            f"a save interrupted before it finished leaves none"
        )
    return os.path.join(path, iteration_dir_name(available[-1]))


def read_meta(path: str) -> Dict:
    """megadiff.json of a checkpoint: `path` is a ROOT (latest complete iteration), an iteration
    dir, or the megadiff.json file itself."""
    if os.path.isfile(path):
        return _read_meta_file(path)
    return _read_meta_file(os.path.join(resolve_checkpoint_dir(path), META_NAME))


def remove_tree(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


def commit_iteration_dir(root: str, iteration: int, staging_dir: str, meta_json: Dict) -> str:
    """Finish a saved iteration (single caller, e.g. rank 0): write megadiff.json last inside the
    staging dir, rename it to `iter_XXXXXXX` (replacing an older save of the same iteration) and
    update the tracker file. Returns the final dir."""
    write_json_atomic(os.path.join(staging_dir, META_NAME), meta_json)
    fsync_dir(staging_dir)
    final = os.path.join(root, iteration_dir_name(iteration))
    replaced = None
    if os.path.exists(final):
        replaced = staging_path(final)  # a `.tmp-` name: never picked while it is being removed
        os.rename(final, replaced)
    os.rename(staging_dir, final)
    fsync_dir(root)
    write_text_atomic(os.path.join(root, TRACKER_NAME), f"{iteration}\n")
    if replaced:
        remove_tree(replaced)
    return final
