"""Converters for the LLaDA and LLaDA-MoE families, through their entry points, in one 4-process launch:
HF -> megatron at (TP,EP,PP) = (2,2,2) for a tiny LLaDA-MoE (fast I/O) and (2,1,2) for a tiny LLaDA
(plain I/O), then megatron -> HF through both I/O paths: every tensor bit-exact. The converted
checkpoints loaded at their layouts give the reference's logits (fp32, max |diff| <= 1e-4)."""

import json

import pytest

from tests.dist.launch import run_torchrun

WORKER = "tests/dist/workers/family_convert.py"
LOGIT_TOL = 1e-4


@pytest.mark.dist
def test_llada_and_lladamoe_convert_both_ways_bit_exact_at_parallel_layouts(tmp_path):
    from megadiff.models.common.hf_dir import write_reference_dir
    from megadiff.models.registry import family

    jobs = {"lladamoe": "2,2,2@fast", "llada": "2,1,2@plain"}
    args = []
    for name, layout in jobs.items():
        hf_dir = tmp_path / f"{name}-hf"
        write_reference_dir(family(name), str(hf_dir), "tiny", seed=0)
        args += ["--job", f"{name}={hf_dir}@{layout}"]
    out = tmp_path / "r.json"
    run_torchrun(4, WORKER, [*args, "--work", tmp_path, "--out", out])
    results = json.loads(out.read_text())
    print(results)
    assert sorted(results) == sorted(jobs)
    for name, r in results.items():
        assert r["not_exact_plain"] == 0 and r["not_exact_fast"] == 0, (name, r)
        assert r["logits"] <= LOGIT_TOL, (name, r)
