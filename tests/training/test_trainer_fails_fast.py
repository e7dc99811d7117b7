"""Bad input stops the trainer before any process group or model is built."""

import json

import pytest
import torch

from megadiff.data.rows import DataError
from megadiff.models.llada2 import ConfigError
from megadiff.training.config import TrainingConfigError, load_config
from megadiff.training.loop import Trainer


def test_malformed_row_stops_before_model_is_built(tiny_run_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    good = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
    bad.write_text(good + "\n" + '{"messages": [{"role": "robot", "content": "x"}]}\n')
    cfg = load_config(str(tiny_run_dir / "cfg.yaml"), [f"data.train_files={bad}"])
    with pytest.raises(DataError, match=f"{bad}:2: .*robot"):
        Trainer(cfg)
    assert not torch.distributed.is_initialized()


def test_layout_not_dividing_model_stops_before_model_is_built(tiny_run_dir):
    cfg = load_config(str(tiny_run_dir / "cfg.yaml"), ["parallel.tp=4"])
    with pytest.raises(
        ConfigError, match="num_key_value_heads=2 is not divisible by parallel.tp=4; use parallel.tp=1, 2"
    ):
        Trainer(cfg)
    assert not torch.distributed.is_initialized()


def test_layout_error_from_yaml_names_the_key_written_there(tiny_run_dir, tmp_path):
    """A layout set in the YAML file is named as parallel.tp (the converters' CLIs say --tp)."""
    path = tmp_path / "tp4.yaml"
    path.write_text((tiny_run_dir / "cfg.yaml").read_text() + "parallel: {tp: 4}\n")
    with pytest.raises(ConfigError) as info:
        Trainer(load_config(str(path)))
    assert "num_key_value_heads=2 is not divisible by parallel.tp=4; use parallel.tp=1, 2" in str(info.value)
    assert "--" not in str(info.value)
    assert not torch.distributed.is_initialized()


@pytest.mark.parametrize(
    "world, overrides, need",
    [(3, ["parallel.ep=2"], 2), (2, ["parallel.tp=2", "parallel.pp=2"], 4), (6, ["parallel.pp=2", "parallel.ep=2"], 4)],
)
def test_layout_not_fitting_the_processes_names_the_parallel_keys(tiny_run_dir, monkeypatch, world, overrides, need):
    monkeypatch.setenv("WORLD_SIZE", str(world))  # what torchrun --nproc-per-node sets
    cfg = load_config(str(tiny_run_dir / "cfg.yaml"), overrides)
    with pytest.raises(TrainingConfigError, match=f"need a multiple of {need} processes .* but {world} were started"):
        Trainer(cfg)
    assert not torch.distributed.is_initialized()
