"""HF config.json (LLaDA2 / BailingMoeV2) -> validated model config -> megatron-core TransformerConfig.

Every check names the config field and says what to do, and runs before anything is built.
"""

import dataclasses
import json
import math
from dataclasses import dataclass

import torch

from megadiff.errors import ConfigError
from megadiff.platform.kernels import fused_kernel_flags
from megadiff.platform.parallel_layout import ParallelLayout

ACCEPTED_MODEL_TYPES = ("llada2_moe", "bailing_moe_v2", "bailing_moe")
REQUIRED_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "moe_intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "num_experts",
    "num_experts_per_tok",
)


def checked_type(value, kind, fail):
    """`value` if it is a `kind` (int, float, bool or str; an int is a float too), else fail(why).
    JSON numbers keep their spelling: 16.0 is not an integer, "1" is not a number."""
    words = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
    if isinstance(value, bool) != (kind is bool) or not isinstance(value, (int, float) if kind is float else kind):
        fail(f"must be {words[kind]}, got {json.dumps(value)}")
    if kind is float and not math.isfinite(value):
        fail(f"must be a finite number, got {value}")
    return float(value) if kind is float else value


@dataclass(frozen=True)
class LLaDA2ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    num_experts: int
    num_experts_per_tok: int
    num_shared_experts: int = 1
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    first_k_dense_replace: int = 0
    score_function: str = "sigmoid"
    moe_router_enable_expert_bias: bool = True
    norm_topk_prob: bool = True
    use_qk_norm: bool = True
    partial_rotary_factor: float = 1.0
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    pad_token_id: int | None = None
    eos_token_id: int | None = None
    source: str = "config.json"

    @property
    def ffn_hidden_size(self) -> int:  # the family-config name (megadiff.models.family) of dense layers' FFN
        return self.intermediate_size

    @property
    def moe_ffn_hidden_size(self) -> int:  # ... and of one routed expert's FFN
        return self.moe_intermediate_size

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def moe_layer_pattern(self) -> list[int]:
        """0 = dense layer, 1 = MoE layer (megatron-core's moe_layer_freq list)."""
        k = self.first_k_dense_replace
        return [0] * k + [1] * (self.num_hidden_layers - k)

    @classmethod
    def from_hf_dict(cls, cfg: dict, source: str = "config.json") -> "LLaDA2ModelConfig":
        def fail(field, why):
            raise ConfigError(f"{source}: {field}: {why}")

        model_type = cfg.get("model_type")
        if model_type not in ACCEPTED_MODEL_TYPES:
            fail("model_type", f"'{model_type}' is not a LLaDA2 model; expected one of {ACCEPTED_MODEL_TYPES}")
        for field in REQUIRED_FIELDS:
            if cfg.get(field) is None:
                fail(field, "required field is missing")

        def get(field, kind, default=None, null_is_default=False):
            """cfg[field] checked against `kind` (int, float, bool, str); absent -> default. A null
            is the default only where HF's own config class treats it so."""
            value = cfg.get(field, default)
            if value is None and (null_is_default or field not in cfg):
                return default
            return checked_type(value, kind, lambda why: fail(field, why))

        eos = cfg.get("eos_token_id")
        if isinstance(eos, list):
            eos = eos[0] if eos else None
        hidden_size, heads = get("hidden_size", int), get("num_attention_heads", int)
        values = dict(
            vocab_size=get("vocab_size", int),
            hidden_size=hidden_size,
            intermediate_size=get("intermediate_size", int),
            moe_intermediate_size=get("moe_intermediate_size", int),
            num_hidden_layers=get("num_hidden_layers", int),
            num_attention_heads=heads,
            num_key_value_heads=get("num_key_value_heads", int),
            head_dim=get("head_dim", int, null_is_default=True) or hidden_size // max(heads, 1),
            num_experts=get("num_experts", int),
            num_experts_per_tok=get("num_experts_per_tok", int),
            num_shared_experts=get("num_shared_experts", int, 0, null_is_default=True),
            n_group=get("n_group", int, 1, null_is_default=True),
            topk_group=get("topk_group", int, 1, null_is_default=True),
            routed_scaling_factor=get("routed_scaling_factor", float, 1.0, null_is_default=True),
            first_k_dense_replace=get("first_k_dense_replace", int, 0, null_is_default=True),
            score_function=get("score_function", str, "sigmoid"),
            moe_router_enable_expert_bias=get("moe_router_enable_expert_bias", bool, True),
            norm_topk_prob=get("norm_topk_prob", bool, True),
            use_qk_norm=get("use_qk_norm", bool, True),
            partial_rotary_factor=get("partial_rotary_factor", float, 1.0),
            rope_theta=get("rope_theta", float, 10000.0),
            rms_norm_eps=get("rms_norm_eps", float, 1e-6),
            max_position_embeddings=get("max_position_embeddings", int, 4096, null_is_default=True),
            pad_token_id=get("pad_token_id", int, null_is_default=True),
            eos_token_id=checked_type(eos, int, lambda why: fail("eos_token_id", why)) if eos is not None else None,
            source=source,
        )
        config = cls(**values)
        config.validate()
        for field in ("use_bias", "use_qkv_bias", "tie_word_embeddings"):
            if cfg.get(field):
                fail(field, "must be false for LLaDA2 (no biases, untied lm_head)")
        if cfg.get("rope_scaling"):
            fail("rope_scaling", "RoPE scaling is not supported; set it to null")
        return config

    def validate(self) -> None:
        def fail(field, why):
            raise ConfigError(f"{self.source}: {field}: {why}")

        for f in (*REQUIRED_FIELDS, "head_dim", "n_group", "topk_group", "max_position_embeddings"):
            if not isinstance(getattr(self, f), int) or getattr(self, f) <= 0:
                fail(f, f"must be a positive integer, got {getattr(self, f)!r}")
        for f in ("rope_theta", "rms_norm_eps", "routed_scaling_factor"):
            if not getattr(self, f) > 0:
                fail(f, f"must be a positive number, got {getattr(self, f)!r}")
        if self.num_shared_experts < 0:
            fail("num_shared_experts", f"must be >= 0, got {self.num_shared_experts}")
        if self.score_function != "sigmoid":
            fail("score_function", f"unknown score function '{self.score_function}'; LLaDA2 uses 'sigmoid'")
        if self.num_attention_heads % self.num_key_value_heads:
            fail(
                "num_key_value_heads",
                f"{self.num_key_value_heads} does not divide num_attention_heads={self.num_attention_heads}",
            )
        if self.num_experts % self.n_group:
            fail("n_group", f"{self.n_group} does not divide num_experts={self.num_experts}")
        if not 1 <= self.topk_group <= self.n_group:
            fail("topk_group", f"{self.topk_group} must be in 1..n_group={self.n_group}")
        if self.num_experts_per_tok > self.num_experts:
            fail("num_experts_per_tok", f"{self.num_experts_per_tok} > num_experts={self.num_experts}")
        if self.n_group > 1 and self.num_experts_per_tok != 2 * self.topk_group:
            fail(
                "num_experts_per_tok",
                "LLaDA2 scores a group by its top-2 experts and megatron-core by "
                "its top num_experts_per_tok/topk_group, so num_experts_per_tok must be 2*topk_group "
                f"(got {self.num_experts_per_tok} and topk_group={self.topk_group})",
            )
        if not self.norm_topk_prob:
            fail("norm_topk_prob", "megatron-core always normalises sigmoid top-k weights; must be true")
        if not 0 <= self.first_k_dense_replace <= self.num_hidden_layers:
            fail("first_k_dense_replace", f"{self.first_k_dense_replace} outside 0..num_hidden_layers")
        if self.rotary_dim % 2 or not 0 < self.partial_rotary_factor <= 1:
            fail("partial_rotary_factor", f"{self.partial_rotary_factor} gives an odd/empty rotary dim")

    def validate_layout(self, layout: ParallelLayout) -> None:
        """Raise naming the field a layout does not divide (before any process group is built)."""

        def fail(msg):
            raise ConfigError(f"{self.source}: {msg}")

        def options(n, limit=None):
            return ", ".join(str(d) for d in range(1, (limit or n) + 1) if n % d == 0)

        if self.num_key_value_heads % layout.tp:
            fail(
                f"num_key_value_heads={self.num_key_value_heads} is not divisible by --tp {layout.tp}; "
                f"use --tp {options(self.num_key_value_heads)}"
            )
        if self.num_attention_heads % layout.tp:
            fail(f"num_attention_heads={self.num_attention_heads} is not divisible by --tp {layout.tp}")
        if self.vocab_size % layout.tp:
            fail(f"vocab_size={self.vocab_size} is not divisible by --tp {layout.tp}")
        if self.num_experts % layout.ep:
            fail(
                f"num_experts={self.num_experts} is not divisible by --ep {layout.ep}; "
                f"use --ep {options(self.num_experts, 64)}"
            )
        if self.moe_intermediate_size % layout.etp:
            fail(f"moe_intermediate_size={self.moe_intermediate_size} is not divisible by --etp {layout.etp}")
        stages = layout.pp * (layout.vpp or 1)
        if self.num_hidden_layers % stages:
            fail(f"num_hidden_layers={self.num_hidden_layers} is not divisible by pp*vpp={stages}")
        if layout.vpp and layout.pp < 2:
            fail("virtual pipeline parallelism (--vpp) needs --pp >= 2")

    def to_hf_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("source")
        return d


