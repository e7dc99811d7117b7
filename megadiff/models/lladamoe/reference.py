"""LLaDA-MoE in plain PyTorch with the public model's weight names: megadiff's oracle for this family.

Built from the facts of the public remote code (modeling_lladamoe.py): pre-norm layers with RMSNorm,
separate q/k/v/o projections, optional per-head QK RMSNorm before rotate-half RoPE (on the first
head_dim * partial_rotary_factor dims), full bidirectional attention; MLP per `moe_layer_freq`:
a dense SwiGLU MLP, or the sparse block whose routing is (LLaDAMoESparseMoeBlock.forward)

    p = softmax(gate(x)) in fp32;  p = p + expert_bias (if enabled);  w, e = top-k(p)
    out = sum_k w_k * expert_{e_k}(x)          (w unnormalised, unscaled; the bias is in w)

plus, in MoE layers, an unweighted shared expert beside the block (`shared_expert`). Experts run
one at a time (the plain math; slow, for small models). Positions come from `position_ids`
(default 0..s-1, as the remote code) and `attention_mask` takes any bool mask.
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from megadiff.models.common.reference import RMSNorm, allowed_mask, apply_rope, attention, rope_cos_sin, swiglu

from .config import LLaDAMoEModelConfig


class ReferenceOutput(NamedTuple):
    logits: torch.Tensor


class MLP(nn.Module):
    def __init__(self, hidden: int, ffn: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, ffn, bias=False)
        self.up_proj = nn.Linear(hidden, ffn, bias=False)
        self.down_proj = nn.Linear(ffn, hidden, bias=False)

    def forward(self, x):
        return swiglu(x, self.gate_proj, self.up_proj, self.down_proj)


class SparseMoeBlock(nn.Module):
    def __init__(self, cfg: LLaDAMoEModelConfig):
        super().__init__()
        self.top_k = cfg.num_experts_per_tok
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.experts = nn.ModuleList(MLP(cfg.hidden_size, cfg.moe_ffn_hidden_size) for _ in range(cfg.num_experts))
        if cfg.expert_bias:
            self.register_buffer("expert_bias", torch.zeros(cfg.num_experts, dtype=torch.float32))
        else:
            self.expert_bias = None
        self.last_routing = None  # (experts [tokens, k], weights [tokens, k]) of the last forward

    def forward(self, hidden):
        shape = hidden.shape
        x = hidden.reshape(-1, shape[-1])
        p = F.softmax(self.gate(x), dim=-1, dtype=torch.float32)
        if self.expert_bias is not None:
            p = p + self.expert_bias.float()
        weights, chosen = torch.topk(p, self.top_k, dim=-1)
        self.last_routing = (chosen.detach(), weights.detach())
        weights = weights.to(x.dtype)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            token, slot = (chosen == e).nonzero(as_tuple=True)
            if token.numel():
                out.index_add_(0, token, expert(x[token]) * weights[token, slot, None])
        return out.view(shape)


class Attention(nn.Module):
    def __init__(self, cfg: LLaDAMoEModelConfig):
        super().__init__()
        h, d = cfg.hidden_size, cfg.head_dim
        self.heads, self.kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, d
        self.q_proj = nn.Linear(h, self.heads * d, bias=False)
        self.k_proj = nn.Linear(h, self.kv_heads * d, bias=False)
        self.v_proj = nn.Linear(h, self.kv_heads * d, bias=False)
        self.o_proj = nn.Linear(self.heads * d, h, bias=False)
        if cfg.qk_layernorm:
            self.q_norm = RMSNorm(d, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(d, cfg.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x, cos, sin, allowed):
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.heads, self.head_dim)
        k = self.k_proj(x).view(b, s, self.kv_heads, self.head_dim)
        v = self.v_proj(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q.transpose(1, 2), cos, sin), apply_rope(k.transpose(1, 2), cos, sin)
        return self.o_proj(attention(q, k, v, allowed))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LLaDAMoEModelConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        moe = cfg.moe_layer_pattern[layer] == 1
        self.mlp = SparseMoeBlock(cfg) if moe else MLP(cfg.hidden_size, cfg.ffn_hidden_size)
        if moe and cfg.shared_expert_intermediate_size:
            self.shared_expert = MLP(cfg.hidden_size, cfg.shared_expert_intermediate_size)
        else:
            self.shared_expert = None

    def forward(self, x, cos, sin, allowed):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, allowed)
        normed = self.post_attention_layernorm(x)
        out = self.mlp(normed)
        if self.shared_expert is not None:
            out = out + self.shared_expert(normed)
        return x + out


class LLaDAMoEReference(nn.Module):
    """model.{embed_tokens, layers.N.*, norm}, lm_head: the released checkpoint's names."""

    def __init__(self, cfg: LLaDAMoEModelConfig):
        super().__init__()
        self.cfg = cfg
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.model.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.model.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def moe_blocks(self):
        """The MoE blocks in layer order, as (layer index, block)."""
        return [(i, layer.mlp) for i, layer in enumerate(self.model.layers) if isinstance(layer.mlp, SparseMoeBlock)]

    def forward(self, input_ids, position_ids=None, attention_mask=None) -> ReferenceOutput:
        b, s = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(s, device=input_ids.device).expand(b, s)
        allowed = allowed_mask(attention_mask, b, s, input_ids.device)
        cos, sin = rope_cos_sin(position_ids, self.cfg.rotary_dim, self.cfg.rope_theta)
        x = self.model.embed_tokens(input_ids)
        for layer in self.model.layers:
            x = layer(x, cos, sin, allowed)
        return ReferenceOutput(self.lm_head(self.model.norm(x)))
