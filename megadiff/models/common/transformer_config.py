"""The megatron-core TransformerConfig fields every megadiff family sets the same way.

A family's `transformer_config` adds its own fields (QK-norm, MoE routing) to these: RMSNorm,
silu-gated MLPs without biases, no dropout, RoPE driven by position ids, the parallel layout,
dtypes and the fused kernels this process can use.
"""

import torch

from megadiff.platform.kernels import fused_kernel_flags
from megadiff.platform.parallel_layout import ParallelLayout

from .hf_config import check_layout


def gpt_transformer_config(
    cfg,
    layout: ParallelLayout,
    params_dtype: torch.dtype = torch.float32,
    use_te: bool = False,
    on_cpu: bool = True,
    family_fields: dict | None = None,
    **overrides,
):
    """TransformerConfig for family config `cfg` at `layout`: the shared fields below, then the
    family's `family_fields`, then `overrides`. `on_cpu`: a CPU run (CPU initialisation, no fused
    kernels); False for a CUDA run."""
    from megatron.core.transformer import TransformerConfig  # megatron-core only when a model is built

    check_layout(cfg, layout)
    bf16 = params_dtype == torch.bfloat16
    kwargs = dict(
        num_layers=cfg.num_hidden_layers,
        hidden_size=cfg.hidden_size,
        ffn_hidden_size=cfg.ffn_hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_key_value_heads,
        kv_channels=cfg.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=cfg.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        # RoPE from explicit position ids: megatron-core's multimodal RoPE with every rotary
        # frequency in the first section is plain rotate-half RoPE driven by position_ids
        # (megadiff.models.common.gpt builds GPTModel with position_embedding_type="mrope").
        mrope_section=[cfg.rotary_dim // 2, 0, 0],
        rotary_interleaved=False,
        apply_rope_fusion=False,
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.vpp,
        # pp = 2 with VPP: the previous and the next stage are the same rank, and batched p2p ops
        # match its activation and gradient messages in issue order, swapping them in 1F1B steady
        # state (more micro-batches than pp); the unbatched ops keep the two directions apart.
        batch_p2p_comm=not (layout.vpp and layout.pp == 2),
        context_parallel_size=layout.cp,  # the sequence split over cp ranks (flex attention only)
        expert_model_parallel_size=layout.ep,
        expert_tensor_parallel_size=layout.etp,
        sequence_parallel=layout.tp > 1,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=bf16,
        autocast_dtype=params_dtype if bf16 else None,
        init_method_std=0.02,
        # Checkpoint keys per layer (decoder.layers.N.*), as the mapping tables name them, for
        # every family: megatron-core otherwise stacks the layers of an all-dense model into one
        # tensor per weight (a dense LLaDA), which the converters and LLaDA2's checkpoints do not.
        hetereogenous_dist_checkpoint=True,
        use_cpu_initialization=on_cpu,
        **fused_kernel_flags(on_cuda=not on_cpu),
    )
    kwargs.update(family_fields or {})
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)
