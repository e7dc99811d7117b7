"""LLaDA-MoE model shapes as HF config.json fields.

`lladamoe-7b-a1b`: LLaDA-MoE-7B-A1B as described publicly (arXiv 2509.24389: 16 layers, hidden
2048, 16 heads, 64 experts, 8 active, expert dim 1024, RoPE base 50000; every layer MoE; QK-norm).
The fields the paper does not state (vocabulary and token ids of the Ling tokenizer it shares with
LLaDA2, dense_intermediate_size, eps, no shared expert, no expert bias) are our reading of the
public config: check them against a downloaded config.json, which wins.
`tiny`: the CPU test model with every option on (GQA, QK-norm, partial RoPE, a dense first layer,
shared expert, expert bias), 4 layers so PP=2 with 2 virtual chunks has one layer per chunk.
"""

_COMMON = dict(
    model_type="lladamoe",
    architectures=["LLaDAMoEModelLM"],
    hidden_act="silu",
    attention_bias=False,
    clip_qkv=None,
    rope_scaling=None,
    tie_word_embeddings=False,
    norm_topk_prob=False,
    moe_router_score_function="softmax",
    routed_scaling_factor=1.0,
    attention_dropout=0.0,
    qk_layernorm=True,
)

PRESETS = {
    "lladamoe-7b-a1b": dict(
        _COMMON,
        vocab_size=157184,
        hidden_size=2048,
        dense_intermediate_size=8192,
        expert_intermediate_size=1024,
        shared_expert_intermediate_size=None,
        num_hidden_layers=16,
        num_attention_heads=16,
        num_key_value_heads=16,
        num_experts=64,
        num_experts_per_tok=8,
        moe_layer_freq=[1] * 16,
        moe_router_enable_expert_bias=False,
        partial_rotary_factor=1.0,
        rope_theta=50000.0,
        rms_norm_eps=1e-5,
        max_position_embeddings=8192,
        eos_token_id=156892,
        pad_token_id=156892,
    ),
    "tiny": dict(
        _COMMON,
        vocab_size=512,
        hidden_size=64,
        dense_intermediate_size=128,
        expert_intermediate_size=32,
        shared_expert_intermediate_size=48,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=8,
        num_experts_per_tok=4,
        moe_layer_freq=[0, 1, 1, 1],
        moe_router_enable_expert_bias=True,
        partial_rotary_factor=0.5,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        max_position_embeddings=4096,
        eos_token_id=0,
        pad_token_id=0,
    ),
}
