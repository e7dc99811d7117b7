"""LLaDA2 (BailingMoeV2 names) HF <-> megatron-core, as mapping objects, top to bottom.

The same table as megadiff.models.llada2.hf_mapping.TABLE (tests/models/test_mapping_objects.py
holds the two equal, tensor by tensor); issue 28 phase 2 moves the converters onto this one.
"""

from megadiff.models.common import mcore_params as P
from megadiff.models.common.mapping import Copy, FusedQKV, GatedMLP, MappingTable

H = "model.layers.{layer}."


def dims(cfg) -> dict[str, int]:
    """The sizes the shapes below name, from a LLaDA2ModelConfig; 0 = the tensor is absent."""
    d, heads, groups = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    return {
        "vocab": cfg.vocab_size,
        "hidden": cfg.hidden_size,
        "head_dim": d,
        "qkv_rows": (heads + 2 * groups) * d,
        "attention_out": heads * d,
        "ffn": cfg.intermediate_size if cfg.first_k_dense_replace else 0,
        "expert_ffn": cfg.moe_intermediate_size,
        "shared_ffn": cfg.moe_intermediate_size * cfg.num_shared_experts,
        "experts": cfg.num_experts,
    }


TABLE = MappingTable(
    Copy(P.EMBEDDING, "model.word_embeddings.weight", ("vocab", "hidden")),
    Copy(P.INPUT_NORM, H + "input_layernorm.weight", ("hidden",)),
    FusedQKV(P.LINEAR_QKV, H + "attention.query_key_value.weight"),
    Copy(P.Q_NORM, H + "attention.query_layernorm.weight", ("head_dim",)),
    Copy(P.K_NORM, H + "attention.key_layernorm.weight", ("head_dim",)),
    Copy(P.LINEAR_PROJ, H + "attention.dense.weight", ("hidden", "attention_out")),
    Copy(P.DENSE_PRE_MLP_NORM, H + "post_attention_layernorm.weight", ("hidden",)),
    Copy(P.MOE_PRE_MLP_NORM, H + "post_attention_layernorm.weight", ("hidden",)),
    GatedMLP(P.DENSE_FC1, gate=H + "mlp.gate_proj.weight", up=H + "mlp.up_proj.weight", rows="ffn"),
    Copy(P.DENSE_FC2, H + "mlp.down_proj.weight", ("hidden", "ffn")),
    Copy(P.ROUTER, H + "mlp.gate.weight", ("experts", "hidden")),
    Copy(P.ROUTER_EXPERT_BIAS, H + "mlp.gate.expert_bias", ("experts",)),
    GatedMLP(
        P.EXPERT_FC1,
        gate=H + "mlp.experts.{expert}.gate_proj.weight",
        up=H + "mlp.experts.{expert}.up_proj.weight",
        rows="expert_ffn",
    ),
    Copy(P.EXPERT_FC2, H + "mlp.experts.{expert}.down_proj.weight", ("hidden", "expert_ffn")),
    GatedMLP(
        P.SHARED_FC1,
        gate=H + "mlp.shared_experts.gate_proj.weight",
        up=H + "mlp.shared_experts.up_proj.weight",
        rows="shared_ffn",
    ),
    Copy(P.SHARED_FC2, H + "mlp.shared_experts.down_proj.weight", ("hidden", "shared_ffn")),
    Copy(P.FINAL_NORM, "model.norm.weight", ("hidden",)),
    Copy(P.OUTPUT_LAYER, "lm_head.weight", ("vocab", "hidden")),
    dims=dims,
)