def to_transformer_config(
    model: LLaDA2ModelConfig,
    layout: ParallelLayout,
    params_dtype: torch.dtype = torch.float32,
    use_te: bool = False,
    on_cpu: bool = True,
    **overrides,
):
    """megatron-core TransformerConfig for LLaDA2 at `layout`, mapped field by field below. `on_cpu`: a
    CPU run (CPU initialisation, no fused kernels); False for a CUDA run."""
    # megatron-core only when a model is built: converters and the sampler read configs
    from megatron.core.transformer import TransformerConfig

    model.validate_layout(layout)
    bf16 = params_dtype == torch.bfloat16
    kwargs = dict(
        num_layers=model.num_hidden_layers,
        hidden_size=model.hidden_size,
        ffn_hidden_size=model.intermediate_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_key_value_heads,
        kv_channels=model.head_dim,
        qk_layernorm=model.use_qk_norm,
        normalization="RMSNorm",
        layernorm_epsilon=model.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        # RoPE from explicit position ids: megatron-core's multimodal RoPE with all rotary
        # frequencies in the first section is plain RoPE driven by position_ids (see model.py).
        mrope_section=[model.rotary_dim // 2, 0, 0],
        rotary_interleaved=False,
        apply_rope_fusion=False,
        # MoE
        num_moe_experts=model.num_experts,
        moe_layer_freq=model.moe_layer_pattern,
        moe_ffn_hidden_size=model.moe_intermediate_size,
        moe_shared_expert_intermediate_size=(model.moe_intermediate_size * model.num_shared_experts or None),
        moe_router_topk=model.num_experts_per_tok,
        moe_router_score_function=model.score_function,
        moe_router_enable_expert_bias=model.moe_router_enable_expert_bias,
        moe_router_bias_update_rate=0.0,  # LLaDA2 fine-tuning keeps the expert bias fixed
        moe_router_num_groups=model.n_group if model.n_group > 1 else None,
        moe_router_group_topk=model.topk_group if model.n_group > 1 else None,
        moe_router_topk_scaling_factor=model.routed_scaling_factor,
        moe_router_dtype="fp32",
        moe_router_load_balancing_type="none",
        moe_aux_loss_coeff=0.0,
        moe_token_dispatcher_type="alltoall",
        moe_grouped_gemm=use_te,
        # parallelism
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.vpp,
        # pp = 2 with VPP: the previous and the next stage are the same rank, and batched p2p ops
        # match its activation and gradient messages in issue order, swapping them in 1F1B steady
        # state (more micro-batches than pp); the unbatched ops keep the two directions apart.
        batch_p2p_comm=not (layout.vpp and layout.pp == 2),
        expert_model_parallel_size=layout.ep,
        expert_tensor_parallel_size=layout.etp,
        context_parallel_size=layout.cp,  # the sequence split over cp ranks (flex attention only)
        sequence_parallel=layout.tp > 1,
        # numerics
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=bf16,
        autocast_dtype=params_dtype if bf16 else None,
        init_method_std=0.02,
        use_cpu_initialization=on_cpu,
        # fused kernels: what this process can import, on CUDA only (megadiff.platform.kernels)
        **fused_kernel_flags(on_cuda=not on_cpu),
    )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)
