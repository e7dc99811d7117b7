"""`make demo`'s pipeline, shortened (few steps and rows), so it cannot rot: every stage runs and
summary.json agrees with what the run logged."""

import json
import os
import subprocess
import sys

import pytest

from megadiff.data.preference import read_preference_rows
from tests.dist.launch import worker_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.dist
@pytest.mark.slow
def test_short_demo_runs_every_stage_and_summary_matches_log(tmp_path):
    out = tmp_path / "demo"
    env = worker_env()  # the demo is a CPU pipeline, also on a GPU node
    proc = subprocess.run(
        [sys.executable, "tools/demo.py", "--output", str(out), "--steps", "6", "--rows", "200", "--eval-limit", "4"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-3000:]
    for step in (
        "make_tiny_model.py",
        "build_gsm8k_dataset.py",
        "convert_hf_to_mcore.py",
        "pretrain_llada2_sft.sh",
        "convert_mcore_to_hf.py",
        "eval_gsm8k.py",
        "generate.py",
    ):
        printed = [line for line in proc.stdout.splitlines() if line.startswith("+ ")]
        assert any(step in line for line in printed), step  # each command is printed before it runs
    summary = json.loads((out / "summary.json").read_text())
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert summary["steps"] == 6 == metrics[-1]["step"]
    assert summary["final_loss"] == metrics[-1]["loss"] and summary["first_loss"] == metrics[0]["loss"]
    assert f"step 6/6 loss {metrics[-1]['loss']:.4f}" in (out / "train.log").read_text()
    for when in ("before", "after"):
        assert (
            summary[f"accuracy_{when}"] == json.loads((out / f"eval_{when}" / "summary.json").read_text())["accuracy"]
        )
    commands = [stage["command"] for stage in summary["stages"]]
    assert commands == [
        "make_tiny_model.py",
        "make_synthetic_data.py",
        "make_synthetic_data.py",  # the preference pairs of examples/configs/tiny_dpo.yaml
        "build_gsm8k_dataset.py",
        "convert_hf_to_mcore.py",
        "eval_gsm8k.py",
        "pretrain_llada2_sft.sh",
        "convert_mcore_to_hf.py",
        "eval_gsm8k.py",
        "generate.py",
    ]
    # training's CPU time includes torchrun's two workers (grandchildren of the demo): each imports
    # torch and megatron-core, so together they cost more than the one-process converter
    cpu = {stage["command"]: stage["cpu_s"] for stage in summary["stages"]}
    assert cpu["pretrain_llada2_sft.sh"] > 1.5 * cpu["convert_hf_to_mcore.py"] > 0
    assert summary["cpu_time_s"] >= sum(stage["cpu_s"] for stage in summary["stages"])
    assert 0 < sum(stage["wall_s"] for stage in summary["stages"]) <= summary["wall_time_s"]
    assert json.loads((out / "tiny_hf" / "config.json").read_text())["num_hidden_layers"] == 2
    assert (out / "loss.png").stat().st_size > 1000
    assert (out / "trained_hf" / "config.json").is_file()
    # the README's DPO command reads these pairs: valid preference rows, as many as the demo wrote
    assert read_preference_rows(out / "data" / "pairs.jsonl")[1]["rows_kept"] == 256
