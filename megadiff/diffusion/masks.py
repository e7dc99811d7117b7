"""Attention masks for diffusion LMs on packed rows, as bool "allowed" tensors (True = query may attend key).

Two rules, each as a dense tensor (for the unfused/SDPA path and for tests) and as a FlexAttention
`mask_mod` (for `torch.nn.attention.flex_attention.create_block_mask`, no [S, S] tensor materialised):

- full attention (LLaDA masked diffusion): bidirectional within each document.
- block diffusion (BD3-LM / LLaDA2): input [x_t ; x_0] of length 2S; both halves share doc_ids and
  position_ids, and a token's block is position_id // block_size, so blocks restart at every document.
      x_t query, block b -> x_t keys of its doc in block b (bidirectional) + x_0 keys of its doc in blocks < b
      x_0 query, block b -> x_0 keys of its doc in blocks <= b (block-causal); never x_t
  Nothing crosses documents.
megatron-core's `attention_mask` convention is the opposite (True = masked out): pass `~mask`.
"""

from __future__ import annotations

import torch


def full_attention_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """Return [B, S, S] bool: query i may attend key j iff they are in the same document."""
    return doc_ids[:, :, None] == doc_ids[:, None, :]


def block_diffusion_mask(doc_ids: torch.Tensor, position_ids: torch.Tensor, block_size: int) -> torch.Tensor:
    """Return [B, 2S, 2S] bool for input [x_t ; x_0] (rule in the module docstring)."""
    seq_len = doc_ids.shape[1]
    doc = torch.cat([doc_ids, doc_ids], dim=1)
    block = torch.cat([position_ids, position_ids], dim=1) // block_size
    is_x0 = (torch.arange(2 * seq_len, device=doc_ids.device) >= seq_len)[None, :]
    q_x0, k_x0 = is_x0[:, :, None], is_x0[:, None, :]
    q_block, k_block = block[:, :, None], block[:, None, :]

    xt_to_xt = ~q_x0 & ~k_x0 & (q_block == k_block)
    xt_to_x0 = ~q_x0 & k_x0 & (k_block < q_block)
    x0_to_x0 = q_x0 & k_x0 & (k_block <= q_block)
    same_doc = doc[:, :, None] == doc[:, None, :]
    return same_doc & (xt_to_xt | xt_to_x0 | x0_to_x0)


def full_attention_mask_mod(doc_ids: torch.Tensor):
    """Return a FlexAttention mask_mod(b, h, q_idx, kv_idx) equal to full_attention_mask(doc_ids)."""

    def mask_mod(b, h, q_idx, kv_idx):
        return doc_ids[b, q_idx] == doc_ids[b, kv_idx]

    return mask_mod


def block_diffusion_mask_mod(doc_ids: torch.Tensor, position_ids: torch.Tensor, block_size: int, seq_len: int):
    """Return a FlexAttention mask_mod over indices [0, 2*seq_len) equal to block_diffusion_mask(...)."""
    if doc_ids.shape[1] != seq_len or position_ids.shape != doc_ids.shape:
        raise ValueError(
            f"doc_ids {tuple(doc_ids.shape)} and position_ids {tuple(position_ids.shape)} must both be [B, seq_len={seq_len}]"
        )

    def mask_mod(b, h, q_idx, kv_idx):
        q_x0, k_x0 = q_idx >= seq_len, kv_idx >= seq_len
        q, k = q_idx - q_x0 * seq_len, kv_idx - k_x0 * seq_len  # index into the shared [S] metadata
        q_block, k_block = position_ids[b, q] // block_size, position_ids[b, k] // block_size
        xt_to_xt = ~q_x0 & ~k_x0 & (q_block == k_block)
        xt_to_x0 = ~q_x0 & k_x0 & (k_block < q_block)
        x0_to_x0 = q_x0 & k_x0 & (k_block <= q_block)
        return (doc_ids[b, q] == doc_ids[b, k]) & (xt_to_xt | xt_to_x0 | x0_to_x0)

    return mask_mod


def visible_keys_per_query(doc_ids: torch.Tensor, position_ids: torch.Tensor, mode: str, block_size: int = 32):
    """[B, n] long: how many keys each query of the model's sequence may attend to (the row sums of
    full_attention_mask, n = S, or of block_diffusion_mask, n = 2S), without building the mask.
    Block diffusion: a token in block k of its document sees, as an x_t query, its own block and its
    document's earlier blocks (in x_0), and as an x_0 query the same count (blocks <= k of x_0)."""
    rows = torch.arange(doc_ids.shape[0], device=doc_ids.device)[:, None].expand_as(doc_ids)
    if mode == "full":
        _, inverse, counts = torch.unique(
            torch.stack([rows, doc_ids]).flatten(1), dim=1, return_inverse=True, return_counts=True
        )
        return counts[inverse].view_as(doc_ids)
    if mode != "bd":
        raise ValueError(f"visible_keys_per_query: mode must be 'full' or 'bd', got {mode!r}")
    block = position_ids // block_size
    groups, inverse, counts = torch.unique(
        torch.stack([rows, doc_ids, block]).flatten(1), dim=1, return_inverse=True, return_counts=True
    )  # sorted by (row, doc, block)
    before = torch.cumsum(counts, 0) - counts  # tokens of all earlier (row, doc, block) groups
    new_doc = torch.ones_like(counts, dtype=torch.bool)
    new_doc[1:] = (groups[:2, 1:] != groups[:2, :-1]).any(0)
    doc_start = torch.cummax(torch.where(new_doc, before, torch.zeros_like(before)), 0).values
    seen = (before - doc_start + counts)[inverse].view_as(doc_ids)  # earlier blocks of the doc + own block
    return torch.cat([seen, seen], dim=1)
