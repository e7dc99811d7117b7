"""Bad LLaDA2 configs and layouts fail fast, naming the field."""

import pytest

from megadiff.models.llada2 import ConfigError, LLaDA2ModelConfig, ParallelLayout, preset


def load(**overrides):
    cfg = preset("tiny", **overrides)
    return LLaDA2ModelConfig.from_hf_dict(cfg, source="my/config.json")


def test_tiny_preset_has_every_llada2_feature_on():
    cfg = load()
    assert cfg.num_key_value_heads < cfg.num_attention_heads  # GQA
    assert cfg.use_qk_norm and cfg.partial_rotary_factor == 0.5
    assert cfg.num_shared_experts >= 1 and cfg.first_k_dense_replace == 1
    assert cfg.num_experts >= 8 and cfg.n_group >= 4 and cfg.num_experts_per_tok > 1
    assert cfg.moe_layer_pattern == [0, 1, 1, 1]


def test_mini_and_flash_presets_validate():
    for name, layers in (("llada2-mini", 20), ("llada2-flash", 32)):
        cfg = LLaDA2ModelConfig.from_hf_dict(preset(name))
        cfg.validate_layout(ParallelLayout(tp=4, ep=8))  # raises if the layout does not fit
        assert cfg.num_hidden_layers == layers and cfg.rotary_dim == 64 and cfg.moe_layer_pattern[:2] == [0, 1]


@pytest.mark.parametrize(
    "layout, field",
    [
        (ParallelLayout(tp=4), "num_key_value_heads=2 is not divisible by --tp 4"),
        (ParallelLayout(ep=3), "num_experts=8 is not divisible by --ep 3"),
        (ParallelLayout(pp=3), "num_hidden_layers=4 is not divisible by pp*vpp=3"),
        (ParallelLayout(pp=2, vpp=4), "num_hidden_layers=4 is not divisible by pp*vpp=8"),
    ],
)
def test_layout_not_dividing_model_names_field(layout, field):
    with pytest.raises(ConfigError, match=field.replace("*", r"\*")):
        load().validate_layout(layout)


def test_error_suggests_working_tp_values():
    with pytest.raises(ConfigError, match=r"use --tp 1, 2"):
        load().validate_layout(ParallelLayout(tp=4))


def test_etp_must_equal_tp_without_expert_parallelism():
    with pytest.raises(ConfigError, match="--etp must equal --tp"):
        ParallelLayout(tp=2, ep=1, etp=1)
    assert ParallelLayout(tp=2).etp == 2 and ParallelLayout(tp=2, ep=2).etp == 1


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(n_group=3), "n_group: 3 does not divide num_experts=8"),
        (dict(score_function="softmax"), "score_function: unknown score function 'softmax'"),
        (dict(model_type="llama"), "model_type: 'llama' is not a LLaDA2 model"),
        (dict(num_key_value_heads=3), "num_key_value_heads: 3 does not divide num_attention_heads=4"),
        (dict(topk_group=3, n_group=2), "topk_group: 3 must be in 1..n_group=2"),
        (dict(num_experts_per_tok=6), "num_experts_per_tok: .* must be 2\\*topk_group"),
        (dict(tie_word_embeddings=True), "tie_word_embeddings: must be false"),
    ],
)
def test_bad_field_is_named(overrides, message):
    with pytest.raises(ConfigError, match="my/config.json: " + message):
        load(**overrides)


@pytest.mark.parametrize("field", ["hidden_size", "num_experts", "num_hidden_layers", "vocab_size"])
def test_missing_required_field_is_named(field):
    cfg = preset("tiny")
    del cfg[field]
    with pytest.raises(ConfigError, match=f"my/config.json: {field}: required field is missing"):
        LLaDA2ModelConfig.from_hf_dict(cfg, source="my/config.json")


def test_bailing_moe_v2_model_type_is_accepted():
    assert load(model_type="bailing_moe_v2").num_experts == 8
