"""The parameter table's shape rules give exactly the reference model's HF tensors."""

import pytest

from megadiff.hf.reference import build_reference_model
from megadiff.models.llada2.checkpoint_keys import units_for
from megadiff.models.llada2.hf_mapping import expected_hf_shapes
from megadiff.models.llada2.presets import preset


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"num_shared_experts": 0},
        {"first_k_dense_replace": 0},
        {"first_k_dense_replace": 2, "intermediate_size": 40},
    ],
    ids=["tiny", "no_shared_experts", "all_moe", "two_dense_layers"],
)
def test_table_shapes_are_the_reference_models_tensors(extra):
    cfg = dict(preset("tiny"), **extra)
    model = build_reference_model(cfg)
    want = {name: tuple(p.shape) for name, p in model.state_dict().items() if not name.endswith("inv_freq")}
    assert expected_hf_shapes(cfg) == want
    covered = [name for unit in units_for(cfg) for name in unit.hf]
    assert sorted(covered) == sorted(want)  # every HF tensor is in exactly one table row instance
