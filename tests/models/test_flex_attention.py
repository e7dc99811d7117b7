"""FlexCoreAttention (BlockMask) equals the dense-mask attention, alone and inside LLaDA2.

The megatron-core checks run in a worker process (tests/dist/workers/flex_parity.py): they need
megadiff.platform.cpu, which patches the process for good. Tolerances: attention fp32 1e-5
(outputs and q/k/v gradients vs DotProductAttention); model logits max |Δ| <= 1e-4 vs the
reference model with the dense mask; gradients rel. error <= 1e-5 vs the dense backend.
Each model check has a control that must fail: the flex model given the wrong mask (doc-level
attention over [x_t ; x_0] instead of block diffusion) is far from the reference.
"""

import json
import shutil

import pytest

from tests.dist.launch import run_torchrun

WORKER = "tests/dist/workers/flex_parity.py"
ATTN_TOL, LOGIT_TOL, GRAD_TOL = 1e-5, 1e-4, 1e-5
WRONG_MASK_MIN = 100 * LOGIT_TOL


@pytest.fixture(scope="module")
def single_process(tmp_path_factory):
    """Core attention + whole model at layout (1,1,1), one process."""
    out = tmp_path_factory.mktemp("flex") / "r.json"
    run_torchrun(1, WORKER, ["--layouts", "1,1,1", "--attention", "--full-mode", "--out", out])
    (result,) = json.loads(out.read_text()).values()
    return result


@pytest.mark.parametrize("mask", ["none", "packed_docs", "block_diffusion"])
def test_flex_core_attention_matches_dot_product_attention(single_process, mask):
    assert single_process[f"attn_{mask}_out"] <= ATTN_TOL, single_process
    assert single_process[f"attn_{mask}_grad"] <= ATTN_TOL, single_process
    if mask != "none":  # both kinds of BlockMask tile are exercised
        assert single_process[f"attn_{mask}_tiles_full_partial"] > 0, single_process


def test_flex_core_attention_rejects_dense_bool_mask(single_process):
    assert single_process["attn_rejects_dense_mask"] == 1.0


def _check_model(r):
    assert r["flex_core_attention_layers"] == 4, r  # every layer of the tiny preset runs flex
    assert r["logits_bd"] <= LOGIT_TOL, r
    assert r["logits_bd_wrong_mask"] >= WRONG_MASK_MIN, r  # the comparison can fail
    assert r["grad_max_abs"] > 1.0, r  # gradients are not trivially zero
    assert r["grad_rel_err_vs_dense"] <= GRAD_TOL, r
    if shutil.which("g++") or shutil.which("c++"):
        assert r["cpu_flex_compiled"] == 1.0, "compiled flex_attention fell back to eager on CPU"


def test_flex_llada2_block_diffusion_logits_and_grads_match_dense(single_process):
    _check_model(single_process)


def test_flex_llada2_packed_full_attention_logits_match_reference(single_process):
    assert single_process["logits_full"] <= LOGIT_TOL, single_process


@pytest.mark.dist
def test_flex_llada2_matches_dense_at_tp2_sequence_parallel(tmp_path):
    out = tmp_path / "r.json"
    run_torchrun(2, WORKER, ["--layouts", "2,1,1", "--out", out])
    results = json.loads(out.read_text())
    assert list(results) == ["tp=2,ep=1,etp=2,pp=1"]
    _check_model(results["tp=2,ep=1,etp=2,pp=1"])


def test_flex_backend_refuses_recompute_of_core_attention():
    from megatron.core.transformer import TransformerConfig

    from megadiff.models.common.attention import check_flex_supported

    base = dict(num_layers=2, hidden_size=64, num_attention_heads=4)
    check_flex_supported(TransformerConfig(**base))
    check_flex_supported(TransformerConfig(**base, recompute_granularity="selective", recompute_modules=["moe"]))
    for bad in (
        dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
        dict(recompute_granularity="selective", recompute_modules=["core_attn"]),
    ):
        with pytest.raises(ValueError, match="BlockMask"):
            check_flex_supported(TransformerConfig(**base, **bad))


def test_block_mask_for_rejects_unknown_mode():
    import torch

    from megadiff.diffusion.block_mask import block_mask_for

    ids = torch.zeros(1, 8, dtype=torch.long)
    with pytest.raises(ValueError, match="mode"):
        block_mask_for(ids, ids, "causal")
