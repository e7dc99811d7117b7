"""Block diffusion's x_t-only output layer (final norm, LM head and logits on the x_t half) gives the
same loss and gradients as the full 2S output layer, at three layouts in one torchrun launch:
(1,1,1), TP=2 with sequence parallelism (x_t half padded: S is odd), and PP=2.
Tolerance: relative difference <= 1e-5 for the loss and for every parameter's gradient
(max |Δ| / max |ref| per parameter)."""

import json

import pytest

from tests.dist.launch import run_torchrun

WORKER = "tests/dist/workers/xt_only_parity.py"
TOL = 1e-5
LAYOUTS = "1,1,1;2,1,1;1,1,2"


@pytest.mark.dist
@pytest.mark.repeat  # megadiff's own output-layer slicing; the step parity tests use it on both stacks
def test_xt_only_output_layer_matches_full_output_layer(tmp_path):
    out = tmp_path / "r.json"
    run_torchrun(2, WORKER, ["--layouts", LAYOUTS, "--out", out])
    results = json.loads(out.read_text())
    assert set(results) == {"tp=1,ep=1,etp=1,pp=1", "tp=2,ep=1,etp=2,pp=1", "tp=1,ep=1,etp=1,pp=2"}
    for layout, r in results.items():
        assert r["loss_rel_diff"] <= TOL, (layout, r)
        assert r["grad_rel_err"] <= TOL, (layout, r)
        assert r["loss"] > 0 and r["params_with_grad"] > 0, (layout, r)
        # the head really ran on the x_t half only: S = 15 tokens (16 with TP=2 padding), not 2S = 30
        assert r["logits_len_full"] == 30, (layout, r)
        assert r["logits_len_xt_only"] == (16 if layout.startswith("tp=2") else 15), (layout, r)
