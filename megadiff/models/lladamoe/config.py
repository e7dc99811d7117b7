"""LLaDA-MoE HF config.json -> validated config -> megatron-core TransformerConfig.

What the public remote code (modeling_lladamoe.py) computes decides what a field means:

- Routing (LLaDAMoESparseMoeBlock.forward): p = softmax(router logits) in fp32; with
  `moe_router_enable_expert_bias`, p = p + expert_bias; the top-k of p choose the experts AND are
  their weights (the bias enters the weights); the weights are never renormalised and never scaled.
  So `norm_topk_prob: true`, a `moe_router_score_function` other than softmax, a
  `routed_scaling_factor` other than 1 and router groups are refused: the code ignores them, and a
  config that names them asks for a model the code does not compute.
- `moe_layer_freq[i]`: 0 = dense layer i (dense_intermediate_size), 1 = MoE layer.
- A shared expert (shared_expert_intermediate_size) adds its output, unweighted, in MoE layers.
- QK-norm (`qk_layernorm`): RMSNorm over each head's dims, before RoPE; RoPE on the first
  head_dim * partial_rotary_factor dims, rotate-half; head_dim = hidden_size / num_attention_heads.

Released LLaDA-MoE checkpoints say model_type "llada"; their architectures entry says
LLaDAMoEModelLM, which megadiff.models.registry uses to pick this family for them.
"""

from dataclasses import dataclass

import torch

from megadiff.models.common.hf_config import HFFields, check_layout
from megadiff.models.common.transformer_config import gpt_transformer_config

MODEL_TYPES = ("lladamoe",)
ARCHITECTURES = ("LLaDAMoEModelLM",)
CODE = "the public LLaDA-MoE code"


