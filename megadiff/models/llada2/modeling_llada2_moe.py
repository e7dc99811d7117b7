"""Plain-PyTorch LLaDA2 (llada2_moe) model with the exact Hugging Face weight names.

This is megadiff's oracle: every parallel layout, converter and loss is tested against it, so it is
written straight from the math of LLaDA2's released remote code with no fused tricks: attention is an explicit
softmax over a boolean mask, and with gradients on the routed experts run in a Python loop (one
expert at a time, `_routed_experts_loop`). Without gradients (generate, eval) the same math runs
batched (`_routed_experts_batched`: tokens sorted by expert, one grouped matmul per projection,
no host sync per expert) so that a 16B model is usable on a GPU; a test holds the two equal.

Self-contained (imports only torch and transformers) so it can be copied next to a checkpoint as the
`auto_map` remote code. Its `generate()` (the LLaDA2 model card's) runs megadiff's block sampler,
`sampler.py` + `editing.py`, which megadiff writes beside this file in every model dir it makes
(they import only torch): the same tokens as tools/generate.py.

Masks: `attention_mask` is boolean (or 0/1) with True = the query MAY attend the key, shaped
[batch, q, k] or [batch, 1, q, k]; None means full bidirectional attention. A 2-D [batch, k] mask
is a key padding mask. Positions: `position_ids` [batch, q] drive RoPE directly, so block-diffusion
inputs whose two halves both use positions 0..L-1 work.
"""

import importlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel

from .configuration_llada2_moe import LLaDA2MoeConfig


@dataclass
class LLaDA2MoeOutput:
    """logits [b, s, vocab]; past_key_values: per layer (k, v) [b, kv_heads, s_total, head_dim]
    (keys after QK-norm and RoPE), when use_cache. A plain dataclass: transformers 5's ModelOutput
    renames `past_key_values` and warns on every access."""

    logits: torch.Tensor
    past_key_values: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    def __getitem__(self, index):
        return (self.logits, self.past_key_values)[index]


class LLaDA2MoeRMSNorm(nn.Module):
    def __init__(self, hidden_size, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class LLaDA2MoeRotaryEmbedding(nn.Module):
    """RoPE on the first `rotary_dim` dims of each head, rotate-half style, from position ids."""

    def __init__(self, config: LLaDA2MoeConfig):
        super().__init__()
        self.rotary_dim = int(config.head_dim * config.partial_rotary_factor)
        inv_freq = 1.0 / (
            config.rope_theta ** (torch.arange(0, self.rotary_dim, 2, dtype=torch.float32) / self.rotary_dim)
        )
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, position_ids):
        freqs = position_ids.float()[..., None] * self.inv_freq.float().to(position_ids.device)
        emb = torch.cat((freqs, freqs), dim=-1)  # [b, s, rotary_dim]
        return emb.cos(), emb.sin()


def apply_partial_rope(x, cos, sin):
    """x: [b, heads, s, head_dim]; rotate the first cos.shape[-1] dims."""
    rot = cos.shape[-1]
    cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    return torch.cat((x_rot * cos + rotate_half(x_rot) * sin, x_pass), dim=-1)


