"""DPO on the diffusion ELBO against a plain-PyTorch DPO on the reference model (torchrun on CPU).

One launch of 4 processes, several cases: (1,1,1) (DP=4) and (2,2,2) (TP=2, EP=2, PP=2), block
diffusion and full attention, micro-batches of 1 and 2 pairs (2 and 1 micro-batches per rank at
DP=4; 8 and 4 at DP=1), live and precomputed references, 2 Monte Carlo samples per response.
Tolerances: the first step's loss is log 2 within 1e-6 (policy == reference); step 2's loss and
every parameter gradient within rel. 1e-5 of the plain DPO on the same noised global batch;
precomputed == live within 1e-6 at the same layout.
"""

import json
import math

import pytest

from megadiff.data.synthetic_preference import style_pairs
from tests.dist.launch import run_torchrun

WORKER = "tests/dist/workers/dpo_check.py"
CASES = [
    "1,1,1/block_diffusion/live/1",
    "1,1,1/block_diffusion/precomputed/1",
    "1,1,1/full/live/2",
    "2,2,2/block_diffusion/live/2",
    "2,2,2/full/precomputed/1",
    "2,2,2/full/live/1",
]


@pytest.fixture(scope="module")
def dpo_run_dir(tiny_run_dir):
    pairs = tiny_run_dir / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(row) + "\n" for row in style_pairs(16, seed=2)))
    (tiny_run_dir / "dpo.yaml").write_text(
        f"model: {{hf_dir: {tiny_run_dir / 'hf'}}}\n"
        f"data: {{train_files: {pairs}, max_seq_len: 256}}\n"
        "train: {objective: dpo, steps: 2, global_batch_size: 8, micro_batch_size: 1, lr: 1.0e-3}\n"
        "diffusion: {block_size: 8}\n"
        "dpo: {beta: 0.5, mc_samples: 2, label_smoothing: 0.1}\n"
        "logging: {progress_bar: false}\n"
    )
    return tiny_run_dir


@pytest.mark.repeat  # stack-independent; CI's light stack (b) skips it to stay in budget
@pytest.mark.dist
@pytest.mark.slow
def test_dpo_matches_plain_reference_at_layouts_micro_batches_and_references(dpo_run_dir):
    out = dpo_run_dir / "dpo_check.json"
    run_torchrun(
        4,
        WORKER,
        [
            "--config",
            dpo_run_dir / "dpo.yaml",
            "--hf-dir",
            dpo_run_dir / "hf",
            "--cases",
            ";".join(CASES),
            "--out",
            out,
        ],
        timeout=1200,
    )
    results = json.loads(out.read_text())
    print(json.dumps(results, indent=1))  # the numbers, for -s
    assert set(results) == set(CASES)
    for case, r in results.items():
        assert abs(r["step1_loss"] - math.log(2.0)) <= 1e-6, (case, r)
        assert r["loss_rel"] <= 1e-5 and r["grad_rel"] <= 1e-5, (case, r)
        assert abs(r["loss"] - math.log(2.0)) > 1e-3, (case, r)  # the policy moved: Δ ≠ 0 is compared
    for layout, mode in (("1,1,1", "block_diffusion"), ("2,2,2", "full")):
        live, pre = results[f"{layout}/{mode}/live/1"], results[f"{layout}/{mode}/precomputed/1"]
        assert abs(live["loss"] - pre["loss"]) <= 1e-6, (layout, live, pre)
