"""tools/moe_convertor.py: dFactory's merged-expert layout and back, bit for bit."""

import json
import os

import pytest
import torch

from checkpoint_converters.moe import convert_expert_layout
from megadiff.errors import CheckpointError
from megadiff.hf.checkpoint_reader import HFCheckpointReader
from megadiff.models.llada2.hf_experts import expected_shapes

QUIET = dict(progress=False, log=lambda *a: None)


def assert_same_checkpoint(a, b):
    """Same tensor names, shapes, dtypes and bytes, and the same config.json."""
    ra, rb = HFCheckpointReader(a), HFCheckpointReader(b)
    assert ra.names() == rb.names()
    for name in ra.names():
        x, y = ra.get(name), rb.get(name)
        assert (x.dtype, x.shape) == (y.dtype, y.shape), name
        assert torch.equal(x, y), name
    with open(os.path.join(a, "config.json")) as fa, open(os.path.join(b, "config.json")) as fb:
        assert json.load(fa) == json.load(fb)


def test_merged_layout_has_dfactory_names_and_shapes(tiny_hf, tiny_hf_merged):
    reader = HFCheckpointReader(tiny_hf_merged)
    config = json.load(open(os.path.join(tiny_hf, "config.json")))
    e, fm, h = config["num_experts"], config["moe_intermediate_size"], config["hidden_size"]
    assert reader.shape("model.layers.1.mlp.experts.gate_proj") == (e, fm, h)
    assert reader.shape("model.layers.1.mlp.experts.up_proj") == (e, fm, h)
    assert reader.shape("model.layers.1.mlp.experts.down_proj") == (e, h, fm)
    assert not any(".experts.0." in n for n in reader.names())
    assert {n: reader.shape(n) for n in reader.names()} == dict(expected_shapes(config, "merged"))
    split = HFCheckpointReader(tiny_hf)
    for j in range(e):
        assert torch.equal(
            reader.get("model.layers.2.mlp.experts.down_proj")[j],
            split.get(f"model.layers.2.mlp.experts.{j}.down_proj.weight"),
        )


def test_merge_then_split_is_bit_identical_and_copies_files(tiny_hf, tiny_hf_merged, tmp_path):
    out = convert_expert_layout(tiny_hf_merged, str(tmp_path / "split"), "split", max_shard_size="200KB", **QUIET)
    assert_same_checkpoint(tiny_hf, out)
    files = set(os.listdir(out))
    assert {
        "tokenizer.json",
        "tokenizer_config.json",
        "configuration_llada2_moe.py",
        "modeling_llada2_moe.py",
        "model.safetensors.index.json",
    } <= files
    assert len([f for f in files if f.endswith(".safetensors")]) > 1


def test_bf16_merge_keeps_dtypes(tiny_hf_bf16, tmp_path):
    merged = convert_expert_layout(tiny_hf_bf16, str(tmp_path / "m"), "merge", **QUIET)
    back = convert_expert_layout(merged, str(tmp_path / "s"), "split", **QUIET)
    assert HFCheckpointReader(merged).dtype_str("model.layers.1.mlp.experts.gate_proj") == "BF16"
    assert HFCheckpointReader(merged).dtype_str("model.layers.1.mlp.gate.expert_bias") == "F32"
    assert_same_checkpoint(tiny_hf_bf16, back)


@pytest.mark.parametrize("mode, fixture", [("merge", "tiny_hf_merged"), ("split", "tiny_hf")])
def test_converting_to_the_layout_it_already_has_is_refused(mode, fixture, request, tmp_path):
    with pytest.raises(CheckpointError, match="already"):
        convert_expert_layout(request.getfixturevalue(fixture), str(tmp_path / "o"), mode, **QUIET)
    assert not os.listdir(tmp_path)
