"""Checkpoint keys the two megatron-core specs name differently come from the model family's table
(megadiff.checkpoint.dist.other_spec_keys), so a run of any family saves and resumes under either
spec: the MoE layers' pre-MLP norm (`pre_mlp_layernorm.weight` under TE, fused into fc1 as
`mlp.linear_fc1.layer_norm_weight` under the local spec) for LLaDA2, as before, and LLaDA-MoE; a
dense LLaDA has none (its norms are fused into fc1 under both specs). Keys embedding a model key
(optimizer state) follow it."""

import pytest

from megadiff.checkpoint.dist import key_in_other_spec, other_spec_keys
from megadiff.models.registry import family

NORMS = ("pre_mlp_layernorm.weight", "mlp.linear_fc1.layer_norm_weight")


def moe_norm_renames(moe_layers):
    return {f"decoder.layers.{i}.{a}": f"decoder.layers.{i}.{b}" for i in moe_layers for a, b in (NORMS, NORMS[::-1])}


@pytest.mark.parametrize(
    "name, moe_layers",
    [
        ("llada2", lambda cfg: range(cfg["first_k_dense_replace"], cfg["num_hidden_layers"])),
        ("lladamoe", lambda cfg: [i for i, moe in enumerate(cfg["moe_layer_freq"]) if moe]),
        ("llada", lambda cfg: []),
    ],
)
def test_keys_renamed_between_specs_come_from_the_family(name, moe_layers):
    cfg = family(name).preset("tiny")
    renames = other_spec_keys(cfg)
    assert renames == moe_norm_renames(moe_layers(cfg))
    for local, te in list(renames.items())[:2]:
        assert key_in_other_spec(f"optimizer.state.exp_avg.{local}", renames) == f"optimizer.state.exp_avg.{te}"
