"""The FlexAttention BlockMask of one micro-batch for the model's flex core attention.

The mask rules are megadiff.diffusion.masks' mask_mods; building the BlockMask (eager or compiled)
is the model's flex attention (megadiff.models.common.attention.build_block_mask).
"""

import torch
from torch.nn.attention.flex_attention import BlockMask

from megadiff.models.common.attention import build_block_mask
from megadiff.models.common.context_parallel import local_query_mask_mod

from .masks import block_diffusion_mask_mod, full_attention_mask_mod


def block_mask_for(
    doc_ids: torch.Tensor,
    position_ids: torch.Tensor,
    mode: str,
    block_size: int = 32,
    device=None,
    cp: int = 1,
    cp_rank: int = 0,
) -> BlockMask:
    """The BlockMask for one micro-batch ([B, S] doc_ids / position_ids), for FlexCoreAttention.

    mode "full": bidirectional within each document, over S (masked diffusion).
    mode "bd":   block diffusion over 2S for the input [x_t ; x_0] (both halves share doc_ids and
                 position_ids; see megadiff.diffusion.masks.block_diffusion_mask).
    Equal to `~mcore_attention_mask(...)`'s dense masks, without building them per head.
    cp > 1: context-parallel rank `cp_rank`'s mask, its local queries against the gathered keys
    (megadiff.models.common.context_parallel)."""
    device = torch.device(device) if device is not None else doc_ids.device
    doc_ids, position_ids = doc_ids.to(device), position_ids.to(device)
    batch, seq_len = doc_ids.shape
    if mode == "full":
        mask_mod, length = full_attention_mask_mod(doc_ids), seq_len
    elif mode == "bd":
        mask_mod = block_diffusion_mask_mod(doc_ids, position_ids, block_size, seq_len)
        length = 2 * seq_len
    else:
        raise ValueError(f"block_mask_for: mode must be 'full' or 'bd', got {mode!r}")
    if cp > 1:
        mask_mod = local_query_mask_mod(mask_mod, length, cp, cp_rank, device)
    return build_block_mask(mask_mod, batch, length, device, q_length=length // cp)
