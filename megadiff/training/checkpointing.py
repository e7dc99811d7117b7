"""Trainer-side checkpoint helpers on top of megadiff.checkpoint (the on-disk format).

A run owns its save_dir (`claim_save_dir`: a lock, see megadiff.checkpoint.lock). With the lock held,
nothing else writes there, so leftovers of earlier runs are judged safely: a complete copy of an
iteration an interrupted save left missing is put back, the other staging leftovers deleted, and the run either
resumes from the newest complete iteration or stops with an error naming what is damaged and what to
do (`resume_iteration`). It never starts from scratch while the save_dir or its tracker names a
checkpoint, and never overwrites a damaged iteration.
"""

import os
import re
import shutil
from collections.abc import Callable

import torch

from megadiff.checkpoint import format as fmt
from megadiff.checkpoint.dist import missing_sharded_keys
from megadiff.checkpoint.lock import SaveDirLock
from megadiff.errors import CheckpointError
from megadiff.lora.adapter_checkpoint import check_resume, load_adapter_state
from megadiff.lora.base_record import base_of_run

# Version-dependent optimizer workarounds live in compat; the trainer imports them from here.
from megadiff.platform.compat import (  # noqa: F401
    align_saved_schedule_values,
    init_optimizer_states_with_dummy_values,
    restore_adam_steps,
)


def claim_save_dir(save_dir: str, resume: bool, log: Callable[[str], None]) -> tuple[SaveDirLock, int | None]:
    """Rank 0, before the model is built: create and lock SAVE_DIR, repair and clean it, and return
    (lock, iteration to resume from or None for a fresh start). Raises CheckpointError when another
    run holds it, or when it cannot be resumed as it is."""
    os.makedirs(save_dir, exist_ok=True)
    lock = SaveDirLock(save_dir).acquire()
    try:
        restore_interrupted_replaces(save_dir, log)
        remove_stale_staging(save_dir, log)
        iteration = resume_iteration(save_dir, log)
        if iteration is not None and fmt.read_tracker(save_dir) != iteration:  # killed before it was updated
            fmt.write_text_atomic(os.path.join(save_dir, fmt.TRACKER_NAME), f"{iteration}\n")
            log(f"{fmt.TRACKER_NAME} now names iteration {iteration}, the newest complete one")
        if iteration is not None and not resume:
            raise CheckpointError(
                f"{save_dir}: holds checkpoints (latest iteration {iteration}) and checkpoint.resume=false; "
                f"starting from scratch would overwrite them. Set checkpoint.resume=true to continue, or "
                f"use an empty checkpoint.save_dir"
            )
    except BaseException:
        lock.release()
        raise
    return lock, iteration


def restore_interrupted_replaces(root: str, log) -> None:
    """Put a complete copy back at each `iter_XXXXXXX` an interrupted save left missing (lock held):
    the `.old-` copy of a two-rename replace, else the newest complete `.tmp-` copy (a save killed
    after megadiff.json was written but before its rename; or both copies an older megadiff's
    replace left behind)."""
    copies = {}
    for name in sorted(os.listdir(root)):
        m = fmt.ITER_NAME_PREFIX.match(name)
        path = os.path.join(root, name)
        final = os.path.join(root, name.split(fmt.BACKUP_MARK)[0].split(fmt.STAGING_MARK)[0])
        if not m or final == path or os.path.lexists(final) or fmt.iteration_dir_problem(path) is not None:
            continue
        rank = (fmt.BACKUP_MARK in name, str(fmt.read_meta(os.path.join(path, fmt.META_NAME)).get("saved_at")), name)
        copies[final] = max(copies.get(final, (rank, path)), (rank, path))
    for final, (_, path) in sorted(copies.items()):
        os.rename(path, final)
        log(f"restored {final} from {os.path.basename(path)} (a save or replace of it was interrupted)")
    if copies:
        fmt.fsync_dir(root)


def remove_stale_staging(root: str, log) -> None:
    """Delete what interrupted saves left in ROOT: tracker temp files, `.tmp-` and `.old-` dirs.
    With the lock held no writer is alive, and restore_interrupted_replaces has put every copy that
    could be needed back in place, so all of them are stale."""
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        if not (
            name.startswith(fmt.TRACKER_NAME + fmt.STAGING_MARK)
            or (fmt.ITER_NAME_PREFIX.match(name) and (fmt.STAGING_MARK in name or fmt.BACKUP_MARK in name))
        ):
            continue
        if os.path.isdir(path):
            fmt.remove_tree(path)
        else:
            os.unlink(path)
        log(f"removed {path} (left by an interrupted save)")


def resume_iteration(root: str, log: Callable[[str], None] = print) -> int | None:
    """The iteration a run with this save_dir resumes from: the newest complete one; None when the
    dir holds no checkpoint at all. Raises CheckpointError when the tracker's iteration or one newer
    than the newest complete one is damaged or missing (resuming older would retrain and overwrite
    it). Older damaged iterations and unfinished saves (no megadiff.json) are reported and kept."""
    complete = fmt.complete_iteration_dirs(root)
    newest = max(complete) if complete else None
    tracker = fmt.read_tracker(root)
    tracker_path = os.path.join(root, fmt.TRACKER_NAME)
    blocking = []
    for it, path in sorted(fmt.iteration_dirs(root).items()):
        problem = fmt.iteration_dir_problem(path)
        if problem is None:
            continue
        unfinished = not os.path.exists(os.path.join(path, fmt.META_NAME))
        if (newest is None or it > newest) and (not unfinished or it == tracker):
            blocking.append(f"{path} is damaged: {problem}")
        else:
            log(f"warning: {path} is not a complete checkpoint ({problem}); kept, not resumed from")
    tracked = os.path.join(root, fmt.iteration_dir_name(tracker)) if tracker is not None else None
    if tracked and (newest is None or tracker > newest) and not os.path.lexists(tracked):
        blocking.append(f"{tracker_path} names iteration {tracker}, but {tracked} is missing")
    if not blocking:
        return newest
    if newest is not None:
        how = (
            f"to resume from the newest complete iteration {newest} instead, move the damaged iteration "
            f"out of the way (e.g. mv DIR DIR.damaged) and run `echo {newest} > {tracker_path}`"
        )
    else:
        how = (
            "no complete iteration is left to resume from; repair it, or start afresh with another checkpoint.save_dir"
        )
    raise CheckpointError(f"cannot resume from {root}: {'; '.join(blocking)}. To proceed: {how}")