class LLaDA2MoeMLP(nn.Module):
    def __init__(self, config: LLaDA2MoeConfig, intermediate_size: int):
        super().__init__()
        h = config.hidden_size
        self.gate_proj = nn.Linear(h, intermediate_size, bias=False)
        self.up_proj = nn.Linear(h, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, h, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LLaDA2MoeGate(nn.Module):
    """Sigmoid router with expert bias and group-limited top-k: scores s = sigmoid(x W^T) in fp32; the
    experts are chosen by s + expert_bias (groups ranked by the sum of their top-2 biased scores, the
    best topk_group groups kept, top-k experts inside them); their weights are the unbiased s,
    normalised to sum 1, times routed_scaling_factor."""

    def __init__(self, config: LLaDA2MoeConfig):
        super().__init__()
        self.num_experts = config.num_experts
        self.top_k = config.num_experts_per_tok
        self.n_group = config.n_group
        self.topk_group = config.topk_group
        self.routed_scaling_factor = config.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))
        self.register_buffer("expert_bias", torch.zeros(config.num_experts, dtype=torch.float32))

    def forward(self, x):
        """x: [tokens, hidden] -> (expert indices [tokens, k], weights [tokens, k] fp32)."""
        logits = F.linear(x.float(), self.weight.float())
        scores = torch.sigmoid(logits)
        biased = scores + self.expert_bias.float()
        tokens = x.shape[0]
        group_scores = biased.view(tokens, self.n_group, -1).topk(2, dim=-1).values.sum(-1)
        best_groups = group_scores.topk(self.topk_group, dim=-1).indices
        group_keep = torch.zeros_like(group_scores, dtype=torch.bool)
        group_keep.scatter_(1, best_groups, True)
        expert_keep = group_keep.repeat_interleave(self.num_experts // self.n_group, dim=1)
        biased = biased.masked_fill(~expert_keep, float("-inf"))
        indices = biased.topk(self.top_k, dim=-1).indices
        weights = scores.gather(1, indices)
        weights = weights / weights.sum(-1, keepdim=True) * self.routed_scaling_factor
        return indices, weights


class LLaDA2MoeSparseMoeBlock(nn.Module):
    def __init__(self, config: LLaDA2MoeConfig):
        super().__init__()
        self.gate = LLaDA2MoeGate(config)
        self.experts = nn.ModuleList(
            LLaDA2MoeMLP(config, config.moe_intermediate_size) for _ in range(config.num_experts)
        )
        self.shared_experts = None
        if config.num_shared_experts:
            self.shared_experts = LLaDA2MoeMLP(config, config.moe_intermediate_size * config.num_shared_experts)
        self.last_routing = None  # (indices, weights) of the last forward, for routing tests

    # Batched experts without gradients (inference) on plain linears; False forces the per-expert loop.
    batched_experts = True
    _GATHER_ELEMENTS = 1 << 25  # fallback without torch._grouped_mm: gathered weights per chunk

    def forward(self, hidden):
        shape = hidden.shape
        x = hidden.reshape(-1, shape[-1])
        indices, weights = self.gate(x)
        self.last_routing = (indices.detach(), weights.detach())
        if self.batched_experts and not torch.is_grad_enabled() and self._experts_are_plain_linears():
            out = self._routed_experts_batched(x, indices, weights)
        else:
            out = self._routed_experts_loop(x, indices, weights)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out.view(shape)

    def _experts_are_plain_linears(self) -> bool:
        """The batched path multiplies the stacked expert weights directly, so it is right only
        while every expert projection is a plain nn.Linear. A PEFT LoRA layer (or any wrapper)
        on an expert must run through its module: the loop calls each expert's forward. Read from
        `_modules` directly: this runs on every forward, and nn.Module attribute lookups over all
        experts cost 14x more (0.54 ms against 0.04 ms per layer at 256 experts, CPU)."""
        return all(type(proj) is nn.Linear for e in self.experts._modules.values() for proj in e._modules.values())

    def _routed_experts_loop(self, x, indices, weights):
        """The plain math: each expert on its tokens, weighted, summed (one host sync per expert)."""
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            token_idx, slot = (indices == e).nonzero(as_tuple=True)
            if token_idx.numel():
                w = weights[token_idx, slot].unsqueeze(-1).to(x.dtype)
                out.index_add_(0, token_idx, expert(x[token_idx]) * w)
        return out

    def _routed_experts_batched(self, x, indices, weights):
        """`_routed_experts_loop` without a host sync: the (token, expert) pairs sorted by expert
        (stable, so each token's contributions add in the loop's order), both projections as
        grouped matmuls over the stacked expert weights."""
        k = indices.shape[1]
        flat = indices.reshape(-1)
        order = flat.argsort(stable=True)
        tokens = order // k
        experts = flat[order]
        ends = torch.bincount(flat, minlength=len(self.experts)).cumsum(0).to(torch.int32)
        gate_up, down = self._stacked_expert_weights()
        h = self._grouped_matmul(x[tokens], gate_up, experts, ends)
        gate, up = h.chunk(2, dim=-1)
        y = self._grouped_matmul(F.silu(gate) * up, down, experts, ends)
        w = weights.reshape(-1)[order].unsqueeze(-1).to(x.dtype)
        return torch.zeros_like(x).index_add_(0, tokens, y * w)

    def _grouped_matmul(self, rows, stacked, experts, ends):
        """rows[i] @ stacked[experts[i]].T for rows sorted by expert (`ends`: cumulative counts)."""
        if hasattr(torch, "_grouped_mm"):
            try:
                return torch._grouped_mm(rows, stacked.transpose(1, 2), offs=ends)
            except (RuntimeError, NotImplementedError):
                pass  # dtype / device / alignment the kernel does not take: fall back
        out = rows.new_empty(rows.shape[0], stacked.shape[1])
        chunk = max(1, self._GATHER_ELEMENTS // (stacked.shape[1] * stacked.shape[2]))
        for start in range(0, rows.shape[0], chunk):
            part = slice(start, start + chunk)
            out[part] = torch.bmm(stacked[experts[part]], rows[part].unsqueeze(-1)).squeeze(-1)
        return out

    def _stacked_expert_weights(self):
        """([E, 2F, H] gate;up, [E, H, F] down), stacked once and kept (outside the state dict, so
        the HF names stay) until an expert weight changes (in place, dtype or device)."""
        params = [p for e in self.experts for p in (e.gate_proj.weight, e.up_proj.weight, e.down_proj.weight)]
        key = tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in params)
        cached = self.__dict__.get("_expert_stack")
        if cached is None or cached[0] != key:
            gate_up = torch.stack([torch.cat([e.gate_proj.weight, e.up_proj.weight]) for e in self.experts])
            down = torch.stack([e.down_proj.weight for e in self.experts])
            self.__dict__["_expert_stack"] = cached = (key, gate_up.detach(), down.detach())
        return cached[1], cached[2]


class LLaDA2MoeAttention(nn.Module):
    def __init__(self, config: LLaDA2MoeConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        qkv_rows = (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        self.query_key_value = nn.Linear(config.hidden_size, qkv_rows, bias=config.use_qkv_bias)
        self.query_layernorm = LLaDA2MoeRMSNorm(self.head_dim, config.rms_norm_eps)
        self.key_layernorm = LLaDA2MoeRMSNorm(self.head_dim, config.rms_norm_eps)
        self.dense = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=config.use_bias)

    def forward(self, hidden, cos, sin, allowed, past_kv=None):
        b, s, _ = hidden.shape
        d = self.head_dim
        q, k, v = self.query_key_value(hidden).split(
            [self.num_heads * d, self.num_kv_heads * d, self.num_kv_heads * d], dim=-1
        )
        q = self.query_layernorm(q.view(b, s, self.num_heads, d)).transpose(1, 2)
        k = self.key_layernorm(k.view(b, s, self.num_kv_heads, d)).transpose(1, 2)
        v = v.view(b, s, self.num_kv_heads, d).transpose(1, 2)
        q, k = apply_partial_rope(q, cos, sin), apply_partial_rope(k, cos, sin)
        if past_kv is not None:
            k = torch.cat((past_kv[0], k), dim=2)
            v = torch.cat((past_kv[1], v), dim=2)
        present = (k, v)
        groups = self.num_heads // self.num_kv_heads
        k_all, v_all = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        scores = (q @ k_all.transpose(-1, -2)).float() / math.sqrt(d)
        if allowed is not None:
            scores = scores.masked_fill(~allowed, float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(v.dtype)
        out = (probs @ v_all).transpose(1, 2).reshape(b, s, self.num_heads * d)
        return self.dense(out), present


class LLaDA2MoeDecoderLayer(nn.Module):
    def __init__(self, config: LLaDA2MoeConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = LLaDA2MoeRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attention = LLaDA2MoeAttention(config)
        self.post_attention_layernorm = LLaDA2MoeRMSNorm(config.hidden_size, config.rms_norm_eps)
        if layer_idx < config.first_k_dense_replace:
            self.mlp = LLaDA2MoeMLP(config, config.intermediate_size)
        else:
            self.mlp = LLaDA2MoeSparseMoeBlock(config)

    def forward(self, hidden, cos, sin, allowed, past_kv=None):
        attn_out, present = self.attention(self.input_layernorm(hidden), cos, sin, allowed, past_kv)
        hidden = hidden + attn_out
        hidden = hidden + self.mlp(self.post_attention_layernorm(hidden))
        return hidden, present


def allowed_mask(attention_mask, batch, q_len, k_len, device):
    """Normalise the accepted mask forms to bool [batch, 1, q, k] (True = may attend) or None."""
    if attention_mask is None:
        return None
    m = attention_mask.to(device)
    if m.dtype != torch.bool:
        m = m > 0
    if m.dim() == 2:  # key padding mask [batch, k]
        m = m[:, None, None, :].expand(batch, 1, q_len, k_len)
    elif m.dim() == 3:
        m = m[:, None]
    if m.shape[-2:] != (q_len, k_len):
        raise ValueError(f"attention_mask ends in {tuple(m.shape[-2:])}, expected ({q_len}, {k_len})")
    return m


class LLaDA2MoePreTrainedModel(PreTrainedModel):
    config_class = LLaDA2MoeConfig
    base_model_prefix = "model"
    _no_split_modules = ["LLaDA2MoeDecoderLayer"]
    _supports_sdpa = False

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, LLaDA2MoeRMSNorm):
            nn.init.ones_(module.weight)
        elif isinstance(module, LLaDA2MoeGate):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            nn.init.zeros_(module.expert_bias)
        elif isinstance(module, LLaDA2MoeRotaryEmbedding):
            module.inv_freq.copy_(LLaDA2MoeRotaryEmbedding(self.config).inv_freq)


class LLaDA2MoeModel(LLaDA2MoePreTrainedModel):
    def __init__(self, config: LLaDA2MoeConfig):
        super().__init__(config)
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LLaDA2MoeDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = LLaDA2MoeRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = LLaDA2MoeRotaryEmbedding(config)
        self.post_init()

    def get_input_embeddings(self):
        return self.word_embeddings

    def set_input_embeddings(self, value):
        self.word_embeddings = value

    def forward(
        self,
        input_ids: torch.LongTensor,
        position_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
        use_cache: bool = False,
    ):
        b, s = input_ids.shape
        past_len = past_key_values[0][0].shape[2] if past_key_values else 0
        if position_ids is None:
            position_ids = torch.arange(past_len, past_len + s, device=input_ids.device).expand(b, s)
        allowed = allowed_mask(attention_mask, b, s, past_len + s, input_ids.device)
        cos, sin = self.rotary_emb(position_ids)
        hidden = self.word_embeddings(input_ids)
        presents = []
        for i, layer in enumerate(self.layers):
            past = past_key_values[i] if past_key_values else None
            hidden, present = layer(hidden, cos, sin, allowed, past)
            presents.append(present)
        return self.norm(hidden), (presents if use_cache else None)


class LLaDA2MoeModelLM(LLaDA2MoePreTrainedModel, GenerationMixin):
    """The LM. GenerationMixin (as in the released remote code) gives the generation_config and the
    hooks that PEFT's PeftModelForCausalLM wraps; `generate` itself is LLaDA2's block decoding."""

    _tied_weights_keys = []

    def __init__(self, config: LLaDA2MoeConfig):
        super().__init__(config)
        self.model = LLaDA2MoeModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.word_embeddings

    def get_output_embeddings(self):
        return self.lm_head

    def moe_blocks(self):
        """The MoE blocks in layer order, as (layer index, block)."""
        return [
            (i, layer.mlp)
            for i, layer in enumerate(self.model.layers)
            if isinstance(layer.mlp, LLaDA2MoeSparseMoeBlock)
        ]

    def forward(
        self,
        input_ids: torch.LongTensor,
        position_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
        use_cache: bool = False,
        **unused,
    ):
        hidden, presents = self.model(input_ids, position_ids, attention_mask, past_key_values, use_cache)
        logits = self.lm_head(hidden)
        return LLaDA2MoeOutput(logits=logits, past_key_values=presents)

    @torch.no_grad()
    def generate(
        self,
        inputs: torch.Tensor | None = None,
        temperature: float = 0.0,
        block_length: int = 32,
        steps: int = 32,
        gen_length: int = 2048,
        top_p: float | None = None,
        top_k: int | None = None,
        eos_early_stop: bool = False,
        minimal_topk: int = 1,
        threshold: float = 0.95,
        eos_id: int | None = None,
        mask_id: int | None = None,
        editing_threshold: float | None = None,
        max_post_steps: int | None = None,
        num_to_transfer: int | None = None,
        attention_mask: torch.Tensor | None = None,
        seed: int = 0,
        use_cache: bool = True,
        **unused,
    ) -> torch.LongTensor:
        """LLaDA2's block-wise diffusion decoding, with the model card's arguments (LLaDA2.1's
        editing_threshold, max_post_steps and num_to_transfer too): the generated ids after each
        prompt, up to and including the first EOS, as a [batch, longest] tensor padded with EOS.

        The rule is megadiff's sampler, so the tokens are tools/generate.py's for the same settings
        (temperature 0 is argmax; see sampler.py for its fixes of the card's code). eos_id / mask_id
        default to config.json's eos_token_id / mask_token_id, else the card's 156892 / 156895; the
        editing arguments default to generation_config.json's (editing is off unless it sets
        editing_threshold). Rows of `inputs` may be left- or right-padded: `attention_mask` (0 at
        padding, as a tokenizer returns it) removes the padding. `seed` seeds sampling (temperature > 0)."""
        decoding_options, block_generate = _block_sampler()
        if inputs is None:
            raise ValueError("generate() needs `inputs`: the prompt token ids, [batch, length]")
        if isinstance(inputs, torch.Tensor):
            rows = inputs.reshape(-1, inputs.shape[-1]).tolist()
        else:  # a list of ids, or a list of such lists (rows may differ in length)
            rows = [list(r) for r in inputs] if inputs and isinstance(inputs[0], (list, tuple)) else [list(inputs)]
        if attention_mask is not None:
            keep = torch.as_tensor(attention_mask).reshape(len(rows), -1).bool().tolist()
            rows = [[t for t, k in zip(row, mask, strict=True) if k] for row, mask in zip(rows, keep, strict=True)]
        eos_id = _first_set(eos_id, getattr(self.config, "eos_token_id", None), 156892)
        eos_id = eos_id[0] if isinstance(eos_id, (list, tuple)) else eos_id
        mask_id = _first_set(mask_id, getattr(self.config, "mask_token_id", None), 156895)
        editing = {"editing_threshold": editing_threshold, "max_post_steps": max_post_steps}
        editing["num_to_transfer"] = num_to_transfer
        saved = getattr(self, "generation_config", None)
        for name, value in editing.items():
            if value is None and getattr(saved, name, None) is not None:
                editing[name] = getattr(saved, name)
        editing = {name: value for name, value in editing.items() if value is not None}
        options = decoding_options(
            gen_length=gen_length,
            block_length=block_length,
            steps=steps,
            threshold=threshold,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            minimal_topk=minimal_topk,
            eos_early_stop=eos_early_stop,
            use_cache=use_cache,
            seed=seed,
            **editing,
        )
        result = block_generate(self, rows, options, int(mask_id), int(eos_id))
        longest = max(len(tokens) for tokens in result.tokens)
        out = torch.full((len(rows), longest), int(eos_id), dtype=torch.long, device=self.device)
        for row, tokens in enumerate(result.tokens):
            out[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long, device=self.device)
        return out


def _first_set(*values):
    return next(v for v in values if v is not None)


def _block_sampler():
    """(DecodingOptions, generate) of megadiff's block sampler: `sampler.py` beside this file (a
    model dir megadiff wrote), or, where this file is part of megadiff itself, megadiff.inference's
    (imported by name: remote code must not import megadiff, which the model's users may not have)."""
    try:
        # editing.py is sampler.py's import; naming it here too makes transformers 4.x copy it
        # (it copies the modeling file's own relative imports, not theirs)
        from .editing import EditRule  # noqa: F401
        from .sampler import DecodingOptions, generate
    except ImportError:
        module = importlib.import_module("megadiff.inference.sampler")
        DecodingOptions, generate = module.DecodingOptions, module.generate
    return DecodingOptions, generate
