"""LLaDA model shapes as HF config.json fields.

`llada-8b`: LLaDA-8B-Base / -Instruct and LLaDA 1.5 as released (sizes and token ids of the public
config.json). `tiny`: the CPU test model, every feature on at a size where a forward pass takes
milliseconds (GQA, which the architecture allows and the 8B model does not use; 4 layers so PP=2
with 2 virtual chunks has one layer per chunk).
"""

from .config import RELEASED_SWITCHES

_COMMON = dict(model_type="llada", architectures=["LLaDAModelLM"], **RELEASED_SWITCHES)

PRESETS = {
    "llada-8b": dict(
        _COMMON,
        d_model=4096,
        n_heads=32,
        n_kv_heads=32,
        n_layers=32,
        mlp_hidden_size=12288,
        vocab_size=126464,
        embedding_size=126464,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        max_sequence_length=4096,
        eos_token_id=126081,
        pad_token_id=126081,
        mask_token_id=126336,
    ),
    "tiny": dict(
        _COMMON,
        d_model=64,
        n_heads=4,
        n_kv_heads=2,
        n_layers=4,
        mlp_hidden_size=128,
        vocab_size=512,
        embedding_size=512,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        max_sequence_length=4096,
        eos_token_id=0,
        pad_token_id=0,
        mask_token_id=1,
    ),
}
