"""The planner's forecasts for the example configs, its layout list, the CLI, and the trainer's
refusal to load weights for a layout whose forecast exceeds the device memory."""

import json
import os
import subprocess
import sys

import pytest
import torch

from megadiff.hf import checkpoint_reader
from megadiff.models.llada2 import LLaDA2ModelConfig, ParallelLayout, preset
from megadiff.planner import GiB, Hardware, forecast, plan_layouts
from megadiff.training.config import load_config, parallel_layout
from megadiff.training.loop import Trainer
from megadiff.training.memory_check import MemoryForecastError, run_shape

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLES = os.path.join(REPO, "examples", "configs")


def _example(name, *overrides):
    cfg = load_config(os.path.join(EXAMPLES, name), list(overrides))
    return run_shape(cfg), parallel_layout(cfg)


@pytest.mark.parametrize(
    "config, preset_name, nodes",
    [("llada2_mini_bd_sft.yaml", "llada2-mini", 1), ("llada2_flash_bd_sft.yaml", "llada2-flash", 4)],
)
def test_example_configs_fit_their_stated_clusters_of_80gb_gpus(config, preset_name, nodes):
    model = LLaDA2ModelConfig.from_hf_dict(preset(preset_name))
    shape, layout = _example(config)
    hw = Hardware(gpus_per_node=8, nodes=nodes, gpu_memory_gb=80)
    split = forecast(model, layout, hw, shape)
    assert split.total <= hw.memory_bytes, split.as_gib()
    assert split.total > 0.5 * hw.memory_bytes  # the forecast is not trivially small
    (plan,) = plan_layouts(model, hw, shape, layouts=[layout], distributed=(shape.use_distributed_optimizer,))
    assert plan.reason is None and plan.command(config).startswith(f"examples/pretrain_llada2_sft.sh {config}")


def test_flash_does_not_fit_one_node_nor_its_former_tp1_layout():
    model = LLaDA2ModelConfig.from_hf_dict(preset("llada2-flash"))
    shape, _ = _example("llada2_flash_bd_sft.yaml")
    assert all(p.reason for p in plan_layouts(model, Hardware(nodes=1), shape))  # 1.6 TB of state > 640 GB
    old = forecast(model, ParallelLayout(tp=1, ep=8, pp=4, vpp=2), Hardware(nodes=4), shape)
    assert old.total / GiB > 100, old.as_gib()  # activations of 2 x 4096 tokens without TP


def test_layouts_are_ranked_and_refusals_name_the_reason():
    model = LLaDA2ModelConfig.from_hf_dict(preset("llada2-mini"))
    shape, _ = _example("llada2_mini_bd_sft.yaml")
    plans = plan_layouts(model, Hardware(), shape)
    fits = [p for p in plans if p.reason is None]
    assert fits and [p.step_seconds for p in fits] == sorted(p.step_seconds for p in fits)
    reasons = {p.reason.split(" ")[0] for p in plans if p.reason}
    assert {"num_key_value_heads=4", "needs"} <= reasons  # tp=8 does not divide; some do not fit
    # the distributed optimizer shards the optimizer state over dp: never more memory than without
    by_layout = {}
    for p in plans:
        if p.memory:
            by_layout.setdefault(p.layout, {})[p.use_distributed_optimizer] = p.memory.optimizer
    assert any(len(v) == 2 and v[True] < 0.5 * v[False] for v in by_layout.values())


def test_flex_with_recompute_is_refused_and_recompute_shrinks_dense_activations():
    model = LLaDA2ModelConfig.from_hf_dict(preset("llada2-mini"))
    shape, layout = _example("llada2_mini_bd_sft.yaml")
    from dataclasses import replace

    (plan,) = plan_layouts(model, Hardware(), replace(shape, recompute="full"), layouts=[layout], distributed=(True,))
    assert "recompute" in plan.reason
    dense = replace(shape, attention_backend="dense")
    full = forecast(model, layout, Hardware(), replace(dense, recompute="full")).activations
    assert full < 0.2 * forecast(model, layout, Hardware(), dense).activations


def _plan_cli(*args):
    env = dict(os.environ, PYTHONPATH=REPO, PYTHONWARNINGS="ignore")
    return subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", "plan.py"), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=300,
    )


def test_plan_cli_json_and_table_for_a_config():
    proc = _plan_cli("--preset", "llada2-mini", "--seq-len", "2048", "--global-batch-size", "16", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    model = LLaDA2ModelConfig.from_hf_dict(preset("llada2-mini"))
    from megadiff.planner import active_params, total_params

    assert (data["total_params"], data["active_params"]) == (total_params(model), active_params(model))
    row = next(p for p in data["plans"] if p["feasible"])
    assert set(row["memory_gib"]) >= {
        "weights",
        "grads",
        "optimizer_dense",
        "optimizer_expert",
        "activations",
        "buffers",
        "total",
    }
    assert "parallel.tp=" in row["command"]
    proc = _plan_cli(os.path.join(EXAMPLES, "llada2_mini_bd_sft.yaml"), "--preset", "llada2-mini", "--top", "3")
    assert proc.returncode == 0, proc.stderr
    assert "this config's layout tp=1,ep=8,etp=1,pp=1:" in proc.stdout and "fits" in proc.stdout


def test_plan_cli_without_a_model_is_a_one_line_error():
    proc = _plan_cli("--gpus-per-node", "8")
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0
    assert "--preset" in proc.stderr


def test_forecast_over_device_memory_stops_before_weights_are_read(tiny_run_dir, monkeypatch, capsys):
    import megadiff.training.memory_check as memory_check
    import megadiff.training.setup as setup

    def weights_read(*args, **kwargs):
        raise AssertionError("weights were read")

    monkeypatch.setattr(memory_check, "device_memory_bytes", lambda: 1 << 20)  # a 1 MiB "GPU"
    monkeypatch.setattr(setup, "build_model_and_load", weights_read)
    monkeypatch.setattr(checkpoint_reader.HFCheckpointReader, "__init__", weights_read)
    cfg = load_config(str(tiny_run_dir / "cfg.yaml"))
    with pytest.raises(MemoryForecastError, match=r"exceeds the device's 0\.0 GiB at parallel\.tp=1 .*tools/plan\.py"):
        Trainer(cfg)
    assert not torch.distributed.is_initialized()
    assert "memory forecast per GPU" in capsys.readouterr().out
    # train.skip_memory_check: a warning, and the trainer goes on (not run here: it would start a
    # process group in this test process)
    cfg = load_config(str(tiny_run_dir / "cfg.yaml"), ["train.skip_memory_check=true"])
    model_cfg = LLaDA2ModelConfig.from_hf_dict(json.loads((tiny_run_dir / "hf" / "config.json").read_text()))
    lines = []
    memory_check.check_memory_forecast(cfg, model_cfg, parallel_layout(cfg), torch.float32, lines.append)
    assert "exceeds" in lines[-1] and "skip_memory_check" in lines[-1]


def test_on_the_cpu_the_forecast_is_only_printed(tiny_run_dir, monkeypatch):
    import megadiff.training.memory_check as memory_check

    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = load_config(str(tiny_run_dir / "cfg.yaml"), ["parallel.tp=2"])
    model_cfg = LLaDA2ModelConfig.from_hf_dict(json.loads((tiny_run_dir / "hf" / "config.json").read_text()))
    lines = []
    memory_check.check_memory_forecast(cfg, model_cfg, parallel_layout(cfg), torch.float32, lines.append)
    assert len(lines) == 1 and lines[0].startswith("memory forecast per GPU at tp=2,ep=1,etp=2,pp=1")
