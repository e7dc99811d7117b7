"""The on-disk layout of a megadiff checkpoint root, without megatron-core.

    ROOT/latest_checkpointed_iteration.txt     newest saved iteration (Megatron-LM's tracker file)
    ROOT/iter_0000010/                          megatron-core dist_checkpointing dir (torch_dist)
    ROOT/iter_0000010/megadiff.json             our metadata, written LAST: its presence = complete

An iteration is written to `ROOT/iter_0000010.tmp-<nonce>` and renamed into place once complete, so a
crash leaves either nothing or a `.tmp-` dir that no function here will ever pick. The nonce records
the writer (`<random>-<pid>@<host>`), so a leftover whose writer is dead is provably stale.

Replacing a complete directory (a re-save of an iteration, a converter's --overwrite) never leaves a
moment without one (`replace_dir`): on Linux the finished staging dir and the old dir swap names in
one atomic `renameat2(RENAME_EXCHANGE)`, and the old copy, now under the `.tmp-` name, is deleted.
Where the filesystem cannot exchange (NFS, non-Linux), the old dir is first renamed to
`NAME.old-<nonce>` and the new one renamed in; a crash between the two leaves NAME missing and the
complete `.old-` copy, which every reader here picks in NAME's place (`complete_iteration_dirs`,
`resolve_checkpoint_dir`) and the next writer renames back (`restore_interrupted_replace`).
`crash_point` marks each rename and write step so tests can kill the process there.

Everything in this module is plain file handling: tools that only read checkpoints do not need
megatron-core.
"""

import ctypes
import datetime
import errno
import json
import os
import re
import shutil
import socket
import uuid
import warnings
from dataclasses import asdict, is_dataclass

import torch

from megadiff.errors import CheckpointError
from megadiff.files.inside import check_links_inside

FORMAT_NAME = "megadiff-mcore-checkpoint"
FORMAT_VERSION = 1
META_NAME = "megadiff.json"
TRACKER_NAME = "latest_checkpointed_iteration.txt"
MCORE_CONFIG_NAME = "metadata.json"  # written last by megatron-core's dist_checkpointing.save
DCP_METADATA_NAME = ".metadata"
# The one definition of an iteration dir's name: `iter_` + the iteration, zero-padded to 7 digits as
# Megatron-LM writes it (iteration 10_000_000 on has 8 digits or more). ITER_NAME matches the name
# itself; ITER_NAME_PREFIX also its marked copies (`iter_0000010.tmp-<nonce>`, `.old-`, `.damaged-`).
ITER_NAME_PREFIX = re.compile(r"^iter_(\d{7,})")
ITER_NAME = re.compile(ITER_NAME_PREFIX.pattern + "$")
STAGING_MARK = ".tmp-"  # NAME.tmp-<nonce>: being written (or, after an exchange, the old copy being deleted)
BACKUP_MARK = ".old-"  # NAME.old-<nonce>: the old copy during a two-rename replace (no RENAME_EXCHANGE)
DAMAGED_MARK = ".damaged-"  # NAME.damaged-<nonce>: a damaged dir moved aside instead of being overwritten
_NONCE_OWNER = re.compile(r"-(\d+)@([A-Za-z0-9._-]+)$")
CRASH_ENV = "MEGADIFF_CRASH_AT"
CRASH_EXIT_CODE = 117

DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
DTYPES = {name: dtype for dtype, name in DTYPE_NAMES.items()}
_META_FIELDS = ("hf_config", "hf_source_dir", "layout", "dtype", "spec", "extra", "lora")
SPECS = ("local", "te")  # megatron-core layer spec whose names the tensors are stored under


def iteration_dir_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname())[:64] or "host"


def new_nonce() -> str:
    """`<random>-<pid>@<host>`: unique, and names the process that owns what carries it."""
    return f"{uuid.uuid4().hex[:8]}-{os.getpid()}@{_host()}"


def owner_is_dead(name: str) -> bool:
    """True when `name` (a `.tmp-`/`.old-` path) was made by a process of this host that no longer
    runs. False when the owner runs, is on another host, or is not recorded (older megadiff)."""
    m = _NONCE_OWNER.search(os.path.basename(os.path.normpath(name)))
    if not m or m.group(2) != _host():
        return False
    pid = int(m.group(1))
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # runs, as another user
        return False
    return False


def crash_point(step: str) -> None:
    """Fault injection between the steps of a checkpoint replace: with MEGADIFF_CRASH_AT=<step> the
    process dies here at once (no cleanup handlers run), as a SIGKILL or power cut would."""
    if os.environ.get(CRASH_ENV) == step:
        os._exit(CRASH_EXIT_CODE)


def staging_path(final_path: str, nonce: str | None = None) -> str:
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


