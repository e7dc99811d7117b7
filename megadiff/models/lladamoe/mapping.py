"""LLaDA-MoE (OLMoE-style names) HF <-> megatron-core, as mapping objects, top to bottom."""

from megadiff.models.common import mcore_params as P
from megadiff.models.common.mapping import QKV, Copy, GatedMLP, MappingTable

H = "model.layers.{layer}."


def dims(cfg) -> dict[str, int]:
    """Sizes the shapes below name; 0 = absent (no QK-norm, no shared expert, no expert bias)."""
    return {
        "vocab": cfg.vocab_size,
        "hidden": cfg.hidden_size,
        "qk_norm": cfg.head_dim if cfg.qk_layernorm else 0,
        "attention_out": cfg.num_attention_heads * cfg.head_dim,
        "kv_out": cfg.num_key_value_heads * cfg.head_dim,
        "ffn": cfg.ffn_hidden_size,
        "experts": cfg.num_experts,
        "expert_bias": cfg.num_experts if cfg.expert_bias else 0,
        "expert_ffn": cfg.moe_ffn_hidden_size,
        "shared_ffn": cfg.shared_expert_intermediate_size,
    }


TABLE = MappingTable(
    Copy(P.EMBEDDING, "model.embed_tokens.weight", ("vocab", "hidden")),
    Copy(P.INPUT_NORM, H + "input_layernorm.weight", ("hidden",)),
    QKV(
        P.LINEAR_QKV, q=H + "self_attn.q_proj.weight", k=H + "self_attn.k_proj.weight", v=H + "self_attn.v_proj.weight"
    ),
    Copy(P.Q_NORM, H + "self_attn.q_norm.weight", ("qk_norm",)),
    Copy(P.K_NORM, H + "self_attn.k_norm.weight", ("qk_norm",)),
    Copy(P.LINEAR_PROJ, H + "self_attn.o_proj.weight", ("hidden", "attention_out")),
    Copy(P.DENSE_PRE_MLP_NORM, H + "post_attention_layernorm.weight", ("hidden",)),
    Copy(P.MOE_PRE_MLP_NORM, H + "post_attention_layernorm.weight", ("hidden",)),
    GatedMLP(P.DENSE_FC1, gate=H + "mlp.gate_proj.weight", up=H + "mlp.up_proj.weight", rows="ffn"),
    Copy(P.DENSE_FC2, H + "mlp.down_proj.weight", ("hidden", "ffn")),
    Copy(P.ROUTER, H + "mlp.gate.weight", ("experts", "hidden")),
    Copy(P.ROUTER_EXPERT_BIAS, H + "mlp.expert_bias", ("expert_bias",)),
    GatedMLP(
        P.EXPERT_FC1,
        gate=H + "mlp.experts.{expert}.gate_proj.weight",
        up=H + "mlp.experts.{expert}.up_proj.weight",
        rows="expert_ffn",
    ),
    Copy(P.EXPERT_FC2, H + "mlp.experts.{expert}.down_proj.weight", ("hidden", "expert_ffn")),
    # the shared expert sits beside the MoE block in the HF layer, inside MoELayer in megatron-core
    GatedMLP(
        P.SHARED_FC1,
        gate=H + "shared_expert.gate_proj.weight",
        up=H + "shared_expert.up_proj.weight",
        rows="shared_ffn",
    ),
    Copy(P.SHARED_FC2, H + "shared_expert.down_proj.weight", ("hidden", "shared_ffn")),
    Copy(P.FINAL_NORM, "model.norm.weight", ("hidden",)),
    Copy(P.OUTPUT_LAYER, "lm_head.weight", ("vocab", "hidden")),
    dims=dims,
)
