"""config.json fields of the wrong type or range are refused naming config.json and the field,
instead of a bare TypeError later or a silently wrong model."""

import pytest

from megadiff.models.llada2 import ConfigError, LLaDA2ModelConfig, preset


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("rope_theta", "abc", 'rope_theta: must be a number, got "abc"'),
        ("first_k_dense_replace", "1", 'first_k_dense_replace: must be an integer, got "1"'),
        ("partial_rotary_factor", None, "partial_rotary_factor: must be a number, got null"),
        ("head_dim", 16.0, "head_dim: must be an integer, got 16.0"),
        ("rms_norm_eps", -1, "rms_norm_eps: must be a positive number, got -1.0"),
        ("rope_theta", float("nan"), "rope_theta: must be a finite number, got nan"),
        ("norm_topk_prob", "false", 'norm_topk_prob: must be true or false, got "false"'),
        ("num_experts", 8.0, "num_experts: must be an integer, got 8.0"),
        ("n_group", 0, "n_group: must be a positive integer, got 0"),
        ("max_position_embeddings", -4, "max_position_embeddings: must be a positive integer, got -4"),
        ("eos_token_id", "2", 'eos_token_id: must be an integer, got "2"'),
    ],
)
def test_config_json_field_of_wrong_type_is_named(field, value, message):
    cfg = preset("tiny", **{field: value})
    with pytest.raises(ConfigError, match="^my/config.json: " + message.replace("(", r"\(")):
        LLaDA2ModelConfig.from_hf_dict(cfg, source="my/config.json")


def test_nulls_that_hf_reads_as_defaults_still_load():
    cfg = LLaDA2ModelConfig.from_hf_dict(
        preset("tiny", head_dim=None, n_group=None, topk_group=None, num_shared_experts=None, pad_token_id=None)
    )
    assert cfg.head_dim == cfg.hidden_size // cfg.num_attention_heads and cfg.n_group == 1 and cfg.topk_group == 1
    assert isinstance(LLaDA2ModelConfig.from_hf_dict(preset("tiny", rope_theta=600000)).rope_theta, float)
