"""Full-vocabulary logits of a (possibly TP/EP/PP/VPP-split) model, on every rank.

For checks and tools (compare_logits, converter tests), not for training: the logits are gathered
over TP and broadcast from the last pipeline stage.
"""

import torch
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

from megadiff.models.llada2.schedule import forward_backward
from megadiff.platform.device import run_device, to_run_device


def pad_for_sequence_parallel(input_ids, position_ids, allowed, tp: int):
    """Right-pad a [1, s] row to a multiple of `tp` (sequence parallelism splits the sequence);
    padded keys are masked out, so the real positions' logits are unchanged."""
    s = input_ids.shape[1]
    padded = -(-s // tp) * tp
    if padded == s:
        return input_ids, position_ids, allowed
    extra = padded - s
    input_ids = torch.cat([input_ids, input_ids.new_zeros(1, extra)], dim=1)
    position_ids = torch.cat([position_ids, position_ids.new_zeros(1, extra)], dim=1)
    device = input_ids.device
    full = torch.zeros(1, padded, padded, dtype=torch.bool, device=device)
    full[:, :, :s] = True if allowed is None else False
    if allowed is not None:
        full[:, :s, :s] = allowed
    full[:, s:, s:] |= torch.eye(extra, dtype=torch.bool, device=device)  # padding sees itself only
    return input_ids, position_ids, full


@torch.no_grad()
def full_logits(chunks, input_ids, position_ids, allowed: torch.Tensor | None = None):
    """[1, s, vocab] fp32 logits of one row, returned on every rank, on the CPU. Inputs may be on
    the host; the model runs on the run device."""
    s = input_ids.shape[1]
    input_ids, position_ids, allowed = to_run_device((input_ids, position_ids, allowed))
    ids, pos, mask = pad_for_sequence_parallel(
        input_ids, position_ids, allowed, ps.get_tensor_model_parallel_world_size()
    )
    collected = []

    def loss_fn(batch, output):
        # On the CPU before all_gather_object: a pickled CUDA tensor would come back on this
        # rank's GPU index on every rank.
        collected.append(gather_from_tensor_model_parallel_region(output).float()[:, :s].cpu())
        return output.sum() * 0.0, torch.ones((), dtype=torch.int, device=run_device()), {}

    for chunk in chunks:
        chunk.eval()
    forward_backward(chunks, [dict(input_ids=ids, position_ids=pos, allowed=mask)], loss_fn, forward_only=True)
    everyone = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(everyone, collected[0] if collected else None)
    return next(t for t in everyone if t is not None)
