"""perf.moe_experts: what `auto` picks on each kind of machine, and every impossible choice refused
before the model is built, naming the key (on described environments: no GPU needed)."""

import dataclasses
import functools

import pytest
import torch
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.transformer.spec_utils import ModuleSpec

from megadiff.models.common.grouped_experts import TorchGroupedMLP, grouped_experts_spec
from megadiff.platform.kernels import Environment, grouped_mm_dtypes
from megadiff.training.config import TrainingConfig, TrainingConfigError, describe_config, load_config
from megadiff.training.perf_preflight import choose_moe_experts

H200_TE = Environment(
    on_cuda=True, gpu_name="NVIDIA H200", compute_capability=(9, 0), te=True, grouped_mm_dtypes=("bf16",)
)
H200_PIP = dataclasses.replace(H200_TE, te=False)  # plain pip install: no Transformer Engine
OLD_GPU = Environment(on_cuda=True, gpu_name="NVIDIA T4", compute_capability=(7, 5))  # no grouped-mm kernel
CPU = Environment(on_cuda=False, grouped_mm_dtypes=("bf16", "fp32"))
MINI = dict(hidden_size=2048, expert_ffn_per_rank=512)
BF16 = torch.bfloat16


def cfg_with(moe_experts="auto", lora_experts=None, **perf) -> TrainingConfig:
    cfg = TrainingConfig()
    cfg.perf = dataclasses.replace(cfg.perf, moe_experts=moe_experts, **perf)
    if lora_experts is not None:
        cfg.lora = dataclasses.replace(cfg.lora, enabled=True, experts=lora_experts)
    return cfg


@pytest.mark.parametrize(
    "env, cfg, dtype, backend, reason",
    [
        (H200_TE, cfg_with(), BF16, "te", "auto: Transformer Engine's grouped GEMM"),
        (H200_PIP, cfg_with(), BF16, "grouped", "auto: no Transformer Engine; torch._grouped_mm runs here"),
        (OLD_GPU, cfg_with(), BF16, "sequential", "auto: no Transformer Engine, and torch._grouped_mm"),
        (CPU, cfg_with(), torch.float32, "grouped", "auto: no Transformer Engine"),
        (H200_PIP, cfg_with(), torch.float32, "sequential", "does not run in float32"),  # bf16-only kernel
        (H200_TE, cfg_with(lora_experts=False), BF16, "grouped", "auto: no Transformer Engine"),  # LoRA: local spec
        (H200_TE, cfg_with(lora_experts=True), BF16, "sequential", "lora.experts=true adapts each routed expert"),
        (H200_TE, cfg_with("sequential"), BF16, "sequential", "perf.moe_experts=sequential"),
        (H200_TE, cfg_with("grouped"), BF16, "grouped", "perf.moe_experts=grouped"),
    ],
)
def test_auto_picks_te_then_grouped_then_sequential(env, cfg, dtype, backend, reason):
    choice = choose_moe_experts(cfg, env, dtype=dtype, **MINI)
    assert choice.backend == backend and reason in choice.reason, choice


@pytest.mark.parametrize(
    "env, cfg, dims, message",
    [
        (H200_PIP, cfg_with("te"), MINI, "perf.moe_experts=te: .*Transformer Engine.*use perf.moe_experts=grouped"),
        (CPU, cfg_with("te"), MINI, "perf.moe_experts=te"),
        (OLD_GPU, cfg_with("grouped"), MINI, "perf.moe_experts=grouped: torch._grouped_mm .*does not run in bfloat16"),
        (
            H200_PIP,
            cfg_with("grouped"),
            dict(hidden_size=2048, expert_ffn_per_rank=100),
            "perf.moe_experts=grouped: .*multiple of 16 bytes.*expert hidden size per expert-TP rank=100",
        ),
        (H200_TE, cfg_with("grouped", fp8="e4m3"), MINI, "perf.fp8=e4m3: FP8 experts are Transformer Engine's"),
        (
            H200_TE,
            cfg_with("grouped", recompute_granularity="selective", recompute_modules=["moe_act"]),
            MINI,
            r"perf.recompute_modules=\[moe_act\]: .*only in Transformer Engine's grouped experts.*grouped",
        ),
    ],
)
def test_impossible_choice_is_refused_naming_the_key(env, cfg, dims, message):
    with pytest.raises(TrainingConfigError, match=message):
        choose_moe_experts(cfg, env, dtype=BF16, **dims)


def test_te_experts_with_moe_act_recompute_are_accepted():
    cfg = cfg_with("auto", recompute_granularity="selective", recompute_modules=["moe_act"])
    assert choose_moe_experts(cfg, H200_TE, dtype=BF16, **MINI).backend == "te"


BASE = ["model.hf_dir=m", "data.train_files=d.jsonl"]


def test_the_replaced_key_names_its_successor_and_lora_on_grouped_experts_names_both_keys():
    with pytest.raises(TrainingConfigError, match="perf.moe_grouped_gemm was replaced by perf.moe_experts"):
        load_config(None, [*BASE, "perf.moe_grouped_gemm=true"])
    with pytest.raises(
        TrainingConfigError, match="perf.moe_experts='fast' is not one of auto, te, grouped, sequential"
    ):
        load_config(None, [*BASE, "perf.moe_experts=fast"])
    with pytest.raises(TrainingConfigError, match="lora.experts=true .*perf.moe_experts=grouped.*sequential"):
        load_config(None, [*BASE, "lora.enabled=true", "lora.experts=true", "perf.moe_experts=grouped"])
    assert load_config(None, [*BASE, "lora.enabled=true", "lora.experts=true"]).perf.moe_experts == "auto"
    assert "perf.moe_experts (one of auto, te, grouped, sequential; default auto)" in describe_config()


def test_tools_resolve_the_same_choice_naming_their_flag():
    from megadiff.errors import ConfigError
    from megadiff.models.common.gpt import routed_experts
    from megadiff.models.llada2 import LLaDA2ModelConfig, ParallelLayout, preset

    tiny = LLaDA2ModelConfig.from_hf_dict(preset("tiny"))
    assert routed_experts(tiny, ParallelLayout(), torch.float32, "auto", key="--moe-experts").backend == "grouped"
    with pytest.raises(ConfigError, match="--moe-experts=te: Transformer Engine's grouped experts need a CUDA run"):
        routed_experts(tiny, ParallelLayout(), torch.float32, "te", key="--moe-experts")


def test_this_machine_runs_grouped_mm_on_the_cpu_in_fp32():
    assert "fp32" in grouped_mm_dtypes(), "torch._grouped_mm no longer runs on the CPU: auto picks sequential here"


LOCAL = MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)


def test_grouped_spec_replaces_sequential_experts_in_either_spec_form_with_local_linears():
    te_like = dataclasses.replace(LOCAL, linear_fc1=object, linear_fc2=object)  # stands in for TE's linears
    as_module_spec = grouped_experts_spec(ModuleSpec(module=SequentialMLP, submodules=te_like))  # megatron-core 0.16
    assert as_module_spec.module is TorchGroupedMLP and as_module_spec.submodules == LOCAL
    as_partial = grouped_experts_spec(functools.partial(SequentialMLP, submodules=te_like))  # megatron-core 0.19
    assert as_partial.func is TorchGroupedMLP and as_partial.keywords["submodules"] == LOCAL
    assert grouped_experts_spec(ModuleSpec(module=torch.nn.Linear)) is None