def apply_model_state(chunks, state: dict, adapters_only: bool = False) -> None:
    """Load the model part of a loaded dist-checkpoint state dict into the chunks (`adapters_only`:
    a LoRA run's, which holds the adapters; the frozen base keeps its weights)."""
    if adapters_only:
        load_adapter_state(chunks, state)
    elif len(chunks) == 1:
        chunks[0].load_state_dict(state["model"])
    else:
        for i, chunk in enumerate(chunks):
            chunk.load_state_dict(state[f"model{i}"])


def prune_checkpoints(root: str, keep_last: int) -> None:
    """Delete all but the newest `keep_last` complete iteration dirs (rank 0; keep_last <= 0 keeps
    all). Damaged or unfinished dirs are never deleted: they were reported, a person decides."""
    if keep_last <= 0 or (torch.distributed.is_initialized() and torch.distributed.get_rank() != 0):
        return
    complete = fmt.complete_iteration_dirs(root)
    for it in sorted(complete)[:-keep_last]:
        shutil.rmtree(complete[it], ignore_errors=True)


def initialise_optimizer_state(optimizer) -> None:
    """Give every torch Adam state its tensors before a checkpoint is loaded into it (see
    compat.init_optimizer_states_with_dummy_values); the loaded checkpoint then overwrites
    parameters and state alike."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if hasattr(opt, "_init_optimizer_states_with_dummy_values") and not opt.optimizer.state:
            init_optimizer_states_with_dummy_values(opt)


# Optimizer-state keys: `optimizer.…`, or `chained_N.optimizer.…` when megatron-core chains one optimizer per
# parameter group (dense and expert parameters of a MoE model: ChainedOptimizer's prefix).
OPTIMIZER_KEY = re.compile(r"^(chained_\d+\.)?optimizer")


def check_optimizer_layout(ckpt_dir: str, sharded_state_dict, layout, trust: bool = False) -> None:
    """Raise a CheckpointError naming both layouts and the way out when the checkpoint's optimizer
    state cannot be resumed at `layout` (dp_reshardable state resumes only at the saving layout)."""
    missing = [k for k in missing_sharded_keys(ckpt_dir, sharded_state_dict, trust) if OPTIMIZER_KEY.match(k)]
    if not missing:
        return  # anything else missing is reported by load_checkpoint
    meta = fmt.read_meta(ckpt_dir)
    saved_cfg = (meta.get("extra") or {}).get("training_config") or {}
    reshardable = (saved_cfg.get("checkpoint") or {}).get("fully_reshardable_optimizer")

    keep_only = f"To keep only the weights, start a new run with model.init_from_mcore={ckpt_dir} (fresh optimizer)"
    if meta.get("lora"):  # adapter-only: no weights to start from
        keep_only = (
            f"To keep only the adapters, export them (tools/convert_mcore_to_hf.py --mcore-dir {ckpt_dir} "
            f"--peft-adapter DIR) and start a new LoRA run from them"
        )

    def show(lay):
        return ", ".join(f"{k}={v}" for k, v in fmt.layout_dict(lay).items())

    raise CheckpointError(
        f"{ckpt_dir}: its optimizer state was saved at layout ({show(meta['layout'])}) with "
        f"checkpoint.fully_reshardable_optimizer={str(bool(reshardable)).lower()}, and cannot be resumed at this "
        f"run's layout ({show(layout)}) ('{missing[0]}' and {len(missing) - 1} more are not in the checkpoint). "
        f"Resume at the saved layout (any data-parallel size); checkpoints saved with "
        f"checkpoint.fully_reshardable_optimizer=true resume at any layout. " + keep_only
    )


# ---- LoRA runs: adapter-only checkpoints (megadiff.lora.adapter_checkpoint) ------------------------


def lora_settings(cfg) -> dict | None:
    """The run's adapter config (the `lora` section as the contract dict), None without LoRA."""
    return cfg.lora.adapter_config() if cfg.lora.enabled else None


def lora_base_for_run(cfg, iteration: int | None) -> dict | None:
    """Rank 0, with save_dir claimed and before the model is built (no weight read yet): the record
    of the base a LoRA run's checkpoints will name, checked against the checkpoint it resumes
    (`iteration` of checkpoint.save_dir; adapter-only vs full, adapter config, base). None for a
    run without LoRA, which is checked not to resume an adapter-only checkpoint."""
    run_lora = lora_settings(cfg)
    if iteration is not None:
        ckpt_dir = fmt.resolve_checkpoint_dir(cfg.checkpoint.save_dir, iteration)
        base = check_resume(ckpt_dir, run_lora, cfg.model.hf_dir, cfg.model.init_from_mcore)
    else:
        base = base_of_run(cfg.model.hf_dir, cfg.model.init_from_mcore) if run_lora is not None else None
    return base.to_dict() if base is not None else None
