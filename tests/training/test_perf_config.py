"""The `perf` section: every combination that cannot work is refused before the model is built
(one test each, on a described environment, no GPU needed), and accepted values reach
megatron-core's own config objects (checked on the built TransformerConfig / DDP / optimizer
configs)."""

import dataclasses

import pytest
import torch

from megadiff.models.llada2 import LLaDA2ModelConfig, ParallelLayout, preset
from megadiff.models.llada2.config import to_transformer_config
from megadiff.platform.kernels import Environment
from megadiff.training.config import TrainingConfig, TrainingConfigError, load_config
from megadiff.training.mcore_configs import ddp_config, offload_fields, optimizer_config, transformer_overrides
from megadiff.training.perf_preflight import check_perf

H100 = Environment(
    on_cuda=True,
    gpu_name="NVIDIA H100",
    compute_capability=(9, 0),
    gpu_memory_bytes=80 * 2**30,
    te=True,
    deepep=True,
    apex_wgrad=True,
    grouped_mm_dtypes=("bf16", "fp32"),
)
CPU = Environment(on_cuda=False)


def cfg_with(**perf) -> TrainingConfig:
    cfg = TrainingConfig()
    parallel = perf.pop("parallel", {})
    model = perf.pop("model", {})
    cfg.perf = dataclasses.replace(cfg.perf, **perf)
    cfg.parallel = dataclasses.replace(cfg.parallel, **parallel)
    cfg.model = dataclasses.replace(cfg.model, **model)
    return cfg


REFUSED = {
    "fp8_on_cpu": (dict(fp8="e4m3"), CPU, "perf.fp8=e4m3: FP8 needs a CUDA GPU.*set perf.fp8=off"),
    "fp8_without_te": (dict(fp8="hybrid"), dataclasses.replace(H100, te=False), "Transformer Engine.*install"),
    "fp8_on_a100": (
        dict(fp8="e4m3"),
        dataclasses.replace(H100, gpu_name="NVIDIA A100", compute_capability=(8, 0)),
        r"A100 \(compute capability 8.0\) has no FP8 tensor cores.*perf.fp8=off",
    ),
    "mxfp8_on_hopper": (
        dict(fp8="e4m3", fp8_recipe="mxfp8"),
        H100,
        "perf.fp8_recipe=mxfp8: needs compute capability 10.0",
    ),
    "blockwise_on_ada": (
        dict(fp8="e4m3", fp8_recipe="blockwise"),
        dataclasses.replace(H100, compute_capability=(8, 9)),
        "perf.fp8_recipe=blockwise: needs compute capability 9.0",
    ),
    "flex_dispatcher_without_deepep": (
        dict(moe_token_dispatcher_type="flex"),
        dataclasses.replace(H100, deepep=False),
        "needs DeepEP.*perf.moe_token_dispatcher_type=alltoall",
    ),
    "permute_fusion_without_te": (
        dict(moe_permute_fusion=True),
        CPU,
        "perf.moe_permute_fusion=true: .*Transformer Engine",
    ),
    "router_fusion_without_te": (
        dict(moe_router_fusion=True),
        CPU,
        "perf.moe_router_fusion=true: .*Transformer Engine",
    ),
    "wgrad_fusion_on_cpu": (dict(gradient_accumulation_fusion=True), CPU, "CUDA kernel.*on the CPU"),
    "wgrad_fusion_without_apex": (
        dict(gradient_accumulation_fusion=True),
        dataclasses.replace(H100, apex_wgrad=False),
        "fused_weight_gradient_mlp_cuda.*install apex",
    ),
    "param_gather_without_distributed_optimizer": (
        dict(overlap_param_gather=True, overlap_grad_reduce=True, parallel=dict(use_distributed_optimizer=False)),
        H100,
        "only the distributed optimizer.*parallel.use_distributed_optimizer=true",
    ),
    "param_gather_without_grad_reduce_overlap": (
        dict(overlap_param_gather=True),
        H100,
        "also set perf.overlap_grad_reduce=true",
    ),
    "cpu_offload_on_cpu": (
        dict(optimizer_cpu_offload=True),
        CPU,
        "perf.optimizer_cpu_offload=true: this run computes on the CPU",
    ),
    "cpu_offload_without_distributed_optimizer": (
        dict(optimizer_cpu_offload=True, parallel=dict(use_distributed_optimizer=False)),
        H100,
        "precision-aware distributed optimizer",
    ),
    "fused_cross_entropy": (dict(cross_entropy_loss_fusion=True), H100, "not wired in.*=false"),
    "cpu_offload_without_te": (
        dict(optimizer_cpu_offload=True),
        dataclasses.replace(H100, te=False),
        "Transformer Engine's FusedAdam",
    ),
    "flex_attention_with_full_recompute": (
        dict(
            recompute_granularity="full",
            recompute_method="uniform",
            recompute_num_layers=1,
            model=dict(attention_backend="flex"),
        ),
        H100,
        "model.attention_backend=flex: recomputing core attention.*save_for_backward",
    ),
    "flex_attention_with_core_attn_recompute": (
        dict(recompute_granularity="selective", model=dict(attention_backend="flex")),  # mcore's default: core_attn
        H100,
        "model.attention_backend=flex: recomputing core attention",
    ),
    "full_recompute_without_method": (dict(recompute_granularity="full"), H100, "needs perf.recompute_method"),
    "recompute_layers_with_selective": (
        dict(recompute_granularity="selective", recompute_num_layers=2),
        H100,
        "apply to full recompute only, not selective",
    ),
    "recompute_modules_with_full": (
        dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=1, recompute_modules=["mlp"]),
        H100,
        "perf.recompute_modules: apply to selective recompute only",
    ),
    "block_recompute_beyond_stage": (
        dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=9),
        H100,
        "more than the 4 layers of a pipeline stage",
    ),
}


