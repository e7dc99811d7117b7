"""The trainer trains every model family: one training step of a tiny LLaDA and a tiny LLaDA-MoE
through the trainer's own step code (tools/make_tiny_model.py's dirs, the family's recipe filling
the diffusion section) against the family's plain reference model (HF names) computing the same
loss on the same noised global batch. One torchrun launch, 4 processes.

Layouts (TP, EP, PP): LLaDA (1,1,1) (data parallel 4) and (2,1,2); LLaDA-MoE (1,1,1) and (2,2,2).
Tolerances: loss and every parameter gradient rel <= 1e-5 (fp32). The diffusion section is the
family recipe's (full attention, t ~ U(1e-3, 1), 1/t weights, mean per sequence), and no prompt
token is masked.
"""

import json

import pytest

from tests.dist.launch import run_torchrun

WORKER = "tests/dist/workers/train_check.py"
REL_TOL = 1e-5
LAYOUTS = {"llada": "1,1,1;2,1,2", "lladamoe": "1,1,1;2,2,2"}


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
