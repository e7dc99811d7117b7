"""Context parallelism (CP): one sequence split over the ranks of megatron-core's CP group.

Partition (megatron-core's zig-zag, `get_batch_on_this_cp_rank`): the model's sequence of length n
is cut into 2*cp equal chunks and CP rank r holds chunks r and 2*cp-1-r, in that order. For block
diffusion the model's sequence is [x_t ; x_0] (n = 2S): chunk r lies in x_t and chunk 2cp-1-r in
x_0, so every rank holds S/cp x_t tokens followed by S/cp x_0 tokens (the x_t-only output layer
keeps the first half, as without CP). A query at block k of its document sees (k+1) blocks of keys
from x_t and from x_0 alike, so x_t and x_0 cost the same per position and rank r's work,
f(r) + f(cp-1-r), is balanced for one document; `visible_pairs_per_rank` measures packed rows.
megatron-core slices RoPE's position table with the same zig-zag, so the model gets every rank's
local tokens with the whole row's position ids.

Attention (`FlexCoreAttention`): each rank's K/V are all-gathered over the CP group (backward:
reduce-scatter of their gradients), and its BlockMask covers its local queries against all keys
(`local_query_mask_mod`: local query i is global position `zigzag_positions(...)[i]`, gathered key
j is `gathered_positions(...)[j]`). Family-agnostic: sizes come from process groups, never from a
model config.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

from megadiff.platform.parallel_layout import sequence_multiple

__all__ = [
    "cp_group_and_rank",
    "gather_keys_values",
    "gather_sequence",
    "gathered_positions",
    "local_query_mask_mod",
    "sequence_multiple",
    "visible_pairs_per_rank",
    "zigzag_positions",
]


def zigzag_positions(length: int, cp: int, rank: int, device=None) -> torch.Tensor:
    """Global positions (0..length-1) held by CP rank `rank`, in its local order: chunk `rank`
    then chunk 2*cp-1-rank of 2*cp equal chunks."""
    if length % (2 * cp):
        raise ValueError(f"context parallel: sequence length {length} is not a multiple of 2*cp = {2 * cp}")
    chunk = length // (2 * cp)
    first = torch.arange(rank * chunk, (rank + 1) * chunk, device=device)
    second = torch.arange((2 * cp - 1 - rank) * chunk, (2 * cp - rank) * chunk, device=device)
    return torch.cat([first, second])


def gathered_positions(length: int, cp: int, device=None) -> torch.Tensor:
    """Global position of each row of K/V all-gathered over the CP group (rank 0's rows first)."""
    return torch.cat([zigzag_positions(length, cp, r, device) for r in range(cp)])


def local_query_mask_mod(mask_mod, length: int, cp: int, rank: int, device=None):
    """`mask_mod` (over global positions 0..length-1) as seen by CP rank `rank`: its queries are
    its local tokens (length/cp of them), its keys the gathered K/V (length)."""
    queries = zigzag_positions(length, cp, rank, device)
    keys = gathered_positions(length, cp, device)

    def local_mask_mod(b, h, q_idx, kv_idx):
        return mask_mod(b, h, queries[q_idx], keys[kv_idx])

    return local_mask_mod


def cp_group_and_rank() -> tuple[torch.distributed.ProcessGroup | None, int, int]:
    """(group, size, rank) of this process's CP group; (None, 1, 0) where none is initialised."""
    if not parallel_state.model_parallel_is_initialized():
        return None, 1, 0
    group = parallel_state.get_context_parallel_group()
    return group, group.size(), group.rank()


def gather_sequence(tensor: torch.Tensor, group) -> torch.Tensor:
    """All-gather [s, ...] along the sequence (dim 0) over `group`; the backward reduce-scatters
    the gradient (every rank's queries contributed to every rank's keys and values)."""
    return gather_from_sequence_parallel_region(tensor, tensor_parallel_output_grad=True, group=group)


def gather_keys_values(key: torch.Tensor, value: torch.Tensor, group) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V [s_local, b, groups, d] -> [s_local * cp, b, groups, d], gathered in one collective."""
    both = gather_sequence(torch.cat([key, value], dim=-1), group)
    return both.split([key.shape[-1], value.shape[-1]], dim=-1)


def visible_pairs_per_rank(keys_per_query: torch.Tensor, cp: int) -> list[int]:
    """Visible (query, key) pairs of each CP rank: `keys_per_query` [B, n] counts the keys each
    query of the model's sequence sees (megadiff.diffusion.masks.visible_keys_per_query); the
    queries are split by the zig-zag partition. Attention work per rank is proportional to these."""
    per_position = keys_per_query.sum(dim=0)
    n = per_position.shape[0]
    return [int(per_position[zigzag_positions(n, cp, r, per_position.device)].sum()) for r in range(cp)]
