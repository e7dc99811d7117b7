"""Full-vocabulary logits of a (possibly TP/EP/PP/VPP-split) model, on every rank.

For checks and tools (compare_logits, converter tests), not for training: the logits are gathered
over TP (and over CP: each context-parallel rank computes its zig-zag part of the row) and broadcast
from the last pipeline stage.
"""

import torch
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

from megadiff.platform.device import run_device, to_run_device

from .context_parallel import local_query_mask_mod, sequence_multiple, zigzag_positions
from .schedule import forward_backward


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


def context_parallel_row(input_ids, position_ids, cp: int, cp_rank: int, tp: int):
    """One [1, s] row for CP rank `cp_rank` (model built with attention_backend="flex"): (its
    tokens, the whole row's position ids, its local-query BlockMask or None, the global position of
    each of its tokens). The row is right-padded to a multiple of lcm(2*cp, cp*tp); padded keys are
    masked out (padded queries see themselves), so the real positions' logits are unchanged."""
    # compiles flex (TorchDynamo): only CP runs need it
    from megadiff.models.common.attention import build_block_mask

    s = input_ids.shape[1]
    n = -(-s // sequence_multiple(cp, tp)) * sequence_multiple(cp, tp)
    if n > s:
        input_ids = torch.cat([input_ids, input_ids.new_zeros(1, n - s)], dim=1)
        position_ids = torch.cat([position_ids, position_ids.new_zeros(1, n - s)], dim=1)
    device = input_ids.device
    mask = None
    if n > s:
        mask_mod = local_query_mask_mod(lambda b, h, q, kv: (kv < s) | (q == kv), n, cp, cp_rank, device)
        mask = build_block_mask(mask_mod, 1, n, device, q_length=n // cp)
    mine = zigzag_positions(n, cp, cp_rank, device)
    return input_ids[:, mine], position_ids, mask, mine


@torch.no_grad()
def full_logits(chunks, input_ids, position_ids, allowed: torch.Tensor | None = None):
    """[1, s, vocab] fp32 logits of one row, returned on every rank, on the CPU. Inputs may be on
    the host; the model runs on the run device. Under context parallelism `allowed` must be None
    (full attention)."""
    s = input_ids.shape[1]
    input_ids, position_ids, allowed = to_run_device((input_ids, position_ids, allowed))
    tp, cp = ps.get_tensor_model_parallel_world_size(), ps.get_context_parallel_world_size()
    if cp > 1:
        if allowed is not None:
            raise ValueError("full_logits under context parallelism takes no dense mask (full attention only)")
        ids, pos, mask, _ = context_parallel_row(input_ids, position_ids, cp, ps.get_context_parallel_rank(), tp)
    else:
        ids, pos, mask = pad_for_sequence_parallel(input_ids, position_ids, allowed, tp)
    collected = []

    def loss_fn(batch, output):
        logits = gather_from_tensor_model_parallel_region(output).float()
        if cp > 1:  # every CP rank's part, back in row order
            pieces = [torch.empty_like(logits) for _ in range(cp)]
            torch.distributed.all_gather(pieces, logits.contiguous(), group=ps.get_context_parallel_group())
            order = torch.cat([zigzag_positions(cp * logits.shape[1], cp, r, logits.device) for r in range(cp)])
            logits = torch.empty_like(torch.cat(pieces, dim=1)).index_copy_(1, order, torch.cat(pieces, dim=1))
        # On the CPU before all_gather_object: a pickled CUDA tensor would come back on this
        # rank's GPU index on every rank.
        collected.append(logits[:, :s].cpu())
        return output.sum() * 0.0, torch.ones((), dtype=torch.int, device=run_device()), {}

    for chunk in chunks:
        chunk.eval()
    forward_backward(chunks, [dict(input_ids=ids, position_ids=pos, allowed=mask)], loss_fn, forward_only=True)
    everyone = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(everyone, collected[0] if collected else None)
    return next(t for t in everyone if t is not None)
