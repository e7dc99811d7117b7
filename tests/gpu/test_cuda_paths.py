"""Checks that only mean something on a CUDA machine (marked `gpu`; skipped where CUDA is absent).

megatron-core runs in torchrun workers that keep CUDA (`run_torchrun(..., gpu=True)`: NCCL,
cuda:LOCAL_RANK), as the CPU layout tests run theirs on gloo. Tolerances, per dtype (TOL):
- fp32 vs the fp32 reference on the CPU: logits max |Δ| <= 1e-4 (the CPU parity tolerance), the
  masked-diffusion loss of those logits within rel. 1e-4; a trainer step's loss and every
  gradient within rel. 1e-4 (CPU: 1e-5; GPU kernels sum in another order); flex vs dense
  attention: outputs max |Δ| <= 1e-4, gradients <= 1e-4 x max |gradient|.
- bf16: measured against what bf16 costs the plain reference itself. The tiny model's logits move
  a lot in bf16 (its reference in bf16 on the CPU: max |Δ| 0.54 of max |logit| 1.9, mean |Δ| 0.021,
  loss rel. 9.5e-4; megatron-core in bf16 on the CPU: 0.43, 0.013, 4.7e-4), so a fixed fraction of
  the largest logit says little. Logits max and mean |Δ| <= 2x the reference's bf16 error; the
  loss within rel. max(2x the reference's, 2^-8) (one bf16 ulp); flex in bf16 within 2x dense in
  bf16 (both against dense in fp32; on the CPU flex is the closer of the two), plus 2^-8 of the
  largest value; a trainer step in bf16: the loss within rel. BF16_STEP_LOSS_REL of the fp32
  reference (gradients are not compared in bf16).
- generate at temperature 0: the same tokens on CUDA as on the CPU (fp32).
Only the CPU numbers quoted here were measured on this project's machines; every GPU number comes
from `make gpu-check` on the machine that runs it.
"""

import importlib.util
import json

import pytest
import torch

from tests.dist.launch import run_torchrun

WORKER = "tests/gpu/workers/cuda_checks.py"
TRAIN_WORKER = "tests/dist/workers/train_check.py"
BF16_ULP = 2.0**-8
TOL = {
    "fp32": {"logits_abs": 1e-4, "loss_rel": 1e-4, "step_rel": 1e-4, "flex": 1e-4},
    "bf16": {"vs_reference_bf16": 2.0, "flex_vs_dense_bf16": 2.0},
}
BF16_STEP_LOSS_REL = 2e-2


def cuda_check(tmp_path, check):
    out = tmp_path / f"{check}.json"
    run_torchrun(1, WORKER, ["--check", check, "--out", out], gpu=True)
    return json.loads(out.read_text())


def step_parity_on_gpus(tiny_run_dir, nproc, layouts, dtype="fp32"):
    out = tiny_run_dir / f"gpu_step_{nproc}_{dtype}.json"
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
            f"model.dtype={dtype}",
        ],
        gpu=True,
    )
    results = json.loads(out.read_text())
    assert len(results) == len(layouts.split(";"))
    for layout, modes in results.items():
        assert set(modes) == {"block_diffusion", "full"}
        for mode, r in modes.items():
            if dtype == "fp32":
                assert r["loss_rel"] <= TOL["fp32"]["step_rel"] and r["grad_rel"] <= TOL["fp32"]["step_rel"], (
                    layout,
                    mode,
                    r,
                )
            else:
                assert r["loss_rel"] <= BF16_STEP_LOSS_REL, (layout, mode, r)


@pytest.mark.gpu
def test_cpu_support_refuses_to_patch_when_cuda_is_present():
    from megadiff.platform.cpu import enable_cpu_support

    with pytest.raises(RuntimeError, match="must not be used when CUDA is the run device"):
        enable_cpu_support()


@pytest.mark.gpu
def test_transformer_engine_spec_is_chosen_whenever_megatron_core_can_use_te():
    from megadiff.models.common.spec import transformer_engine_usable
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
def test_logits_and_loss_on_gpu_match_reference_in_fp32_and_bf16(tmp_path):
    r = cuda_check(tmp_path, "logits")
    fp32, bf16, yardstick = r["fp32"], r["bf16"], r["reference_bf16"]
    assert fp32["max_abs"] <= TOL["fp32"]["logits_abs"] and fp32["loss_rel"] <= TOL["fp32"]["loss_rel"], r
    factor = TOL["bf16"]["vs_reference_bf16"]
    assert bf16["max_abs"] <= factor * yardstick["max_abs"], r
    assert bf16["mean_abs"] <= factor * yardstick["mean_abs"], r
    assert bf16["loss_rel"] <= max(factor * yardstick["loss_rel"], BF16_ULP), r
    assert bf16["max_abs"] > fp32["max_abs"], r  # the bf16 model really ran in bf16


@pytest.mark.gpu
def test_trainer_step_on_one_gpu_with_nccl_matches_reference(tiny_run_dir):
    step_parity_on_gpus(tiny_run_dir, 1, "1,1,1")


@pytest.mark.gpu
def test_trainer_step_in_bf16_on_one_gpu_has_the_reference_loss(tiny_run_dir):
    step_parity_on_gpus(tiny_run_dir, 1, "1,1,1", dtype="bf16")


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs at least 2 GPUs (TP=2 and EP=2 over NCCL)")
def test_trainer_step_on_two_gpus_at_tp2_and_ep2_matches_reference(tiny_run_dir):
    step_parity_on_gpus(tiny_run_dir, 2, "2,1,1;1,2,1")


@pytest.mark.gpu
def test_compiled_flex_attention_on_cuda_matches_dense_in_fp32_and_bf16(tmp_path):
    r = cuda_check(tmp_path, "flex")
    assert set(r) == {"packed_docs", "block_diffusion"}
    factor = TOL["bf16"]["flex_vs_dense_bf16"]
    for mask, e in r.items():
        assert e["fp32"]["out"] <= TOL["fp32"]["flex"], (mask, e)
        assert e["fp32"]["grad"] <= TOL["fp32"]["flex"] * e["grad_max_abs"], (mask, e)
        assert e["bf16"]["out"] <= factor * e["dense_bf16"]["out"] + BF16_ULP * e["out_max_abs"], (mask, e)
        assert e["bf16"]["grad"] <= factor * e["dense_bf16"]["grad"] + BF16_ULP * e["grad_max_abs"], (mask, e)
        assert e["bf16"]["out"] > e["fp32"]["out"], (mask, e)  # flex really ran in bf16


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
