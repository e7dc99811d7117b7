"""Named LLaDA2 model shapes, as HF config.json fields (mini and flash as released).

`tiny` is the CPU test model: every LLaDA2 feature is on (GQA, QK-norm, partial RoPE, shared
expert, dense first layer, 8 experts in 4 groups, top-4 routing, expert bias) at a size where a
forward pass takes milliseconds. 4 layers so PP=2 with 2 virtual chunks has one layer per chunk.
"""

import copy

_COMMON = dict(
    model_type="llada2_moe",
    architectures=["LLaDA2MoeModelLM"],
    hidden_act="silu",
    use_qkv_bias=False,
    use_bias=False,
    use_qk_norm=True,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    partial_rotary_factor=0.5,
    rope_theta=600000.0,
    rope_scaling=None,
    score_function="sigmoid",
    moe_router_enable_expert_bias=True,
    norm_topk_prob=True,
    first_k_dense_replace=1,
    routed_scaling_factor=2.5,
    num_shared_experts=1,
)

PRESETS = {
    "llada2-mini": dict(
        _COMMON,
        vocab_size=157184,
        hidden_size=2048,
        intermediate_size=5120,
        moe_intermediate_size=512,
        num_hidden_layers=20,
        num_attention_heads=16,
        num_key_value_heads=4,
        head_dim=128,
        num_experts=256,
        num_experts_per_tok=8,
        n_group=8,
        topk_group=4,
        max_position_embeddings=32768,
        pad_token_id=156892,
        eos_token_id=156892,
    ),
    "llada2-flash": dict(
        _COMMON,
        vocab_size=157184,
        hidden_size=4096,
        intermediate_size=9216,
        moe_intermediate_size=1024,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=4,
        head_dim=128,
        num_experts=256,
        num_experts_per_tok=8,
        n_group=8,
        topk_group=4,
        max_position_embeddings=32768,
        pad_token_id=156892,
        eos_token_id=156892,
    ),
    "tiny": dict(
        _COMMON,
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_experts=8,
        num_experts_per_tok=4,
        n_group=4,
        topk_group=2,
        max_position_embeddings=4096,
        rope_theta=10000.0,
        pad_token_id=0,
        eos_token_id=0,
    ),
}


def preset(name: str, **overrides) -> dict:
    """A copy of preset `name`'s HF config fields, with overrides applied."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset '{name}'; choose one of {sorted(PRESETS)}")
    return dict(copy.deepcopy(PRESETS[name]), **overrides)
