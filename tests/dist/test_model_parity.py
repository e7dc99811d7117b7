"""megadiff's LLaDA2 on megatron-core equals the plain-PyTorch reference at every layout.

Each launch runs several layouts in one torchrun job (process groups rebuilt per layout). Routed
experts are `auto`, which on the CPU is grouped (torch._grouped_mm; asserted), and megatron-core's
SequentialMLP at one layout (`/sequential`); tests/dist/test_grouped_experts.py holds the two equal.
Tolerances: fp32 logits max |Δ| <= 1e-4; gradients rel. error <= 1e-5 (max |Δ| / max |ref| per
HF tensor); routing: same experts and weights within 1e-5 (a different expert counts as >= 1).
"""

import json

import pytest

from tests.dist.launch import run_torchrun

WORKER = "tests/dist/workers/parity.py"
LOGIT_TOL, GRAD_TOL, ROUTING_TOL = 1e-4, 1e-5, 1e-5

TWO_PROC = "1,1,1;2,1,1;1,2,1;1,1,2;1,2,1/sequential"
TWO_PROC_GRADS = "1,1,1"
FOUR_PROC = "1,4,1;2,2,1;2,1,2;1,2,2;1,1,2,2"
FOUR_PROC_GRADS = "2,2,1"


def _check(results, expected_layouts, grad_layouts):
    assert len(results) == expected_layouts, results.keys()
    for layout, r in results.items():
        assert r["grouped_experts"] == (0.0 if layout.endswith("/sequential") else 1.0), (layout, r)
        assert r["logits_plain"] <= LOGIT_TOL, (layout, r)
        assert r["logits_masked_repeated_positions"] <= LOGIT_TOL, (layout, r)
        assert r["routing_mismatch"] <= ROUTING_TOL, (layout, r)
    graded = [layout for layout, r in results.items() if "grad_rel_err" in r]
    assert len(graded) == grad_layouts
    for layout in graded:
        assert results[layout]["grad_rel_err"] <= GRAD_TOL, (layout, results[layout])


@pytest.mark.dist
def test_logits_grads_routing_match_reference_two_processes(tmp_path):
    out = tmp_path / "r.json"
    run_torchrun(2, WORKER, ["--layouts", TWO_PROC, "--grad-layouts", TWO_PROC_GRADS, "--out", out])
    results = json.loads(out.read_text())
    _check(results, 5, 1)
    assert "tp=2,ep=1,etp=2,pp=1" in results  # TP=2 runs with sequence parallelism
    assert "tp=1,ep=2,etp=1,pp=1/sequential" in results


@pytest.mark.dist
@pytest.mark.slow
def test_logits_grads_routing_match_reference_four_processes(tmp_path):
    out = tmp_path / "r.json"
    run_torchrun(4, WORKER, ["--layouts", FOUR_PROC, "--grad-layouts", FOUR_PROC_GRADS, "--out", out])
    results = json.loads(out.read_text())
    _check(results, 5, 1)
    assert "tp=1,ep=1,etp=1,pp=2,vpp=2" in results
