"""The LLaDA2 mapping objects are the legacy parameter table (megadiff.models.llada2.hf_mapping),
tensor for tensor and bit for bit: names, shapes, order, checkpoint keys, transforms and TP splits.
Issue 28 phase 2 moves the converters onto the objects; until then both exist and must agree."""

import pytest
import torch

from megadiff.models.common.mapping import QKV, Copy, GatedMLP
from megadiff.models.llada2 import LLaDA2ModelConfig, preset
from megadiff.models.llada2 import hf_mapping as legacy
from megadiff.models.llada2.checkpoint_keys import checkpoint_spec, other_spec_keys, units_for
from megadiff.models.llada2.mapping import TABLE

CONFIGS = {
    "tiny": preset("tiny"),
    "no_shared_all_moe": preset("tiny", num_shared_experts=0, first_k_dense_replace=0),
    "two_dense_mha": preset("tiny", first_k_dense_replace=2, intermediate_size=40, num_key_value_heads=4),
    "mini": preset("llada2-mini"),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_llada2_table_lists_the_legacy_tensors_in_the_legacy_order(name):
    d = CONFIGS[name]
    cfg = LLaDA2ModelConfig.from_hf_dict(d)
    old, new = legacy.row_instances(d), TABLE.instances(cfg)
    assert [(r.rule.mcore, r.layer, r.expert, r.hf, r.hf_shapes) for r in old] == [
        (i.mapping.mcore, i.layer, i.expert, i.hf, i.hf_shapes) for i in new
    ]
    assert list(legacy.expected_hf_shapes(d).items()) == list(TABLE.expected_hf_shapes(cfg).items())
    for spec in ("local", "te"):
        assert [(u.key, u.full_shape) for u in units_for(d, spec)] == [
            (i.checkpoint_key(spec), i.full_shape) for i in new
        ]
        keys = [u.key for u in units_for(d, spec)]
        assert TABLE.checkpoint_spec(keys, cfg) == checkpoint_spec(keys, d) == spec
    assert TABLE.other_spec_keys(cfg) == other_spec_keys(d)


def _legacy_names(d):
    """Every global megatron-core name under both specs, with the legacy row it maps to."""
    out = []
    for row in legacy.row_instances(d):
        for pattern in filter(None, (row.rule.mcore, row.rule.te_mcore)):
            index = {k: v for k, v in (("layer", row.layer), ("expert", row.expert)) if v is not None}
            out.append((pattern.format(**index), row))
    return out


def test_llada2_mapping_objects_transform_and_split_bit_exactly_like_the_legacy_rules():
    d = CONFIGS["tiny"]
    cfg = LLaDA2ModelConfig.from_hf_dict(d)
    g = torch.Generator().manual_seed(0)
    kinds = set()
    for name, row in _legacy_names(d):
        rule, index = legacy.rule_for(name)
        mapping, new_index = TABLE.for_mcore_name(name)
        assert (mapping.mcore, new_index, mapping.hf_names(new_index)) == (
            rule.mcore,
            index,
            legacy.hf_names(rule, index),
        )
        assert (mapping.param.split.name, mapping.expert, mapping.transform) == (
            rule.split,
            rule.expert,
            rule.transform,
        )
        hf = [torch.randn(shape, generator=g) for shape in row.hf_shapes]
        full = mapping.to_mcore(hf, cfg)
        assert torch.equal(full, legacy.full_mcore_from_hf(rule, hf, cfg))
        assert all(torch.equal(a, b) for a, b in zip(mapping.to_hf(full, cfg), hf, strict=True))
        for size in (1, 2, 4):
            if full.shape[0] % (2 * size) or (full.dim() > 1 and full.shape[1] % size):
                continue
            pieces = [mapping.shard(full, r, size) for r in range(size)]
            assert all(torch.equal(p, legacy.shard(rule, full, r, size)) for r, p in enumerate(pieces))
            assert torch.equal(mapping.unshard(pieces), full)
        kinds.add(type(mapping))
    assert kinds == {Copy, GatedMLP, type(TABLE.for_mcore_name("decoder.layers.0.self_attention.linear_qkv.weight")[0])}


def test_separate_qkv_regroups_heads_per_kv_group_and_splits_by_groups():
    """LLaDA / LLaDA-MoE q, k, v -> rows [q heads of group g, k_g, v_g] per group; TP rank r holds
    whole groups, so its rows are exactly its heads' q, k and v."""

    class Cfg:
        num_attention_heads, num_key_value_heads, head_dim = 4, 2, 3

    mapping = QKV(TABLE.for_mcore_name("decoder.layers.0.self_attention.linear_qkv.weight")[0].param, "q", "k", "v")
    q = torch.arange(12.0)[:, None].expand(12, 5)  # row = q head * 3 + dim
    k, v = 100 + torch.arange(6.0)[:, None].expand(6, 5), 200 + torch.arange(6.0)[:, None].expand(6, 5)
    full = mapping.to_mcore([q, k, v], Cfg)
    group0 = torch.cat([q[:6], k[:3], v[:3]])
    assert torch.equal(full[:12], group0) and torch.equal(mapping.shard(full, 0, 2), group0)
    assert all(torch.equal(a, b) for a, b in zip(mapping.to_hf(full, Cfg), (q, k, v), strict=True))
