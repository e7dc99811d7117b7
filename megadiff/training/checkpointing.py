"""Trainer-side checkpoint helpers on top of megadiff.checkpoint (the on-disk format)."""

import os
import re
import shutil

_ITER_DIR = re.compile(r"^iter_(\d{7})$")


def apply_model_state(chunks, state: dict) -> None:
    """Load the model part of a loaded dist-checkpoint state dict into the chunks."""
    if len(chunks) == 1:
        chunks[0].load_state_dict(state["model"])
    else:
        for i, chunk in enumerate(chunks):
            chunk.load_state_dict(state[f"model{i}"])


def prune_checkpoints(root: str, keep_last: int) -> None:
    """Delete all but the newest `keep_last` complete iteration dirs (rank 0; keep_last <= 0 keeps all)."""
    import torch

    if keep_last <= 0 or (torch.distributed.is_initialized() and torch.distributed.get_rank() != 0):
        return
    from megadiff.checkpoint import latest_iteration

    latest = latest_iteration(root)
    iterations = sorted(int(m.group(1)) for m in map(_ITER_DIR.match, os.listdir(root)) if m)
    for it in iterations[:-keep_last]:
        if it != latest:
            shutil.rmtree(os.path.join(root, f"iter_{it:07d}"), ignore_errors=True)


def initialise_optimizer_state(optimizer) -> None:
    """Give every torch Adam state its tensors before a checkpoint is loaded into it.

    Without TE/apex fused Adam, megatron-core's distributed optimizer can only describe its state
    (and so load it) once a step has created it. megatron-core's own dummy step fills it with
    zeros; the loaded checkpoint then overwrites parameters and state alike."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if hasattr(opt, "_init_optimizer_states_with_dummy_values") and not opt.optimizer.state:
            opt._init_optimizer_states_with_dummy_values()


def restore_adam_steps(optimizer, loaded_optimizer_state) -> None:
    """Set torch Adam's per-parameter `step` to the checkpoint's.

    megatron-core 0.16's dp_reshardable load copies the per-parameter state tensors back after
    `load_state_dict` has set `step` from the saved param groups, and the copied `step` is the
    one of the dummy initialisation step (1), which would restart Adam's bias correction."""
    import torch

    optimizers = getattr(optimizer, "chained_optimizers", [optimizer])
    states = [loaded_optimizer_state] if len(optimizers) == 1 else [
        v for _, v in sorted(loaded_optimizer_state.items())
    ]
    for opt, state in zip(optimizers, states):
        steps = {g["step"] for g in state["optimizer"]["param_groups"] if "step" in g}
        if len(steps) != 1:
            continue  # fused (TE/apex) Adam keeps its step in the param groups, already loaded
        step = float(steps.pop())
        for value in opt.optimizer.state.values():
            if "step" in value:
                value["step"] = torch.tensor(step)
