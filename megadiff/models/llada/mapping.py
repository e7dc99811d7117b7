"""LLaDA (OLMo-style names) HF <-> megatron-core, as mapping objects, top to bottom."""

from megadiff.models.common import mcore_params as P
from megadiff.models.common.mapping import QKV, Copy, GatedMLP, MappingTable

T = "model.transformer."
B = T + "blocks.{layer}."


def dims(cfg) -> dict[str, int]:
    return {
        "vocab": cfg.vocab_size,
        "hidden": cfg.hidden_size,
        "attention_out": cfg.num_attention_heads * cfg.head_dim,
        "kv_out": cfg.num_key_value_heads * cfg.head_dim,
        "ffn": cfg.ffn_hidden_size,
    }


TABLE = MappingTable(
    Copy(P.EMBEDDING, T + "wte.weight", ("vocab", "hidden")),
    Copy(P.INPUT_NORM, B + "attn_norm.weight", ("hidden",)),
    QKV(P.LINEAR_QKV, q=B + "q_proj.weight", k=B + "k_proj.weight", v=B + "v_proj.weight"),
    Copy(P.LINEAR_PROJ, B + "attn_out.weight", ("hidden", "attention_out")),
    Copy(P.DENSE_PRE_MLP_NORM, B + "ff_norm.weight", ("hidden",)),
    # silu(ff_proj(x)) * up_proj(x): ff_proj is the gate
    GatedMLP(P.DENSE_FC1, gate=B + "ff_proj.weight", up=B + "up_proj.weight", rows="ffn"),
    Copy(P.DENSE_FC2, B + "ff_out.weight", ("hidden", "ffn")),
    Copy(P.FINAL_NORM, T + "ln_f.weight", ("hidden",)),
    Copy(P.OUTPUT_LAYER, T + "ff_out.weight", ("vocab", "hidden")),
    dims=dims,
)