@pytest.mark.parametrize("name", REFUSED)
def test_refused_combination(name):
    perf, env, message = REFUSED[name]
    cfg = cfg_with(**perf)
    with pytest.raises(TrainingConfigError, match=message):
        check_perf(cfg, env, layers_per_stage=4)


def test_everything_on_at_once_is_accepted_on_an_h100():
    cfg = cfg_with(
        fp8="e4m3",
        fp8_recipe="blockwise",
        moe_experts="te",
        moe_token_dispatcher_type="flex",
        moe_permute_fusion=True,
        moe_router_fusion=True,
        recompute_granularity="selective",
        recompute_modules=["moe_act", "layernorm"],
        optimizer_cpu_offload=True,
        overlap_grad_reduce=True,
        overlap_param_gather=True,
        bucket_size=10_000_000,
        gradient_accumulation_fusion=True,
        model=dict(attention_backend="flex"),
    )
    check_perf(cfg, H100, layers_per_stage=4)  # does not raise
    check_perf(TrainingConfig(), CPU)  # the defaults run on the CPU


def test_perf_fields_are_typed_when_loaded():
    base = ["model.hf_dir=m", "data.train_files=d.jsonl"]
    with pytest.raises(TrainingConfigError, match="perf.fp8='e5m2' is not one of off, e4m3, hybrid"):
        load_config(None, [*base, "perf.fp8=e5m2"])
    with pytest.raises(TrainingConfigError, match="perf.recompute_modules must be"):
        load_config(None, [*base, "perf.recompute_modules=[attention]"])
    cfg = load_config(None, [*base, "perf.recompute_modules=[mlp, moe]", "perf.recompute_granularity=selective"])
    assert cfg.perf.recompute_modules == ["mlp", "moe"]


def tiny_model():
    return LLaDA2ModelConfig.from_hf_dict(preset("tiny"))


