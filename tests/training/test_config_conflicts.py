"""A training config whose values contradict each other, or that YAML would silently thin out, is
refused with the file, line and key named: duplicate keys, a block longer than a row, a warmup
longer than the run, and options set while the switch they depend on is off."""

import pytest

from megadiff.training.config import TrainingConfigError, load_config

BASE = "model:\n  hf_dir: m\ndata:\n  train_files: d.jsonl\n"


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "text, message",
    [
        (BASE + "train:\n  lr: 1.0e-3\n  steps: 10\n  lr: 2.0e-3\n", r":8: train\.lr is given twice \(lines 6 and 8\)"),
        (BASE + "lora:\n  rank: 8\nmodel:\n  dtype: bf16\n", r":7: section 'model' is given twice \(lines 1 and 7\)"),
        (BASE + "perf:\n  recompute_modules: [{a: 1, a: 2}]\n", r":6: perf\.recompute_modules\.a is given twice"),
    ],
    ids=["key", "section", "nested"],
)
def test_a_key_given_twice_is_refused_with_both_lines(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(TrainingConfigError, match=rf"^{path}{message}"):
        load_config(str(path))


def test_merge_keys_may_be_overridden_and_errors_name_the_line(tmp_path):
    merged = "train:\n  <<: {steps: 10, lr: 1.0e-3}\n  lr: 2.0e-3\n"  # a merge, then one key overridden
    cfg = load_config(str(write(tmp_path, BASE + merged)))
    assert (cfg.train.steps, cfg.train.lr) == (10, 2.0e-3)
    with pytest.raises(TrainingConfigError, match=r":5: train\.lr is given twice \(both on line 5\)"):
        load_config(str(write(tmp_path, BASE + "train: {lr: 1, lr: 2}\n")))
    path = write(tmp_path, BASE + "train:\n  steps: 10\n  lrr: 1\n")
    with pytest.raises(TrainingConfigError, match=rf"^{path}:7: unknown key 'train.lrr'"):
        load_config(str(path))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.steps=10", "train.warmup_steps=20"], r"train\.warmup_steps=20 is more than train\.steps=10"),
        (
            ["diffusion.block_size=64", "data.max_seq_len=32"],
            r"diffusion\.block_size=64 is more than data\.max_seq_len",
        ),
    ],
)
def test_values_that_contradict_each_other_are_refused(overrides, message):
    with pytest.raises(TrainingConfigError, match=message):
        load_config(None, ["model.hf_dir=m", "data.train_files=d"] + overrides)
    # equal is fine: warmup over the whole run, one block per row
    load_config(
        None, ["model.hf_dir=m", "data.train_files=d"] + [o.replace("20", "10").replace("64", "32") for o in overrides]
    )


def test_lora_options_without_lora_enabled_are_refused_naming_the_switch(tmp_path):
    path = write(tmp_path, BASE + "lora:\n  rank: 8\n  alpha: 16\n")
    with pytest.raises(
        TrainingConfigError, match=rf"^{path}:6: lora\.rank is set but lora\.enabled=false .*set lora\.enabled=true"
    ):
        load_config(str(path))
    assert load_config(str(path), ["lora.enabled=true"]).lora.rank == 8
    # a template that keeps the section but turns it off on purpose is a decision, not a slip
    assert not load_config(str(path), ["lora.enabled=false"]).lora.enabled


@pytest.mark.parametrize(
    "override, switch",
    [
        ("dpo.beta=0.2", "train.objective=dpo"),
        ("diffusion.edit_weight=2", "diffusion.edit_ratio > 0"),
        ("perf.fp8_recipe=delayed", "perf.fp8=e4m3 or hybrid"),
        ("logging.wandb_mode=online", "logging.wandb_project=NAME"),
    ],
)
def test_every_section_switch_is_checked(override, switch):
    with pytest.raises(TrainingConfigError, match=rf"^override '{override}': .* set {switch}, or remove"):
        load_config(None, ["model.hf_dir=m", "data.train_files=d", override])
