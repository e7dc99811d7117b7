"""Plain-PyTorch building blocks of the families' reference models (the test oracles).

Written straight from the math, no fused tricks: RMSNorm in fp32, rotate-half RoPE on the first
`rotary_dim` dims of each head at explicit positions, attention as an explicit softmax over a bool
mask (True = the query may attend the key; None = full bidirectional attention), grouped-query
heads by repetition. Each family's reference module (megadiff.models.<family>.reference) arranges
them under its own HF parameter names.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """x / rms(x) in fp32, cast back, times the weight (the HF Llama-family order)."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_cos_sin(position_ids: torch.Tensor, rotary_dim: int, theta: float):
    """cos, sin [b, s, rotary_dim] of rotate-half RoPE at `position_ids` [b, s]."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim))
    freqs = position_ids.float()[..., None] * inv_freq.to(position_ids.device)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x, cos, sin):
    """x [b, heads, s, head_dim]: rotate the first cos.shape[-1] dims, pass the rest."""
    rot = cos.shape[-1]
    cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    return torch.cat((x_rot * cos + rotate_half(x_rot) * sin, x_pass), dim=-1)


def attention(q, k, v, allowed):
    """q [b, h, s, d], k / v [b, kv_heads, s, d], allowed bool [b, 1, s, s] or None -> [b, s, h * d]."""
    b, heads, s, d = q.shape
    groups = heads // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = (q @ k.transpose(-1, -2)).float() / math.sqrt(d)
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    return (probs @ v).transpose(1, 2).reshape(b, s, heads * d)


def swiglu(x, gate: nn.Linear, up: nn.Linear, down: nn.Linear):
    return down(F.silu(gate(x)) * up(x))


def allowed_mask(attention_mask, batch: int, length: int, device):
    """The accepted mask forms -> bool [batch, 1, q, k] (True = may attend) or None: None (full
    attention), [batch, q, k] / [batch, 1, q, k] bool or 0/1, or a [batch, k] key padding mask."""
    if attention_mask is None:
        return None
    m = attention_mask.to(device)
    if m.dtype != torch.bool:
        m = m > 0
    if m.dim() == 2:
        m = m[:, None, None, :].expand(batch, 1, length, length)
    elif m.dim() == 3:
        m = m[:, None]
    if m.shape[-2:] != (length, length):
        raise ValueError(f"attention_mask ends in {tuple(m.shape[-2:])}, expected ({length}, {length})")
    return m


def randomize_(model: nn.Module, seed: int, norm_names=("norm",)) -> None:
    """Random, non-trivial weights: norms near 1 (not exactly), linears and embeddings with
    std 0.5 / sqrt(fan_in), so a test that skips a norm or swaps two weights fails."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 2)[-2] if "." in name else name
            if any(n in leaf for n in norm_names):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5 / p.shape[-1] ** 0.5)
