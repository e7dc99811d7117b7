"""Checkpoint averaging (tools/average_checkpoints.py), an autoregressive Ling-2.0 start and SFT
validation, in one plain process (tests/dist/workers/cpt_single.py).

Tolerances: the average's HF export within rel. 1e-6 of the fp32 mean of the averaged iterations'
exports; a run started from it with model.init_from_mcore holds exactly those weights; the Ling
dir's weights load exactly.
"""

import json
import subprocess
import sys

import pytest

from tests.dist.launch import REPO, worker_env

WORKER = "tests/dist/workers/cpt_single.py"


@pytest.fixture(scope="module")
def single_run(tiny_run_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("cpt_single")
    cfg = root / "mock.yaml"
    cfg.write_text(
        f"model: {{hf_dir: {tiny_run_dir / 'hf'}}}\n"
        "data: {mock: true, max_seq_len: 32}\n"
        "train: {steps: 1, global_batch_size: 2, micro_batch_size: 1, lr: 1.0e-3}\n"
        "logging: {progress_bar: false}\n"
    )
    out = root / "out.json"
    proc = subprocess.run(
        [sys.executable, WORKER, "--root", root, "--config", cfg, "--out", out]
        + ["--sft-config", tiny_run_dir / "cfg.yaml", "--sft-rows", tiny_run_dir / "memorise.jsonl"],
        cwd=REPO,
        env=worker_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    return json.loads(out.read_text())


@pytest.mark.repeat  # stack-independent (DCP reads, the converters' writer); the light stack skips it
@pytest.mark.slow
def test_average_of_the_two_best_equals_the_mean_of_their_hf_exports(single_run):
    r = single_run["average"]
    assert r["exit"] == 0 and r["averaged"] == [20, 30]  # valid_loss 1.0 and 2.0; 10 had 3.0
    assert r["tensors"] > 20 and r["max_rel_vs_mean_of_exports"] <= 1e-6, r
    assert r["init_from_mcore_equals_export"]
    # with a block schedule: the best two span two phases (noted); --phase ranks one phase's only
    assert r["top2"] == [20, 30] and "phases bd32, full" in r["top2_note"][0]
    assert r["top2_bd32"] == [30, 10]


@pytest.mark.repeat  # stack-independent (DCP reads, the converters' writer); the light stack skips it
@pytest.mark.slow
def test_averaging_refuses_checkpoints_of_another_config_naming_both(single_run):
    r = single_run["average"]
    assert r["exit_other_config"] == 2  # --top-k 2 picks iterations 40 (another config) and 20
    message = r["other_config_error"]
    assert "iter_0000020" in message and "iter_0000040" in message and "'intermediate_size'" in message


@pytest.mark.repeat  # stack-independent (DCP reads, the converters' writer); the light stack skips it
@pytest.mark.slow
def test_ling_start_needs_a_mask_id_then_loads_its_weights_and_records_llada2(single_run):
    r = single_run["ling"]
    assert "model.mask_token_id" in r["no_mask_error"] and not r["group_before_error"]
    assert r["loaded_equal_dir"] and r["dir_tensors"] == r["loaded_tensors"] + 4  # the MTP layer left out
    assert len(r["losses"]) == 2 and all(0 < loss < 100 for loss in r["losses"])
    assert r["recorded"] == {"model_type": "llada2_moe", "mask_token_id": 300, "num_nextn_predict_layers": None}
    assert r["converted"] == "bailing_moe_v2"


@pytest.mark.repeat
@pytest.mark.slow
def test_sft_validation_is_logged_recorded_and_deterministic(single_run):
    r = single_run["sft_validation"]
    assert [step for step, _ in r["logged"]] == [1, 2]
    assert r["recorded"] == r["logged"][-1][1] == r["again"]  # the same samples and noise every time
    assert r["logged"][0][1] != r["logged"][1][1]  # the weights changed between them
