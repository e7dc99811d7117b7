"""LoRA on megadiff's LLaDA2 equals the reference model carrying the same adapters, at every layout,
in ONE 4-process torchrun launch (tests/dist/workers/lora_parity.py).

The adapters are non-zero (B != 0, loaded with load_full_adapter_state); routed experts are adapted
except in the one `dense` layout (the default config). Oracles: the plain-PyTorch reference with the
same adapters as a PEFT adapter loaded by `peft` (to_peft), and with merged weights W + (alpha/r) * B @ A
(megatron layout, mapped by the parameter table); the trainer checks use the merged one.
Tolerances: fp32 logits max |diff| <= 1e-4; adapter gradients rel. error (max |diff| / max |ref|
per tensor) <= 1e-5; trainer loss rel. error <= 1e-5; base weights bit-identical after 5 steps;
adapters saved from model.sharded_state_dict() at one layout load bit-exactly at the others.
"""

import json

import pytest

from megadiff.data.synthetic_preference import style_pairs
from tests.dist.launch import run_torchrun

WORKER = "tests/dist/workers/lora_parity.py"
LOGIT_TOL, GRAD_TOL, LOSS_TOL = 1e-4, 1e-5, 1e-5
# the first layout saves the adapters' sharded_state_dict (dist_checkpointing); the others load it
LAYOUTS = "2,2,2;1,1,1;2,1,1;1,2,1;1,1,2;2,2,1;2,1,1,dense"
GRAD_LAYOUTS = "1,1,1;2,1,1;2,2,2"  # 2,1,1: expert-TP 2 (routed experts' A/B split over it)
STEP_LAYOUTS = "1,1,1;2,2,2"
TRAINER_LAYOUTS = "2,2,2"


@pytest.fixture(scope="module")
def lora_run_dir(tiny_run_dir):
    pairs = tiny_run_dir / "lora_pairs.jsonl"
    pairs.write_text("".join(json.dumps(row) + "\n" for row in style_pairs(16, seed=2)))
    (tiny_run_dir / "lora_dpo.yaml").write_text(
        f"model: {{hf_dir: {tiny_run_dir / 'hf'}}}\n"
        f"data: {{train_files: {pairs}, max_seq_len: 256}}\n"
        "train: {objective: dpo, steps: 1, global_batch_size: 8, micro_batch_size: 1, lr: 1.0e-3}\n"
        "diffusion: {block_size: 8}\n"
        "dpo: {beta: 0.5, mc_samples: 2}\n"
        "logging: {progress_bar: false}\n"
    )
    return tiny_run_dir


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.repeat  # stack (b) trains LoRA at EP=2 and checks its exports in tests/converters/test_lora_export.py
def test_lora_matches_merged_reference_at_every_layout_and_through_the_trainer(lora_run_dir):
    out = lora_run_dir / "lora.json"
    ckpt = lora_run_dir / "lora_adapter_ckpt"
    ckpt.mkdir()
    run_torchrun(
        4,
        WORKER,
        [
            "--layouts",
            LAYOUTS,
            "--grad-layouts",
            GRAD_LAYOUTS,
            "--step-layouts",
            STEP_LAYOUTS,
            "--trainer-config",
            lora_run_dir / "cfg.yaml",
            "--dpo-config",
            lora_run_dir / "lora_dpo.yaml",
            "--hf-dir",
            lora_run_dir / "hf",
            "--ckpt-dir",
            ckpt,
            "--trainer-layouts",
            TRAINER_LAYOUTS,
            "--out",
            out,
        ],
        timeout=1200,
    )
    results = json.loads(out.read_text())
    print(json.dumps(results, indent=1))  # the numbers, for -s
    layouts = [k for k in results if not k.startswith("trainer")]
    assert len(layouts) == 7 and "tp=2,ep=2,etp=1,pp=2" in layouts
    for layout in layouts:
        r = results[layout]
        for variant in ("plain", "masked", "plain_merged", "masked_merged"):
            assert r[f"logits_{variant}"] <= LOGIT_TOL, (layout, variant, r)
        assert r["full_state_roundtrip"] == 0.0, (layout, r)
        assert r.get("init_layout_independent", 0.0) == 0.0, (layout, r)  # same start at every layout
        assert r["routed_expert_adapters"] == (0 if layout.endswith("dense") else 3 * 8 * 2), (layout, r)
    loaded = [k for k in layouts if "ckpt_roundtrip" in results[k]]
    assert len(loaded) == 5  # saved at tp=2,ep=2,pp=2, loaded exactly at every other layout with experts
    for layout in loaded:
        assert results[layout]["ckpt_roundtrip"] == 0.0, (layout, results[layout])
    graded = [k for k in layouts if "grad_rel_err" in results[k]]
    assert len(graded) == 3
    for layout in graded:
        r = results[layout]
        assert r["grad_rel_err"] <= GRAD_TOL and r["grad_rel_err_merged"] <= GRAD_TOL, (layout, r)
    stepped = [k for k in layouts if "base_changed" in results[k]]
    assert len(stepped) == 2
    for layout in stepped:
        r = results[layout]
        assert r["base_changed"] == 0 and r["frozen_tensors"] > 0, (layout, r)  # bit-identical base
        assert r["adapters_unmoved"] == 0 and r["adapter_tensors"] > 0, (layout, r)
        assert r["optimizer_bytes_ratio"] < 0.2, (layout, r)  # LoRA's optimizer holds a fraction of full FT's
    t = results[f"trainer {TRAINER_LAYOUTS}"]
    for mode in ("block_diffusion", "full", "block_diffusion_cap"):  # _cap: + CAP and complementary masks
        assert t[f"{mode}_loss_rel"] <= LOSS_TOL and t[f"{mode}_grad_rel"] <= GRAD_TOL, (mode, t)
    assert t["trainer_base_changed"] == 0 and t["trainer_loss_not_lower"] == 0, t
    assert t["dpo_loss_rel"] <= LOSS_TOL and t["dpo_grad_rel"] <= GRAD_TOL, t
    assert t["dpo_loss_minus_log2"] > 1e-3, t  # non-zero adapters: the policy differs from the reference