def layout_dict(layout) -> dict:
    """A ParallelLayout (or a dict with its fields) as a plain JSON dict."""
    if is_dataclass(layout):
        layout = asdict(layout)
    if not isinstance(layout, dict):
        raise ValueError(f"layout must be a ParallelLayout or a dict, got {type(layout).__name__}")
    unknown = sorted(set(layout) - {"tp", "ep", "etp", "pp", "vpp"})
    if unknown:
        raise ValueError(f"layout: unknown field(s) {unknown}; expected tp, ep, etp, pp, vpp")
    return {k: layout.get(k) for k in ("tp", "ep", "etp", "pp", "vpp")}


def build_meta(iteration: int, meta: dict, world_size: int) -> dict:
    """The megadiff.json content from the caller's `meta` (hf_config, layout, dtype required;
    hf_source_dir, spec ("local" default, or "te"), extra optional; lora only for an adapter-only
    LoRA save: megadiff.lora.adapter_checkpoint.adapter_meta). Raises ValueError naming a missing
    or unknown field."""
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
        "saved_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "extra": extra,
    }
    if meta.get("lora") is not None:  # absent from full checkpoints, which stay as they were
        if not isinstance(meta["lora"], dict) or not {"config", "base"} <= set(meta["lora"]):
            raise ValueError("checkpoint meta: 'lora' must be a dict with 'config' and 'base'")
        out["lora"] = meta["lora"]
    json.dumps(out)  # fail here, before any heavy work, if something is not JSON-serialisable
    return out


def write_text_atomic(path: str, text: str, step: str = "file") -> None:
    """Write to `path.tmp-*`, fsync, rename: readers see the old file or the new one, never half.
    The temporary file is new (O_EXCL) and the rename replaces a link at `path` rather than writing
    through it. `step` names the crash points (`<step>-written`, `<step>-renamed`)."""
    tmp = f"{path}{STAGING_MARK}{new_nonce()}"
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644), "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    crash_point(f"{step}-written")
    os.replace(tmp, path)
    crash_point(f"{step}-renamed")


def write_json_atomic(path: str, obj, step: str = "file") -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n", step)


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


def _read_meta_file(path: str) -> dict:
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


def iteration_dir_problem(path: str) -> str | None:
    """Why the iteration dir `path` is not a complete checkpoint (None when it is complete)."""
    if not os.path.isdir(path):
        return "not a directory"
    meta = os.path.join(path, META_NAME)
    if not os.path.isfile(meta):
        return f"{META_NAME} missing (the save did not finish)"
    try:
        _read_meta_file(meta)
    except CheckpointError as e:
        return str(e)
    if not os.path.isfile(os.path.join(path, MCORE_CONFIG_NAME)):
        return f"{MCORE_CONFIG_NAME} missing (megatron-core's part of the checkpoint)"
    return None


def is_complete_iteration_dir(path: str) -> bool:
    """True for a finished iteration dir: not a staging dir, megadiff.json (written last) parses."""
    name = os.path.basename(os.path.normpath(path))
    return STAGING_MARK not in name and iteration_dir_problem(path) is None


def interrupted_replace_copy(final: str) -> str | None:
    """The complete `FINAL.old-<nonce>` copy left by a replace interrupted between its two renames,
    when FINAL itself is missing (else None)."""
    parent, base = os.path.split(os.path.abspath(final))
    if os.path.lexists(final) or not os.path.isdir(parent):
        return None
    copies = sorted(n for n in os.listdir(parent) if n.startswith(base + BACKUP_MARK))
    return os.path.join(parent, copies[-1]) if copies else None


def restore_interrupted_replace(final: str) -> str | None:
    """Rename the old copy of an interrupted replace back to `final` (when FINAL is missing and the
    process that replaced it is dead). Returns the restored copy's former name, or None."""
    copy = interrupted_replace_copy(final)
    if copy is None or not owner_is_dead(copy):
        return None
    try:
        os.rename(copy, final)
    except FileNotFoundError:  # restored meanwhile by another process
        return None
    fsync_dir(os.path.dirname(os.path.abspath(final)))
    return copy


def complete_iteration_dirs(root: str) -> dict[int, str]:
    """{iteration: dir} of the complete iterations of ROOT. An `iter_XXXXXXX` dir that is missing
    because its replace was interrupted is represented by its complete `.old-` copy."""
    if not os.path.isdir(root):
        return {}
    found = {}
    for name in os.listdir(root):
        m = ITER_NAME.match(name)
        if m and is_complete_iteration_dir(os.path.join(root, name)):
            found[int(m.group(1))] = os.path.join(root, name)
        elif BACKUP_MARK in name:
            base = name.split(BACKUP_MARK)[0]
            m = ITER_NAME.match(base)
            path = os.path.join(root, name)
            if m and not os.path.lexists(os.path.join(root, base)) and iteration_dir_problem(path) is None:
                found.setdefault(int(m.group(1)), path)
    return found


