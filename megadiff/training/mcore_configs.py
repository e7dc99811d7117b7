"""megatron-core's own config objects, built from the training config's sections in this one place.

- `transformer_overrides`: what the `perf` section changes in the model's TransformerConfig (the
  model's own fields come from config.json, through its family's `ModelFamily.transformer_config`).
- `ddp_config`: DistributedDataParallelConfig (grad buffers, overlap, buckets).
- `optimizer_config`: OptimizerConfig (AdamW from `train`, distributed optimizer, CPU offload).

Every field keeps megatron-core's name, so a Megatron-LM user finds the knob they know.
Combinations that cannot work are refused earlier, by `megadiff.training.perf_preflight`.
"""

import torch
from megatron.core.distributed import DistributedDataParallelConfig
from megatron.core.optimizer import OptimizerConfig

from megadiff.training.config import TrainingConfig


def transformer_overrides(cfg: TrainingConfig) -> dict:
    """TransformerConfig fields set by cfg.perf; a field left at None (auto) is not overridden, so
    the model builder's default applies (apex's wgrad fusion where it imports). perf.moe_experts is
    not a TransformerConfig field: the model builder turns it into a spec (and moe_grouped_gemm)."""
    p = cfg.perf
    out = dict(
        moe_token_dispatcher_type=p.moe_token_dispatcher_type,
        moe_permute_fusion=p.moe_permute_fusion,
        moe_router_fusion=p.moe_router_fusion,
        cross_entropy_loss_fusion=p.cross_entropy_loss_fusion,
    )
    if p.moe_token_dispatcher_type == "flex":
        out["moe_flex_dispatcher_backend"] = "deepep"
    if p.fp8 != "off":
        out.update(fp8=p.fp8, fp8_recipe=p.fp8_recipe)
        if p.moe_token_dispatcher_type != "allgather":
            # TE's FP8 GEMMs need every expert's token count padded to a multiple of 16/32.
            out["moe_router_padding_for_quantization"] = True
    if p.gradient_accumulation_fusion is not None:
        out["gradient_accumulation_fusion"] = p.gradient_accumulation_fusion
    if p.recompute_granularity != "none":
        out["recompute_granularity"] = p.recompute_granularity
        if p.recompute_modules is not None:
            out["recompute_modules"] = list(p.recompute_modules)
        if p.recompute_granularity == "full":
            out.update(recompute_method=p.recompute_method, recompute_num_layers=p.recompute_num_layers)
    return out


def ddp_config(cfg: TrainingConfig) -> DistributedDataParallelConfig:
    """fp32 gradient buffers (reduced in fp32); overlap and bucket size from cfg.perf."""
    p = cfg.perf
    extra = {} if p.bucket_size is None else {"bucket_size": p.bucket_size}
    return DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=p.overlap_grad_reduce,
        overlap_param_gather=p.overlap_param_gather,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
        **extra,
    )


def optimizer_config(cfg: TrainingConfig, dtype: torch.dtype) -> OptimizerConfig:
    """AdamW from cfg.train; CPU offload (megatron-core's HybridDeviceOptimizer) from cfg.perf."""
    t = cfg.train
    return OptimizerConfig(
        optimizer="adam",
        lr=t.lr,
        min_lr=t.min_lr,
        weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1,
        adam_beta2=t.adam_beta2,
        adam_eps=t.adam_eps,
        clip_grad=t.clip_grad,
        bf16=dtype == torch.bfloat16,
        params_dtype=dtype,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
        **offload_fields(cfg),
    )


def offload_fields(cfg: TrainingConfig) -> dict:
    """OptimizerConfig fields of perf.optimizer_cpu_offload: all optimizer state on the CPU, through
    megatron-core's precision-aware optimizer (which needs Transformer Engine's FusedAdam)."""
    if not cfg.perf.optimizer_cpu_offload:
        return {}
    return dict(optimizer_cpu_offload=True, optimizer_offload_fraction=1.0, use_precision_aware_optimizer=True)
