"""tools/compare_logits.py and LoRA for every model family, in one 2-process launch.

compare_logits: the family comes from config.json, the megatron model from the family's mapping
objects (or from a megatron checkpoint the converter wrote: --mcore-dir), the reference is the family's own (tiny LLaDA2, LLaDA and LLaDA-MoE dirs; fp32, max
|logit difference| <= 1e-4). LoRA on the megatron model of LLaDA (TP=2 + SP) and LLaDA-MoE (EP=2
with routed-expert adapters; TP=2) equals the family reference with the adapters merged (logits
<= 1e-4), and the adapters gathered back from the layout are the ones loaded, bit for bit."""

import json
import subprocess
import sys

import pytest

from tests.dist.launch import REPO, run_torchrun, worker_env

WORKER = "tests/dist/workers/family_tools.py"
TOL, LOGIT_TOL = "1e-4", 1e-4


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    from megadiff.models.common.hf_dir import write_reference_dir
    from megadiff.models.registry import family

    root = tmp_path_factory.mktemp("families")
    for name in ("llada", "lladamoe"):
        write_reference_dir(family(name), str(root / name), seed=3)
    return root


@pytest.mark.dist
# stack-independent wiring: the models' numerics at these layouts run on both stacks in
# tests/dist/test_family_parity.py, LoRA's megatron modules in tests/converters/test_lora_export.py
@pytest.mark.repeat
def test_compare_logits_and_lora_for_every_family_and_layout(tiny_run_dir, family_dirs, tmp_path):
    ids = tmp_path / "ids.json"
    ids.write_text(json.dumps([[5, 17, 33, 2, 99, 400, 7, 1, 3], list(range(40, 56))]))
    common = f"--input-ids {ids} --tolerance {TOL}"
    llada, moe = family_dirs / "llada", family_dirs / "lladamoe"
    mcore = tmp_path / "moe_mcore"  # LLaDA-MoE converted by the tool: compare_logits --mcore-dir
    convert = [sys.executable, "tools/convert_hf_to_mcore.py", "--hf-dir", str(moe), "--output", str(mcore)]
    subprocess.run(convert, cwd=REPO, env=worker_env(), check=True, capture_output=True, timeout=300)
    runs = [
        f"--hf-dir {tiny_run_dir / 'hf'} --tp 2 --ep 2 {common}",  # LLaDA2
        f"--hf-dir {llada} --tp 2 {common}",
        f"--hf-dir {llada} --cp 2 {common}",
        f"--hf-dir {moe} --ep 2 {common}",
        f"--hf-dir {moe} --tp 2 --ep 2 --etp 1 {common}",
        f"--hf-dir {moe} --pp 2 {common}",
        f"--hf-dir {moe} --mcore-dir {mcore} --tp 2 --ep 2 --etp 1 {common}",
    ]
    lora_jobs = [
        dict(hf_dir=str(llada), tp=2, ep=1, pp=1, experts=False),
        dict(hf_dir=str(moe), tp=1, ep=2, pp=1, experts=True),
        dict(hf_dir=str(moe), tp=2, ep=1, pp=1, experts=False),
    ]
    out, listed, jobs = tmp_path / "out.json", tmp_path / "runs.json", tmp_path / "lora_jobs.json"
    listed.write_text(json.dumps(runs))
    jobs.write_text(json.dumps(lora_jobs))
    log = run_torchrun(2, WORKER, ["--runs", listed, "--lora-jobs", jobs, "--out", out])
    results = json.loads(out.read_text())
    assert results["codes"] == {run: 0 for run in runs}, log[-3000:]
    for name in ("llada2", "llada", "lladamoe"):
        assert f"compare_logits: {name} model" in log, log[-3000:]
    assert log.count("PASS: max |Δ|") == len(runs), log[-3000:]
    assert len(results["lora"]) == len(lora_jobs)
    for job, r in results["lora"].items():
        assert r["logits"] <= LOGIT_TOL and r["adapters_not_exact"] == 0.0, (job, r)
        assert r["adapters_effect"] > 0.1, (job, r)  # the adapters change the output a lot


def test_compare_logits_names_the_known_model_types_for_an_unknown_one(tmp_path, capsys):
    from tools import compare_logits

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3", "hidden_size": 8}))
    (tmp_path / "ids.json").write_text("[[1, 2, 3]]")
    argv = ["--hf-dir", str(tmp_path), "--input-ids", str(tmp_path / "ids.json")]
    assert compare_logits.main(argv) == 2
    err = capsys.readouterr().err
    assert "config.json: model_type: 'qwen3'" in err and "llada, llada2_moe, lladamoe" in err, err