def complete_iterations(root: str) -> list[int]:
    """Sorted iterations of ROOT whose `iter_XXXXXXX` dir is complete."""
    return sorted(complete_iteration_dirs(root))


def latest_iteration(root: str) -> int | None:
    """The newest COMPLETE iteration under ROOT, or None. `.tmp-` dirs and dirs without
    megadiff.json (an interrupted save) are never picked, whatever the tracker file says.
    (The trainer's stricter choice, which stops on damage, is training.checkpointing.resume_iteration.)"""
    its = complete_iterations(root)
    return its[-1] if its else None


def iteration_dirs(root: str) -> dict[int, str]:
    """{iteration: path} of every `iter_XXXXXXX` dir of ROOT, complete or not."""
    if not os.path.isdir(root):
        return {}
    return {int(m.group(1)): os.path.join(root, n) for n in os.listdir(root) if (m := ITER_NAME.match(n))}


def read_tracker(root: str) -> int | None:
    """The iteration named by ROOT/latest_checkpointed_iteration.txt (None without one). Raises
    CheckpointError when it holds something else than an iteration number."""
    path = os.path.join(root, TRACKER_NAME)
    try:
        with open(path) as f:
            text = f.read().strip()
    except FileNotFoundError:
        return None
    if not text.isdigit():
        raise CheckpointError(
            f"{path}: expected an iteration number, found {text[:40]!r}; "
            f"write the iteration to resume from into it (e.g. `echo 10 > {path}`)"
        )
    return int(text)


def resolve_checkpoint_dir(root_or_iter_dir: str, iteration: int | None = None) -> str:
    """The complete iteration dir meant by a checkpoint ROOT (latest, or `iteration`) or by an
    iteration dir itself, once no link in it leads outside it. Raises CheckpointError saying what
    is there instead."""
    path = os.path.abspath(root_or_iter_dir)
    if not os.path.exists(path) and interrupted_replace_copy(path):
        path = interrupted_replace_copy(path)  # a replace of PATH was interrupted: its old copy
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: checkpoint directory not found")
    if STAGING_MARK in os.path.basename(path):
        raise CheckpointError(f"{path}: a staging directory of an unfinished save, not a checkpoint")
    # Before any file in it is read: no link in the tree leads outside it (a received checkpoint
    # cannot make a reader read, copy or unpickle a file elsewhere: megadiff.files.inside).
    check_links_inside(path, "checkpoint directory")
    name = os.path.basename(path).split(BACKUP_MARK)[0]
    if os.path.isfile(os.path.join(path, META_NAME)) or ITER_NAME.match(name):
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
    dirs = complete_iteration_dirs(path)
    available = sorted(dirs)
    if iteration is not None:
        candidate = os.path.join(path, iteration_dir_name(iteration))
        if iteration not in available:
            raise CheckpointError(
                f"{candidate}: no complete checkpoint for iteration {iteration}; "
                f"complete iterations here: {available or 'none'}"
            )
        return dirs[iteration]
    if not available:
        if os.path.isfile(os.path.join(path, "config.json")) and not iteration_dirs(path):
            raise CheckpointError(
                f"{path}: a Hugging Face model directory (config.json), not a megadiff megatron checkpoint; pass "
                f"it as --hf-dir (tools/convert_hf_to_mcore.py converts it to a megatron checkpoint; in training: "
                f"model.hf_dir)"
            )
        raise CheckpointError(
            f"{path}: no complete checkpoint (looked for iter_XXXXXXX/{META_NAME}); "
            f"a save interrupted before it finished leaves none"
        )
    newer = {it: p for it, p in iteration_dirs(path).items() if it > available[-1]}
    for _, p in sorted(newer.items()):  # say so: never skip a newer iteration without a word
        warnings.warn(
            f"{p}: skipped, not a complete checkpoint ({iteration_dir_problem(p)}); using iteration {available[-1]}",
            stacklevel=2,
        )
    return dirs[available[-1]]


# Written beside an HF export of a megadiff checkpoint: how megadiff trained the weights (the
# diffusion section and objective of the run; no paths), e.g. whether the edit stream was on.
TRAINING_RECORD = "megadiff_training.json"


def training_record(meta: dict) -> dict | None:
    """The TRAINING_RECORD of a checkpoint's megadiff.json, or None for one megadiff did not train
    (a converted HF model)."""
    cfg = (meta.get("extra") or {}).get("training_config")
    if not isinstance(cfg, dict) or not isinstance(cfg.get("diffusion"), dict):
        return None
    objective = (cfg.get("train") or {}).get("objective", "sft")
    return {"iteration": meta.get("iteration"), "objective": objective, "diffusion": cfg["diffusion"]}


