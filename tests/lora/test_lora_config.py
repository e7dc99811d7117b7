"""The `lora` config section: off by default, all four megatron linears by default, routed experts
opt-in; bad values are refused when set, naming the field (and the unknown module)."""

import pytest

from megadiff.training.config import TrainingConfigError, describe_config, load_config

BASE = ["model.hf_dir=m", "data.train_files=d.jsonl"]


def test_lora_is_off_by_default_and_targets_dense_and_shared_linears():
    lora = load_config(None, BASE).lora
    assert lora.enabled is False and lora.experts is False
    assert lora.target_modules == ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]
    assert lora.adapter_config() == {
        "rank": 16,
        "alpha": 32.0,
        "dropout": 0.0,
        "experts": False,
        "init": "kaiming",
        "seed": 0,
        "target_modules": ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"],
    }


def test_lora_settings_are_read_from_overrides():
    cfg = load_config(
        None,
        BASE
        + [
            "lora.enabled=true",
            "lora.rank=4",
            "lora.alpha=8",
            "lora.dropout=0.1",
            "lora.target_modules=[linear_qkv, linear_fc2]",
            "lora.experts=true",
            "lora.init=gaussian",
            "lora.seed=7",
        ],
    )
    assert cfg.lora.adapter_config() == {
        "rank": 4,
        "alpha": 8.0,
        "dropout": 0.1,
        "experts": True,
        "init": "gaussian",
        "seed": 7,
        "target_modules": ["linear_qkv", "linear_fc2"],
    }


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "lora.target_modules=[linear_qkv, router]",
            "lora.target_modules: unknown entry 'router'; choose from linear_qkv",
        ),
        ("lora.target_modules=[q_proj]", "lora.target_modules: unknown entry 'q_proj'"),
        ("lora.rank=0", "lora.rank must be >= 1, got 0"),
        ("lora.rank=-2", "lora.rank must be >= 1, got -2"),
        ("lora.alpha=0", "lora.alpha must be > 0.0, got 0.0"),
        ("lora.alpha=-1", "lora.alpha must be > 0.0, got -1.0"),
        ("lora.dropout=1.0", "lora.dropout must be >= 0.0 and < 1.0, got 1.0"),
        ("lora.dropout=-0.1", "lora.dropout must be >= 0.0 and < 1.0, got -0.1"),
        ("lora.init=zeros", "lora.init='zeros' is not one of kaiming, gaussian"),
        ("lora.rnak=4", "unknown key 'lora.rnak'; did you mean 'lora.rank'"),
    ],
)
def test_bad_lora_settings_name_the_field(override, message):
    with pytest.raises(TrainingConfigError, match=message):
        load_config(None, BASE + [override])


def test_lora_with_grouped_gemm_experts_or_fp8_is_refused_naming_the_keys():
    for experts in ("grouped", "te"):
        with pytest.raises(TrainingConfigError, match=f"lora.experts=true.*perf.moe_experts={experts}.*sequential"):
            load_config(None, BASE + ["lora.enabled=true", "lora.experts=true", f"perf.moe_experts={experts}"])
    with pytest.raises(TrainingConfigError, match="lora.enabled=true.*no Transformer Engine experts.*perf.moe_experts"):
        load_config(None, BASE + ["lora.enabled=true", "perf.moe_experts=te"])
    with pytest.raises(TrainingConfigError, match="perf.fp8=off"):
        load_config(None, BASE + ["lora.enabled=true", "perf.fp8=e4m3"])


def test_init_from_peft_needs_lora_enabled_and_is_not_part_of_the_adapter_config():
    with pytest.raises(TrainingConfigError, match="lora.init_from_peft=a is set but lora.enabled=false"):
        load_config(None, BASE + ["lora.init_from_peft=a"])
    cfg = load_config(None, BASE + ["lora.enabled=true", "lora.init_from_peft=a"])
    assert cfg.lora.init_from_peft == "a" and "init_from_peft" not in cfg.lora.adapter_config()


def test_help_config_documents_the_lora_section():
    text = describe_config()
    assert (
        "lora.target_modules (a list of linear_qkv, linear_proj, linear_fc1, linear_fc2; default [linear_qkv," in text
    )
    for key in ("enabled", "rank", "alpha", "dropout", "experts", "init", "seed", "init_from_peft"):
        assert f"  lora.{key} (" in text


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("rank", 0, "lora.rank must be a positive integer"),
        ("alpha", 0.0, "lora.alpha must be a positive number"),
        ("dropout", 1.0, r"lora.dropout must be in \[0, 1\)"),
        ("target_modules", ["linear_qkv", "gate"], "lora.target_modules: unknown target module 'gate'"),
        ("target_modules", [], "lora.target_modules is empty"),
        ("init", "xavier", "lora.init='xavier'"),
    ],
)
def test_adapter_config_dict_is_checked_naming_the_field(field, value, message):
    """The contract dict (e.g. read back from a checkpoint or PEFT file) gets the same checks."""
    from megadiff.lora.apply import LoRAConfigError, check_adapter_config

    settings = load_config(None, BASE).lora.adapter_config() | {field: value}
    with pytest.raises(LoRAConfigError, match=message):
        check_adapter_config(**settings)
