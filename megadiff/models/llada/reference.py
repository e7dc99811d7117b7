"""LLaDA in plain PyTorch with the public model's weight names: megadiff's oracle for this family.

Built from the facts of the public remote code (modeling_llada.py, LLaDALlamaBlock): pre-norm
blocks with RMSNorm (fp32 normalisation, cast back, times the weight), separate q/k/v projections,
rotate-half RoPE on the whole head, full bidirectional attention with 1/sqrt(head_dim) scaling,
the MLP silu(ff_proj(x)) * up_proj(x) -> ff_out, a final ln_f and an untied output layer
`transformer.ff_out`. No dropout (megadiff trains without it). Unlike the remote code, positions
come from `position_ids` (default 0..s-1, where the two agree) and `attention_mask` takes any bool
mask (megadiff.models.common.reference.allowed_mask).
"""

from typing import NamedTuple

import torch
from torch import nn

from megadiff.models.common.reference import RMSNorm, allowed_mask, apply_rope, attention, rope_cos_sin, swiglu

from .config import LLaDAModelConfig


class ReferenceOutput(NamedTuple):
    logits: torch.Tensor


class LLaDABlock(nn.Module):
    def __init__(self, cfg: LLaDAModelConfig):
        super().__init__()
        h, d = cfg.hidden_size, cfg.head_dim
        self.heads, self.kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, d
        self.attn_norm = RMSNorm(h, cfg.rms_norm_eps)
        self.q_proj = nn.Linear(h, self.heads * d, bias=False)
        self.k_proj = nn.Linear(h, self.kv_heads * d, bias=False)
        self.v_proj = nn.Linear(h, self.kv_heads * d, bias=False)
        self.attn_out = nn.Linear(self.heads * d, h, bias=False)
        self.ff_norm = RMSNorm(h, cfg.rms_norm_eps)
        self.ff_proj = nn.Linear(h, cfg.ffn_hidden_size, bias=False)
        self.up_proj = nn.Linear(h, cfg.ffn_hidden_size, bias=False)
        self.ff_out = nn.Linear(cfg.ffn_hidden_size, h, bias=False)

    def forward(self, x, cos, sin, allowed):
        b, s, _ = x.shape
        normed = self.attn_norm(x)
        q = self.q_proj(normed).view(b, s, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(normed).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(normed).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        x = x + self.attn_out(attention(q, k, v, allowed))
        return x + swiglu(self.ff_norm(x), self.ff_proj, self.up_proj, self.ff_out)


class LLaDAReference(nn.Module):
    """model.transformer.{wte, blocks.N.*, ln_f, ff_out}: the released checkpoint's names."""

    def __init__(self, cfg: LLaDAModelConfig):
        super().__init__()
        self.cfg = cfg
        self.model = nn.Module()
        self.model.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(cfg.vocab_size, cfg.hidden_size),
                blocks=nn.ModuleList(LLaDABlock(cfg) for _ in range(cfg.num_hidden_layers)),
                ln_f=RMSNorm(cfg.hidden_size, cfg.rms_norm_eps),
                ff_out=nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False),
            )
        )

    def forward(self, input_ids, position_ids=None, attention_mask=None) -> ReferenceOutput:
        b, s = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(s, device=input_ids.device).expand(b, s)
        allowed = allowed_mask(attention_mask, b, s, input_ids.device)
        cos, sin = rope_cos_sin(position_ids, self.cfg.rotary_dim, self.cfg.rope_theta)
        t = self.model.transformer
        x = t.wte(input_ids)
        for block in t.blocks:
            x = block(x, cos, sin, allowed)
        return ReferenceOutput(t.ff_out(t.ln_f(x)))