def read_meta(path: str) -> dict:
    """megadiff.json of a checkpoint: `path` is a ROOT (latest complete iteration), an iteration
    dir, or the megadiff.json file itself."""
    if os.path.isfile(path):
        return _read_meta_file(path)
    return _read_meta_file(os.path.join(resolve_checkpoint_dir(path), META_NAME))


def adapter_only_error(ckpt_dir: str, meta: dict, what: str) -> CheckpointError | None:
    """The error for reading the adapter-only LoRA checkpoint `ckpt_dir` as `what` (a full
    checkpoint's weights); None for a full checkpoint."""
    lora = meta.get("lora")
    if not lora:
        return None
    base = (lora.get("base") or {}).get("path") if isinstance(lora, dict) else None
    return CheckpointError(
        f"{ckpt_dir}: an adapter-only LoRA checkpoint (megadiff.json 'lora'): it holds LoRA adapters, not the "
        f"model's weights, so it cannot be {what}; its base is {base}. Load the base instead, resume the LoRA "
        f"run with its lora section, or export merged weights (tools/convert_mcore_to_hf.py --mcore-dir "
        f"{ckpt_dir} --output OUT)"
    )


def remove_tree(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _exchange(a: str, b: str) -> bool:
    """Swap the names of `a` and `b` in one atomic step (Linux renameat2 RENAME_EXCHANGE).
    False where the platform or filesystem cannot."""
    if not USE_RENAME_EXCHANGE:
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), a, None, b)


USE_RENAME_EXCHANGE = True  # tests switch it off to exercise the two-rename fallback


def rename_no_replace(new: str, final: str) -> None:
    """Rename `new` to `final` unless `final` exists: one atomic step on Linux (renameat2
    RENAME_NOREPLACE), so of two writers racing for one name exactly one wins; elsewhere a check
    and a rename (a dir is never renamed onto a non-empty one). FileExistsError when taken."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        renameat2 = None
    if renameat2 is not None:
        at_fdcwd, rename_noreplace = -100, 1
        if renameat2(at_fdcwd, os.fsencode(new), at_fdcwd, os.fsencode(final), rename_noreplace) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise OSError(err, os.strerror(err), final)
    if os.path.lexists(final):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), final)
    try:
        os.rename(new, final)
    except OSError as e:
        if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), final) from None
        raise


def replace_dir(new: str, final: str) -> None:
    """Put the finished dir `new` at `final`, replacing what is there, with no moment without one
    (see the module docstring). `new` must be in the same directory as `final`."""
    parent = os.path.dirname(os.path.abspath(final))
    crash_point("replace-start")
    if not os.path.lexists(final):
        os.rename(new, final)
        crash_point("replace-renamed")
        fsync_dir(parent)
        return
    if _exchange(new, final):  # `new` now names the old copy
        crash_point("replace-exchanged")
        fsync_dir(parent)
        remove_tree(new)
        return
    backup = f"{os.path.abspath(final)}{BACKUP_MARK}{new_nonce()}"
    os.rename(final, backup)
    crash_point("replace-old-moved")
    os.rename(new, final)
    crash_point("replace-renamed")
    fsync_dir(parent)
    remove_tree(backup)


def move_aside_damaged(path: str) -> str:
    """Rename a damaged dir to `PATH.damaged-<nonce>` (kept, never picked) and return the new name."""
    kept = f"{os.path.abspath(path)}{DAMAGED_MARK}{new_nonce()}"
    os.rename(path, kept)
    return kept


def commit_iteration_dir(root: str, iteration: int, staging_dir: str, meta_json: dict) -> str:
    """Finish a saved iteration (single caller, e.g. rank 0): write megadiff.json last inside the
    staging dir, put it at `iter_XXXXXXX` (`replace_dir`: an older complete save of the same
    iteration is replaced atomically; a damaged one is moved aside with a warning, not deleted) and
    update the tracker file. Returns the final dir."""
    write_json_atomic(os.path.join(staging_dir, META_NAME), meta_json, step="meta")
    fsync_dir(staging_dir)
    final = os.path.join(root, iteration_dir_name(iteration))
    if os.path.lexists(final) and not is_complete_iteration_dir(final):
        problem = iteration_dir_problem(final)
        warnings.warn(f"{final}: damaged ({problem}); kept as {move_aside_damaged(final)}", stacklevel=2)
    replace_dir(staging_dir, final)
    write_text_atomic(os.path.join(root, TRACKER_NAME), f"{iteration}\n", step="tracker")
    return final
