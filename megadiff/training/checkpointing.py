"""Trainer-side checkpoint helpers on top of megadiff.checkpoint (the on-disk format)."""

import os
import re
import shutil

# Version-dependent optimizer workarounds live in compat; the trainer imports restore_adam_steps from here.
from megadiff.platform.compat import init_optimizer_states_with_dummy_values, restore_adam_steps  # noqa: F401

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
    """Give every torch Adam state its tensors before a checkpoint is loaded into it (see
    compat.init_optimizer_states_with_dummy_values); the loaded checkpoint then overwrites
    parameters and state alike."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if hasattr(opt, "_init_optimizer_states_with_dummy_values") and not opt.optimizer.state:
            init_optimizer_states_with_dummy_values(opt)
