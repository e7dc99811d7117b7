"""Continued pretraining on indexed data (issue 27) against the reference, and its resume.

Tolerances: a pretraining micro-batch step's loss and every parameter gradient within rel. 1e-5 of
the reference model computing the same loss on the same noised batch (block sizes 1, 4, 32 and full
attention; embedding noise on in the first two), at (TP, EP, PP) = (1,1,1) and (2,2,2) in one launch
(MEGADIFF_TESTS=light, the second stack: (2,2,2) only).
A run resumed inside phase 2 gives exactly the uninterrupted run's losses, phases and valid_loss; at
another data-parallel size (2 -> 1), within 1e-5 (the gradient sums run in another order).
"""

import json
import os

import pytest

from tests.dist.launch import run_torchrun

WORKER = "tests/dist/workers/cpt_check.py"
REL_TOL = 1e-5


@pytest.mark.dist
@pytest.mark.slow
def test_pretraining_step_matches_reference_at_block_sizes_1_4_32_and_full_at_111_and_222(cpt_run_dir, tiny_run_dir):
    out = cpt_run_dir / "parity.json"
    args = ["--config", cpt_run_dir / "cfg.yaml", "--hf-dir", tiny_run_dir / "hf", "--check", "parity"]
    layouts = ["2,2,2"] if os.environ.get("MEGADIFF_TESTS") == "light" else ["1,1,1", "2,2,2"]  # (b): the harder
    run_torchrun(4, WORKER, [*args, "--layouts", ";".join(layouts), "--out", out])
    results = json.loads(out.read_text())
    assert set(results) == set(layouts)
    for layout, phases in results.items():
        assert list(phases) == ["bd1", "bd4", "full", "bd32"], layout
        for phase, r in phases.items():
            assert r["loss_rel"] <= REL_TOL and r["grad_rel"] <= REL_TOL, (layout, phase, r)
            assert r["min_documents_per_row"] >= 2 and r["all_targets"], (layout, phase, r)
            assert r["input_len"] == (64 if phase == "full" else 128), (layout, phase, r)  # full: no x_0 half
        assert phases["bd1"]["noised"] and phases["bd4"]["noised"] and not phases["full"]["noised"]


@pytest.mark.repeat  # the data state and phases are megadiff's; test_resume.py resumes on both stacks
@pytest.mark.dist
@pytest.mark.slow
def test_resume_inside_phase_2_gives_the_uninterrupted_losses_at_dp_2_and_1(cpt_run_dir, tmp_path):
    """2 processes at (1,1,1) (DP=2): straight vs stopped after step 4 (phase 2 is steps 3-5) and
    resumed; then 1 process (DP=1) resumes the same step-4 checkpoint."""
    args = ["--config", cpt_run_dir / "cfg.yaml", "--check", "resume", "--work", tmp_path]
    run_torchrun(2, WORKER, [*args, "--layouts", "1,1,1", "--out", tmp_path / "dp2.json"])
    run_torchrun(1, WORKER, [*args, "--layouts", "1,1,1", "--out", tmp_path / "dp1.json"])
    r = json.loads((tmp_path / "dp2.json").read_text())
    straight = [tuple(s) for s in r["straight"]]
    assert [p for _, p, _, _ in straight] == ["bd1"] * 2 + ["bd4"] * 3 + ["full"]
    # warmup-stable-decay: 1 warmup step, flat, then the last 2 of 6 decay linearly to min_lr = 0
    assert [lr for *_, lr in straight] == pytest.approx([1e-3, 1e-3, 1e-3, 1e-3, 5e-4, 0.0])
    assert [tuple(s) for s in r["resumed"]] == straight  # bit-exact: losses, phases, learning rates
    valid = r["valid_straight"]  # logged at steps 2, 4, 6
    assert sorted(valid) == ["2", "4", "6"] and r["valid_resumed"] == {"4": valid["4"], "6": valid["6"]}
    r1 = json.loads((tmp_path / "dp1.json").read_text())
    other = [tuple(s) for s in r1["resumed_other_dp"]]  # steps 5..6 at DP=1
    assert [(s, p, lr) for s, p, _, lr in other] == [(s, p, lr) for s, p, _, lr in straight[4:]]
    for (_, _, a, _), (_, _, b, _) in zip(other, straight[4:], strict=True):
        assert abs(a - b) <= REL_TOL * abs(b), (other, straight)
    assert abs(r1["valid_other_dp"]["6"] - valid["6"]) <= REL_TOL * valid["6"]
