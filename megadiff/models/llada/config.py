"""LLaDA HF config.json (OLMo-style fields) -> validated config -> megatron-core TransformerConfig.

The public remote code (configuration_llada.py / modeling_llada.py) builds many variants from one
OLMo config; LLaDA 8B and LLaDA 1.5 are one of them: `block_type: llama` (separate q/k/v, SwiGLU as
silu(ff_proj) * up_proj), `layer_norm_type: rms`, RoPE on the whole head, no biases, untied output
layer. Every other variant is refused here, naming the field, before anything is built. A field
absent from config.json takes the remote code's default (ModelConfig), as transformers would load it.
"""

from dataclasses import dataclass

import torch

from megadiff.models.common.hf_config import HFFields, check_layout
from megadiff.models.common.transformer_config import gpt_transformer_config

MODEL_TYPES = ("llada",)
WHY = "megadiff's LLaDA family is the released LLaDA 8B / 1.5 architecture"


@dataclass(frozen=True)
class LLaDAModelConfig:
    vocab_size: int  # rows of wte and ff_out: config embedding_size, else vocab_size
    tokenizer_vocab_size: int  # config vocab_size
    hidden_size: int  # d_model
    ffn_hidden_size: int  # mlp_hidden_size, else mlp_ratio * d_model
    num_hidden_layers: int  # n_layers
    num_attention_heads: int  # n_heads
    num_key_value_heads: int  # n_kv_heads (multi_query_attention: 1; absent: n_heads)
    rope_theta: float
    rms_norm_eps: float
    max_position_embeddings: int  # max_sequence_length
    eos_token_id: int | None
    pad_token_id: int | None
    mask_token_id: int | None
    source: str = "config.json"

    # config.json spells these fields differently (errors name the file's field)
    HF_FIELD_NAMES = {
        "hidden_size": "d_model",
        "ffn_hidden_size": "mlp_hidden_size",
        "num_hidden_layers": "n_layers",
        "num_attention_heads": "n_heads",
        "num_key_value_heads": "n_kv_heads",
        "vocab_size": "embedding_size",
    }
    num_experts = 0  # dense
    moe_ffn_hidden_size = 0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rotary_dim(self) -> int:
        return self.head_dim  # RoPE on the whole head

    @property
    def moe_layer_pattern(self) -> list[int]:
        return [0] * self.num_hidden_layers

    @classmethod
    def from_hf_dict(cls, cfg: dict, source: str = "config.json") -> "LLaDAModelConfig":
        f = HFFields(cfg, source)
        f.require_value("model_type", MODEL_TYPES, "not a LLaDA config", default=None)
        # The architecture switches (defaults: the remote code's ModelConfig).
        f.require_value("block_type", ("llama",), WHY + ": separate q/k/v and gate/up projections", "sequential")
        f.require_value("layer_norm_type", ("rms",), WHY + ": RMSNorm", "default")
        f.require_value("activation_type", ("silu",), WHY + ": silu(ff_proj(x)) * up_proj(x)", "swiglu")
        f.require_value("rope", (True,), WHY + ": RoPE positions", False)
        f.require_value("alibi", (False,), WHY + ": RoPE, not ALiBi", False)
        f.require_value("weight_tying", (False,), WHY + ": a separate output layer ff_out", True)
        for field in ("include_bias", "include_qkv_bias", "bias_for_layer_norm"):
            f.require_value(field, (False,), WHY + ": no biases", False)
        f.require_value("layer_norm_with_affine", (True,), WHY + ": norms with weights", True)
        f.require_value("attention_layer_norm", (False,), WHY + ": no QK-norm", False)
        f.require_value("scale_logits", (False,), WHY + ": unscaled logits", False)
        f.require_value("input_emb_norm", (False,), WHY + ": unscaled embeddings", False)
        f.require_value("block_group_size", (1,), "grouped blocks rename every weight", 1)
        f.require_value("rope_scaling", (None,), "RoPE scaling is not supported", None)
        # megadiff trains without dropout; an explicit non-zero value would be silently dropped.
        for field in ("attention_dropout", "residual_dropout", "embedding_dropout"):
            if f.get(field, float, 0.0) != 0.0:
                f.fail(field, f"{cfg[field]} is not supported; megadiff trains without dropout, set it to 0.0")

        hidden, heads = f.positive("d_model"), f.positive("n_heads")
        if hidden % heads:
            f.fail("n_heads", f"{heads} does not divide d_model={hidden}")
        kv_heads = f.positive("n_kv_heads", int, None)
        mqa = f.get("multi_query_attention", bool, None)
        if mqa is not None and kv_heads is not None and kv_heads != (1 if mqa else heads):
            f.fail("n_kv_heads", f"{kv_heads} contradicts multi_query_attention={str(mqa).lower()}")
        kv_heads = kv_heads or (1 if mqa else heads)
        if heads % kv_heads:
            f.fail("n_kv_heads", f"{kv_heads} does not divide n_heads={heads}")
        vocab = f.positive("vocab_size")
        embedding = f.positive("embedding_size", int, None) or vocab
        if embedding < vocab:
            f.fail("embedding_size", f"{embedding} is smaller than vocab_size={vocab}")
        ffn = f.positive("mlp_hidden_size", int, None) or f.positive("mlp_ratio", int, 4) * hidden
        theta = f.positive("rope_theta", float, 10000.0)
        if theta != int(theta):
            f.fail("rope_theta", f"{theta} is not a whole number (megatron-core's rotary_base is an integer)")
        config = cls(
            vocab_size=embedding,
            tokenizer_vocab_size=vocab,
            hidden_size=hidden,
            ffn_hidden_size=ffn,
            num_hidden_layers=f.positive("n_layers"),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            rope_theta=theta,
            rms_norm_eps=f.positive("rms_norm_eps", float, 1e-5),
            max_position_embeddings=f.positive("max_sequence_length", int, 1024),
            eos_token_id=f.token_id("eos_token_id"),
            pad_token_id=f.token_id("pad_token_id"),
            mask_token_id=f.token_id("mask_token_id"),
            source=source,
        )
        if (config.head_dim // 2) * 2 != config.head_dim:
            f.fail("n_heads", f"head dim d_model/n_heads={config.head_dim} must be even for RoPE")
        return config

    def validate_layout(self, layout) -> None:
        check_layout(self, layout)

    def to_hf_dict(self) -> dict:
        """The config.json fields of this config (the remote code's spelling)."""
        return dict(
            model_type="llada",
            architectures=["LLaDAModelLM"],
            d_model=self.hidden_size,
            n_heads=self.num_attention_heads,
            n_kv_heads=self.num_key_value_heads,
            n_layers=self.num_hidden_layers,
            mlp_hidden_size=self.ffn_hidden_size,
            vocab_size=self.tokenizer_vocab_size,
            embedding_size=self.vocab_size,
            rope_theta=self.rope_theta,
            rms_norm_eps=self.rms_norm_eps,
            max_sequence_length=self.max_position_embeddings,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
            mask_token_id=self.mask_token_id,
            **RELEASED_SWITCHES,
        )


# The architecture switches of the released LLaDA 8B config.json (everything else is a size).
RELEASED_SWITCHES = dict(
    block_type="llama",
    layer_norm_type="rms",
    activation_type="silu",
    rope=True,
    rope_full_precision=True,
    alibi=False,
    weight_tying=False,
    include_bias=False,
    include_qkv_bias=False,
    bias_for_layer_norm=False,
    layer_norm_with_affine=True,
    attention_layer_norm=False,
    scale_logits=False,
    input_emb_norm=False,
    block_group_size=1,
    attention_dropout=0.0,
    residual_dropout=0.0,
    embedding_dropout=0.0,
)


def to_transformer_config(
    cfg: LLaDAModelConfig,
    layout,
    params_dtype: torch.dtype = torch.float32,
    use_te: bool = False,
    on_cpu: bool = True,
    **overrides,
):
    """megatron-core TransformerConfig: the shared GPT fields, no QK-norm, every layer dense."""
    return gpt_transformer_config(
        cfg, layout, params_dtype, use_te, on_cpu, family_fields=dict(qk_layernorm=False), **overrides
    )
