"""The trainer trains every model family: one training step of a tiny LLaDA and a tiny LLaDA-MoE
through the trainer's own step code (tools/make_tiny_model.py's dirs, the family's recipe filling
the diffusion section) against the family's plain reference model (HF names) computing the same
loss on the same noised global batch. One torchrun launch, 4 processes.

Layouts (TP, EP, PP[, VPP]): LLaDA (1,1,1) (data parallel 4), (2,1,2) and (2,1,2,2); LLaDA-MoE
(1,1,1), (2,2,2) and (2,2,2,2). PP=2 with VPP=2 and 4 micro-batches runs 1F1B's steady state, where
batched p2p messages swap (megatron-core: batch_p2p_comm, off there; loss rel 0.07, grads x300
without it).
Tolerances: loss and every parameter gradient rel <= 1e-5 (fp32). The diffusion section is the
family recipe's (full attention, t ~ U(1e-3, 1), 1/t weights, mean per sequence), and no prompt
token is masked.
"""

import json
import math

import pytest

from tests.dist.launch import run_torchrun

WORKER = "tests/dist/workers/train_check.py"
REL_TOL = 1e-5
LAYOUTS = {"llada": "1,1,1;2,1,2;2,1,2,2", "lladamoe": "1,1,1;2,2,2;2,2,2,2"}


@pytest.fixture(scope="module")
def family_runs(tmp_path_factory):
    from megadiff.data.synthetic import arithmetic_problems, as_messages
    from megadiff.hf.tiny import write_tiny_model_dir

    root = tmp_path_factory.mktemp("families")
    with open(root / "train.jsonl", "w") as f:
        for row in arithmetic_problems(16, seed=1):
            f.write(json.dumps(as_messages(row)) + "\n")
    runs = []
    for name, layouts in LAYOUTS.items():
        hf = root / name
        write_tiny_model_dir(str(hf), seed=0, family=name)
        cfg = root / f"{name}.yaml"
        cfg.write_text(  # no diffusion section but the mode: the family recipe gives the rest
            f"model: {{hf_dir: {hf}}}\n"
            f"data: {{train_files: {root / 'train.jsonl'}, max_seq_len: 128}}\n"
            "train: {steps: 1, global_batch_size: 4, micro_batch_size: 1, lr: 1.0e-3}\n"
        )
        runs.append(dict(name=name, config=str(cfg), hf_dir=str(hf), layouts=layouts, modes=["full"]))
    return root, runs


@pytest.mark.dist
def test_one_step_matches_family_reference(family_runs):
    root, runs = family_runs
    out = root / "family_step.json"
    run_torchrun(4, WORKER, ["--check", "family_step", "--runs", json.dumps(runs), "--out", out])
    results = json.loads(out.read_text())
    print(json.dumps(results))
    assert set(results) == set(LAYOUTS)
    for name, by_layout in results.items():
        assert set(by_layout) == set(LAYOUTS[name].split(";")), name
        for layout, modes in by_layout.items():
            r = modes["full"]
            where = (name, layout, r)
            assert r["diffusion"] == dict(
                mode="full", t_low=1e-3, t_high=1.0, loss_weight="inverse_t", normalize="sequence"
            ), where
            assert r["masked_tokens"] > 0 and r["masked_prompt_tokens"] == 0, where
            assert r["grads_compared"] > 10, where
            assert r["loss_rel"] <= REL_TOL, where
            assert r["grad_rel"] <= REL_TOL, where


@pytest.mark.repeat  # the DPO path is family-agnostic past the model (test_dpo, LLaDA2); stack (b)'s light set skips it
@pytest.mark.dist
@pytest.mark.slow
def test_llada_dpo_matches_plain_reference(family_runs):
    """LLaDA 1.5's VRPO is megadiff's ELBO-DPO: tests/dist/workers/dpo_check.py's cases on a tiny
    LLaDA (full attention, the family's t range): step 1 log 2 within 1e-6; step 2's loss and
    every gradient rel <= 1e-5 against the plain DPO on the family reference; at (1,1,1) (DP=4) and
    (2,1,2)."""
    from megadiff.data.synthetic_preference import style_pairs

    root, runs = family_runs
    llada = next(r for r in runs if r["name"] == "llada")
    pairs = root / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(row) + "\n" for row in style_pairs(8, seed=2)))
    config = root / "llada_dpo.yaml"
    config.write_text(
        f"model: {{hf_dir: {llada['hf_dir']}}}\n"
        f"data: {{train_files: {pairs}, max_seq_len: 256}}\n"
        "train: {objective: dpo, steps: 2, global_batch_size: 4, micro_batch_size: 1, lr: 1.0e-3}\n"
        "dpo: {beta: 0.5, mc_samples: 2, label_smoothing: 0.1}\n"
        "logging: {progress_bar: false}\n"
    )
    cases = ["1,1,1/full/live/1", "2,1,2/full/live/1"]
    out = root / "dpo_check.json"
    args = ["--config", config, "--hf-dir", llada["hf_dir"], "--cases", ";".join(cases), "--out", out]
    run_torchrun(4, "tests/dist/workers/dpo_check.py", args)
    results = json.loads(out.read_text())
    print(json.dumps(results))
    assert set(results) == set(cases)
    for case, r in results.items():
        assert abs(r["step1_loss"] - math.log(2.0)) <= 1e-6, (case, r)
        assert r["loss_rel"] <= REL_TOL and r["grad_rel"] <= REL_TOL, (case, r)
        assert abs(r["loss"] - math.log(2.0)) > 1e-3, (case, r)  # the policy moved
