"""Checks that only mean something on a CUDA machine (marked `gpu`; skipped where CUDA is absent).

megatron-core runs in torchrun workers that keep CUDA (`run_torchrun(..., gpu=True)`: NCCL,
cuda:LOCAL_RANK), as the CPU layout tests run theirs on gloo. Tolerances, per dtype:
- logits vs the fp32 reference on the CPU: fp32 max |Δ| <= 1e-4 (the CPU parity tolerance);
  bf16 max |Δ| <= 5% of max |reference logit| (the reference itself in bf16 on the CPU is ~1.2% off
  for the tiny model: bf16 keeps 8 mantissa bits through every layer);
- one fp32 trainer step on CUDA + NCCL: loss and every gradient within rel. 1e-4 of the CPU
  reference (CPU: 1e-5; GPU kernels sum in another order);
- compiled flex attention vs dense attention on CUDA, fp32: outputs max |Δ| <= 1e-4, gradients
  max |Δ| <= 1e-4 x max |gradient|;
- generate at temperature 0: the same tokens on CUDA as on the CPU (fp32).
"""

import importlib.util
import json

import pytest
import torch

from tests.dist.launch import run_torchrun

WORKER = "tests/gpu/workers/cuda_checks.py"
TRAIN_WORKER = "tests/dist/workers/train_check.py"
FP32_LOGIT_TOL, BF16_LOGIT_REL_TOL = 1e-4, 0.05
STEP_REL_TOL = 1e-4
FLEX_TOL = 1e-4


def cuda_check(tmp_path, check):
    out = tmp_path / f"{check}.json"
    run_torchrun(1, WORKER, ["--check", check, "--out", out], gpu=True)
    return json.loads(out.read_text())


def step_parity_on_gpus(tiny_run_dir, nproc, layouts):
    out = tiny_run_dir / f"gpu_step_{nproc}.json"
    run_torchrun(
        nproc,
        TRAIN_WORKER,
        [
            "--config",
            tiny_run_dir / "cfg.yaml",
            "--hf-dir",
            tiny_run_dir / "hf",
            "--check",
            "step_parity",
            "--layouts",
            layouts,
            "--out",
            out,
            "model.dtype=fp32",
        ],
        gpu=True,
    )
    results = json.loads(out.read_text())
    assert len(results) == len(layouts.split(";"))
    for layout, modes in results.items():
        assert set(modes) == {"block_diffusion", "full"}
        for mode, r in modes.items():
            assert r["loss_rel"] <= STEP_REL_TOL and r["grad_rel"] <= STEP_REL_TOL, (layout, mode, r)


@pytest.mark.gpu
def test_cpu_support_refuses_to_patch_when_cuda_is_present():
    from megadiff.platform.cpu import enable_cpu_support

    with pytest.raises(RuntimeError, match="must not be used when CUDA is the run device"):
        enable_cpu_support()


@pytest.mark.gpu
def test_transformer_engine_spec_is_chosen_whenever_megatron_core_can_use_te():
    from megadiff.models.llada2.spec import transformer_engine_usable
    from megadiff.platform.kernels import megatron_has_te

    if not megatron_has_te():
        pytest.skip("megatron-core cannot use Transformer Engine here (not installed, or its HAVE_TE flags are False)")
    assert transformer_engine_usable()


@pytest.mark.gpu
@pytest.mark.skipif(
    importlib.util.find_spec("transformer_engine") is None,
    reason="Transformer Engine is not installed (pip install -e .[gpu])",
)
def test_parameter_table_te_keys_are_a_te_models_sharded_state_dict_keys():
    """The TE checkpoint keys the converters write (parameter table, spec "te") are exactly the
    tensor keys a real TE-spec model saves, at layout (1,1,1); TE's extra objects are `_extra_state`."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, ShardedTensorFactory

    from megadiff.models.llada2.checkpoint_keys import units_for
    from megadiff.models.llada2.config import LLaDA2ModelConfig, ParallelLayout
    from megadiff.models.llada2.model import build_model
    from megadiff.models.llada2.presets import preset
    from megadiff.platform.distributed import init_distributed, initialize_parallel

    hf_config = preset("tiny")
    init_distributed()
    initialize_parallel(ParallelLayout())
    (model,) = build_model(LLaDA2ModelConfig.from_hf_dict(hf_config), ParallelLayout(), use_te=True)
    items = list(nested_values(model.sharded_state_dict()))
    tensors = {i.key for i in items if isinstance(i, (ShardedTensor, ShardedTensorFactory))}  # gated fc1: a factory
    objects = {i.key for i in items if isinstance(i, ShardedObject)}
    assert tensors == {u.key for u in units_for(hf_config, "te")}
    assert objects and all(k.endswith("_extra_state") for k in objects)


@pytest.mark.gpu
def test_logits_on_gpu_match_reference_in_fp32_and_bf16(tmp_path):
    r = cuda_check(tmp_path, "logits")
    assert r["fp32"]["max_abs"] <= FP32_LOGIT_TOL, r
    assert r["bf16"]["max_abs"] <= BF16_LOGIT_REL_TOL * r["bf16"]["ref_max_abs"], r
    assert r["bf16"]["max_abs"] > r["fp32"]["max_abs"], r  # the bf16 model really ran in bf16


@pytest.mark.gpu
def test_trainer_step_on_one_gpu_with_nccl_matches_reference(tiny_run_dir):
    step_parity_on_gpus(tiny_run_dir, 1, "1,1,1")


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs at least 2 GPUs (TP=2 and EP=2 over NCCL)")
def test_trainer_step_on_two_gpus_at_tp2_and_ep2_matches_reference(tiny_run_dir):
    step_parity_on_gpus(tiny_run_dir, 2, "2,1,1;1,2,1")


@pytest.mark.gpu
def test_compiled_flex_attention_on_cuda_matches_dense(tmp_path):
    r = cuda_check(tmp_path, "flex")
    assert set(r) == {"packed_docs", "block_diffusion"}
    for mask, errors in r.items():
        assert errors["out"] <= FLEX_TOL, (mask, errors)
        assert errors["grad"] <= FLEX_TOL * errors["grad_max_abs"], (mask, errors)


@pytest.mark.gpu
def test_generate_on_cuda_returns_the_cpu_tokens_at_temperature_0():
    from megadiff.hf.reference import build_reference_model
    from megadiff.inference import DecodingOptions, generate
    from megadiff.models.llada2.presets import preset

    eos, mask = 510, 511  # the tiny vocabulary's last ids, as tests/inference uses them
    model = build_reference_model(preset("tiny", pad_token_id=eos, eos_token_id=eos), seed=0)
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)  # sharp predictions: both commit branches run, no near-ties
    prompts = [[1, 2, 3, 4, 5], list(range(20, 60))]
    options = DecodingOptions(gen_length=32, block_length=8, steps=4, temperature=0.0)
    on_cpu = generate(model, prompts, options, mask, eos)
    on_gpu = generate(model.to("cuda"), prompts, options, mask, eos)
    assert on_gpu.tokens == on_cpu.tokens and on_gpu.forward_passes == on_cpu.forward_passes
    assert sum(len(t) for t in on_cpu.tokens) > 0