@dataclass(frozen=True)
class LLaDAMoEModelConfig:
    vocab_size: int
    hidden_size: int
    ffn_hidden_size: int  # dense layers: dense_intermediate_size
    moe_ffn_hidden_size: int  # expert_intermediate_size
    shared_expert_intermediate_size: int  # 0: no shared expert
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    num_experts: int
    num_experts_per_tok: int
    moe_layer_pattern: tuple[int, ...]  # moe_layer_freq
    expert_bias: bool  # moe_router_enable_expert_bias: softmax + bias selects and weights
    qk_layernorm: bool
    partial_rotary_factor: float
    rope_theta: float
    rms_norm_eps: float
    max_position_embeddings: int
    eos_token_id: int | None
    pad_token_id: int | None
    source: str = "config.json"

    HF_FIELD_NAMES = {
        "ffn_hidden_size": "dense_intermediate_size",
        "moe_ffn_hidden_size": "expert_intermediate_size",
    }

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @classmethod
    def from_hf_dict(cls, cfg: dict, source: str = "config.json") -> "LLaDAMoEModelConfig":
        f = HFFields(cfg, source)
        model_type = cfg.get("model_type")
        released_as_llada = model_type == "llada" and any(a in ARCHITECTURES for a in cfg.get("architectures") or [])
        if not released_as_llada:
            f.require_value("model_type", MODEL_TYPES, "not a LLaDA-MoE config")
        f.require_value("hidden_act", ("silu",), f"{CODE}'s experts are SwiGLU", "silu")
        f.require_value("attention_bias", (False,), "no biases", False)
        f.require_value("clip_qkv", (None,), "q/k/v clipping is not supported", None)
        f.require_value("rope_scaling", (None,), "RoPE scaling is not supported", None)
        f.require_value("tie_word_embeddings", (False,), "an untied lm_head", False)
        f.require_value("norm_topk_prob", (False,), f"{CODE} never renormalises the top-k weights", False)
        f.require_value("moe_router_score_function", ("softmax",), f"{CODE} always routes by softmax", "softmax")
        if f.get("routed_scaling_factor", float, 1.0) != 1.0:
            f.fail("routed_scaling_factor", f"{cfg['routed_scaling_factor']} is not supported ({CODE} never scales)")
        for field in ("router_num_group", "router_topk_group"):
            if f.get(field, int, 1) > 1:
                f.fail(field, f"{cfg[field]} is not supported ({CODE} has no group-limited routing); use null")
        if f.get("attention_dropout", float, 0.0) != 0.0:
            f.fail("attention_dropout", "megadiff trains without dropout; set it to 0.0")

        hidden, heads = f.positive("hidden_size"), f.positive("num_attention_heads")
        if hidden % heads:
            f.fail("num_attention_heads", f"{heads} does not divide hidden_size={hidden}")
        if f.get("head_dim", int, hidden // heads) != hidden // heads:
            f.fail("head_dim", f"{cfg['head_dim']}: {CODE} uses hidden_size / num_attention_heads = {hidden // heads}")
        kv_heads = f.positive("num_key_value_heads", int, heads)
        if heads % kv_heads:
            f.fail("num_key_value_heads", f"{kv_heads} does not divide num_attention_heads={heads}")
        layers = f.positive("num_hidden_layers")
        pattern = cfg.get("moe_layer_freq")
        if not isinstance(pattern, list) or len(pattern) != layers or any(v not in (0, 1) for v in pattern):
            f.fail("moe_layer_freq", f"must list 0 (dense) or 1 (MoE) for each of the {layers} layers, got {pattern}")
        experts, topk = f.positive("num_experts"), f.positive("num_experts_per_tok")
        if topk > experts:
            f.fail("num_experts_per_tok", f"{topk} > num_experts={experts}")
        dense = f.positive("dense_intermediate_size") if 0 in pattern else 0  # read only with dense layers
        shared = cfg.get("shared_expert_intermediate_size")
        if shared is not None:
            shared = f.positive("shared_expert_intermediate_size")
        rotary = f.get("partial_rotary_factor", float, 1.0)
        if not 0 < rotary <= 1 or int(hidden // heads * rotary) % 2:
            f.fail("partial_rotary_factor", f"{rotary} gives an empty or odd rotary dim of head_dim={hidden // heads}")
        theta = f.positive("rope_theta", float)
        if theta != int(theta):
            f.fail("rope_theta", f"{theta} is not a whole number (megatron-core's rotary_base is an integer)")
        return cls(
            vocab_size=f.positive("vocab_size"),
            hidden_size=hidden,
            ffn_hidden_size=dense or f.positive("expert_intermediate_size"),
            moe_ffn_hidden_size=f.positive("expert_intermediate_size"),
            shared_expert_intermediate_size=shared or 0,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            num_experts=experts,
            num_experts_per_tok=topk,
            moe_layer_pattern=tuple(pattern),
            expert_bias=bool(f.get("moe_router_enable_expert_bias", bool, False)),
            qk_layernorm=bool(f.get("qk_layernorm", bool, False)),
            partial_rotary_factor=rotary,
            rope_theta=theta,
            rms_norm_eps=f.positive("rms_norm_eps", float, 1e-5),
            max_position_embeddings=f.positive("max_position_embeddings", int, 4096),
            eos_token_id=f.token_id("eos_token_id"),
            pad_token_id=f.token_id("pad_token_id"),
            source=source,
        )

    def validate_layout(self, layout) -> None:
        check_layout(self, layout)


def to_transformer_config(
    cfg: LLaDAMoEModelConfig,
    layout,
    params_dtype: torch.dtype = torch.float32,
    use_te: bool = False,
    on_cpu: bool = True,
    **overrides,
):
    """megatron-core TransformerConfig: the shared GPT fields plus QK-norm and softmax top-k routing
    (pre-softmax, no renormalisation, no scaling). The expert bias is not megatron-core's (which
    selects by sigmoid + bias and weights without it): the family's router (router.py) holds it."""
    moe = dict(
        qk_layernorm=cfg.qk_layernorm,
        num_moe_experts=cfg.num_experts,
        moe_layer_freq=list(cfg.moe_layer_pattern),
        moe_ffn_hidden_size=cfg.moe_ffn_hidden_size,
        moe_shared_expert_intermediate_size=cfg.shared_expert_intermediate_size or None,
        moe_router_topk=cfg.num_experts_per_tok,
        moe_router_score_function="softmax",
        moe_router_pre_softmax=True,
        moe_router_enable_expert_bias=False,
        moe_router_dtype="fp32",
        moe_router_load_balancing_type="none",
        moe_aux_loss_coeff=0.0,
        moe_token_dispatcher_type="alltoall",
        moe_grouped_gemm=use_te,
    )
    return gpt_transformer_config(cfg, layout, params_dtype, use_te, on_cpu, family_fields=moe, **overrides)
