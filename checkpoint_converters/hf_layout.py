"""What an HF LLaDA2 directory holds besides weights' values: tensor names and shapes (from
config.json alone) and megadiff's remote-code files with their `auto_map`.

Kept free of the reference model (and so of transformers' imports: benchmarks/RESULTS.md) so that tools which
only move bytes start fast.
"""

import importlib.util

REMOTE_CODE_FILES = ("configuration_llada2_moe.py", "modeling_llada2_moe.py")
AUTO_MAP = {
    "AutoConfig": "configuration_llada2_moe.LLaDA2MoeConfig",
    "AutoModel": "modeling_llada2_moe.LLaDA2MoeModelLM",
    "AutoModelForCausalLM": "modeling_llada2_moe.LLaDA2MoeModelLM",
}


def remote_code_dir() -> str:
    """megadiff/hf, where the remote-code files live, found without importing that package."""
    return importlib.util.find_spec("megadiff.hf").submodule_search_locations[0]


def expected_hf_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor name of a split-expert LLaDA2 checkpoint with its shape, from config fields."""
    h, d = cfg["hidden_size"], cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    nq, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    fm, e = cfg["moe_intermediate_size"], cfg["num_experts"]
    shapes = {
        "model.word_embeddings.weight": (cfg["vocab_size"], h),
        "model.norm.weight": (h,),
        "lm_head.weight": (cfg["vocab_size"], h),
    }
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update(
            {
                p + "input_layernorm.weight": (h,),
                p + "attention.query_key_value.weight": ((nq + 2 * nkv) * d, h),
                p + "attention.query_layernorm.weight": (d,),
                p + "attention.key_layernorm.weight": (d,),
                p + "attention.dense.weight": (h, nq * d),
                p + "post_attention_layernorm.weight": (h,),
            }
        )
        if i < cfg.get("first_k_dense_replace", 0):
            f = cfg["intermediate_size"]
            shapes.update(
                {
                    p + "mlp.gate_proj.weight": (f, h),
                    p + "mlp.up_proj.weight": (f, h),
                    p + "mlp.down_proj.weight": (h, f),
                }
            )
            continue
        shapes.update({p + "mlp.gate.weight": (e, h), p + "mlp.gate.expert_bias": (e,)})
        for j in range(e):
            q = f"{p}mlp.experts.{j}."
            shapes.update(
                {q + "gate_proj.weight": (fm, h), q + "up_proj.weight": (fm, h), q + "down_proj.weight": (h, fm)}
            )
        fs = fm * cfg.get("num_shared_experts", 0)
        if fs:
            q = p + "mlp.shared_experts."
            shapes.update(
                {q + "gate_proj.weight": (fs, h), q + "up_proj.weight": (fs, h), q + "down_proj.weight": (h, fs)}
            )
    return shapes
