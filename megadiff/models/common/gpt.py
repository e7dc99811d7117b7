"""Build any family's model as megatron-core GPTModel chunks for the current rank, and run them.

The family supplies the TransformerConfig, the layer spec and the GPTModel arguments (vocabulary,
RoPE); everything else is the same for every family: RoPE follows explicit position ids (GPTModel's
multimodal-RoPE path with every frequency in the first section), attention masks are megadiff bool
masks (True = may attend) or FlexAttention BlockMasks, and the x_t-only output hook serves block
diffusion.

Issue 28 phase 1: `forward_chunk`, the position / mask helpers and the x_t-only hook still live in
megadiff.models.llada2.model (other work in flight edits them); they move here once it is merged.
"""

from functools import partial

import torch

from megadiff.errors import ConfigError
from megadiff.models.llada2.model import _keep_first_half, forward_chunk, mcore_attention_mask, mcore_position_ids
from megadiff.platform import compat
from megadiff.platform.device import run_device

from .grouped_experts import choose_experts, grouped_problem, with_grouped_experts
from .spec import transformer_engine_usable

__all__ = ["ATTENTION_BACKENDS", "build_gpt_chunks", "forward_chunk", "mcore_attention_mask", "mcore_position_ids"]

ATTENTION_BACKENDS = ("dense", "flex")


def build_gpt_chunks(
    family,
    model_cfg,
    layout,
    params_dtype: torch.dtype = torch.float32,
    use_te: bool | None = None,
    attention_backend: str = "dense",
    xt_only_logits: bool = False,
    moe_experts: str = "auto",
    **config_overrides,
):
    """One GPTModel per virtual-pipeline chunk held by this rank (a list of one without VPP).

    attention_backend: "dense" = the spec's core attention with dense bool masks; "flex" =
    FlexCoreAttention, whose masks are BlockMasks. xt_only_logits: inputs are [x_t ; x_0] and only
    x_t's logits are wanted. moe_experts: routed experts of MoE layers, "te" (TEGroupedMLP), "grouped"
    (TorchGroupedMLP on torch._grouped_mm), "sequential" (SequentialMLP) or "auto"
    (megadiff.models.common.grouped_experts). Process groups must already exist for `layout`."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    if attention_backend not in ATTENTION_BACKENDS:
        raise ConfigError(f"attention_backend={attention_backend!r}; choose one of {ATTENTION_BACKENDS}")
    if use_te is None:
        use_te = transformer_engine_usable()
    compat.define_te_general_gemm_without_te()  # the router reads it, on CPU and CUDA without TE
    compat.silence_gptmodel_deprecation()
    device = run_device()
    on_cpu = device.type == "cpu"
    config_overrides.setdefault("use_cpu_initialization", device == torch.device("cpu"))
    config = family.transformer_config(
        model_cfg, layout, params_dtype, use_te=use_te, on_cpu=on_cpu, **config_overrides
    )
    experts = None
    if config.num_moe_experts:  # the expert shape is the family's TransformerConfig's
        why_not = grouped_problem(params_dtype, config.hidden_size, config.moe_ffn_hidden_size // layout.etp)
        experts = choose_experts(moe_experts, use_te, why_not, key="moe_experts").backend
        config_overrides["moe_grouped_gemm"] = experts == "te"
        config = family.transformer_config(
            model_cfg, layout, params_dtype, use_te=use_te, on_cpu=on_cpu, **config_overrides
        )
    core_attention = None
    if attention_backend == "flex":
        from .attention import FlexCoreAttention, check_flex_supported  # compiles flex at import

        check_flex_supported(config)
        core_attention = FlexCoreAttention
    chunks = []
    for vp in range(layout.vpp or 1):
        vp_stage = vp if layout.vpp else None
        spec = family.layer_spec(model_cfg, config, use_te, vp_stage, core_attention)
        if experts == "grouped":
            spec = with_grouped_experts(spec)
        model = GPTModel(
            config=config,
            transformer_layer_spec=spec,
            max_sequence_length=model_cfg.max_position_embeddings,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
            position_embedding_type="mrope",
            vp_stage=vp_stage,
            **family.gpt_model_args(model_cfg),
        )
        if xt_only_logits and model.post_process:
            tp = parallel_state.get_tensor_model_parallel_world_size()
            model.decoder.final_layernorm.register_forward_pre_hook(
                partial(_keep_first_half, sequence_parallel=config.sequence_parallel, tp=tp)
            )
        if not on_cpu:
            model.cuda(device)
        chunks.append(model)
    return chunks
