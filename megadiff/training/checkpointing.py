"""Trainer-side checkpoint helpers on top of megadiff.checkpoint (the on-disk format)."""

import os
import re
import shutil

_ITER_DIR = re.compile(r"^iter_(\d{7})$")


def apply_model_state(chunks, state: dict) -> None:
    """Load the model part of a loaded dist-checkpoint state dict into the chunks."""
    if len(chunks) == 1:
        chunks[0].load_state_dict(state["model"], strict=False)
    else:
        for i, chunk in enumerate(chunks):
            chunk.load_state_dict(state[f"model{i}"], strict=False)


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