def test_accepted_fields_reach_megatron_cores_transformer_config():
    cfg = cfg_with(
        moe_token_dispatcher_type="allgather",
        recompute_granularity="full",
        recompute_method="block",
        recompute_num_layers=1,
        gradient_accumulation_fusion=False,
        cross_entropy_loss_fusion=True,
    )
    tc = to_transformer_config(tiny_model(), ParallelLayout(), **transformer_overrides(cfg))
    assert tc.moe_token_dispatcher_type == "allgather"
    assert tc.recompute_granularity == "full" and tc.recompute_method == "block" and tc.recompute_num_layers == 1
    assert tc.cross_entropy_loss_fusion is True and tc.moe_grouped_gemm is False  # the model builder sets it
    assert tc.gradient_accumulation_fusion is False and tc.fp8 is None

    selective = cfg_with(recompute_granularity="selective", recompute_modules=["mlp", "layernorm"])
    tc = to_transformer_config(tiny_model(), ParallelLayout(), **transformer_overrides(selective))
    assert tc.recompute_granularity == "selective" and tc.recompute_modules == ["mlp", "layernorm"]
    assert tc.recompute_num_layers is None

    defaults = to_transformer_config(tiny_model(), ParallelLayout(), **transformer_overrides(TrainingConfig()))
    assert defaults.recompute_granularity is None and defaults.moe_token_dispatcher_type == "alltoall"
    assert "moe_grouped_gemm" not in transformer_overrides(TrainingConfig())  # build_model's moe_experts decides


def test_fp8_and_moe_fusions_are_passed_under_megatron_cores_names():
    """TransformerConfig refuses FP8 and fused permutation without TE, so on the CPU the overrides
    are checked as the keyword arguments it receives, and their names against its fields."""
    from megatron.core.transformer import TransformerConfig

    cfg = cfg_with(
        fp8="hybrid",
        fp8_recipe="delayed",
        moe_permute_fusion=True,
        moe_router_fusion=True,
        moe_token_dispatcher_type="flex",
    )
    overrides = transformer_overrides(cfg)
    assert overrides["fp8"] == "hybrid" and overrides["fp8_recipe"] == "delayed"
    assert overrides["moe_permute_fusion"] and overrides["moe_router_fusion"]
    assert overrides["moe_token_dispatcher_type"] == "flex" and overrides["moe_flex_dispatcher_backend"] == "deepep"
    assert overrides["moe_router_padding_for_quantization"] is True
    fields = {f.name for f in dataclasses.fields(TransformerConfig)}
    assert set(overrides) <= fields, set(overrides) - fields


def test_accepted_fields_reach_ddp_and_optimizer_configs():
    cfg = cfg_with(overlap_grad_reduce=True, overlap_param_gather=True, bucket_size=12345, optimizer_cpu_offload=True)
    ddp = ddp_config(cfg)
    assert ddp.overlap_grad_reduce and ddp.overlap_param_gather and ddp.bucket_size == 12345
    assert ddp.use_distributed_optimizer and ddp.grad_reduce_in_fp32
    from megatron.core.optimizer import OptimizerConfig

    # OptimizerConfig checks TE's version for the precision-aware optimizer, so on the CPU the
    # offload fields are checked as the keyword arguments it receives, and their names.
    offload = offload_fields(cfg)
    assert offload == dict(
        optimizer_cpu_offload=True, optimizer_offload_fraction=1.0, use_precision_aware_optimizer=True
    )
    assert set(offload) <= {f.name for f in dataclasses.fields(OptimizerConfig)}
    cfg.perf.optimizer_cpu_offload = False
    opt = optimizer_config(cfg, torch.bfloat16)
    assert opt.bf16 and opt.lr == cfg.train.lr and opt.adam_beta2 == cfg.train.adam_beta2
    assert opt.use_distributed_optimizer
    plain = optimizer_config(TrainingConfig(), torch.float32)
    assert not plain.optimizer_cpu_offload and not plain.bf16
    assert ddp_config(TrainingConfig()).bucket_size == type(ddp)().bucket_size  # megatron-core's default
