"""The streaming safetensors writer produces ordinary HF shards, split by size, in plan order."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from checkpoint_converters.safetensors_stream import INDEX_NAME, ShardedSafetensorsWriter, parse_size
from megadiff.hf.checkpoint_reader import HFCheckpointReader


def tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "a": torch.randn(100, 10, generator=g),  # 4000 B
        "b": torch.randn(7, generator=g).to(torch.bfloat16),  # 14 B: odd size, alignment of the next
        "c": torch.randint(0, 9, (3, 5), generator=g),  # int64
        "d": torch.randn(50, 20, generator=g).to(torch.float16),  # 2000 B
        "e": torch.zeros(0, 4),  # empty
    }


def write(out_dir, max_shard_size):
    ts = tensors()
    writer = ShardedSafetensorsWriter(
        str(out_dir), [(n, tuple(t.shape), t.dtype) for n, t in ts.items()], max_shard_size
    )
    for name, t in ts.items():
        writer.write(name, t)
    writer.close()
    return ts


def test_shards_hold_exact_tensors_and_index_maps_every_name(tmp_path):
    ts = write(tmp_path, 4100)
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    files = sorted(set(index["weight_map"].values()))
    assert files == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert index["weight_map"]["a"] == files[0] and index["weight_map"]["d"] == files[1]
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in ts.values())
    loaded = {}
    for f in files:
        loaded.update(load_file(str(tmp_path / f)))
    assert sorted(loaded) == sorted(ts)
    for name, t in ts.items():
        assert loaded[name].dtype == t.dtype and torch.equal(loaded[name], t)
    reader = HFCheckpointReader(str(tmp_path))  # what the converters read with
    assert torch.equal(reader.get("b"), ts["b"])


def test_a_tensor_larger_than_the_limit_gets_its_own_shard(tmp_path):
    write(tmp_path, 100)
    assert len([f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]) == 4  # e joins d (0 B)


def test_writes_out_of_plan_order_or_shape_are_refused(tmp_path):
    writer = ShardedSafetensorsWriter(str(tmp_path), [("x", (2,), torch.float32), ("y", (2,), torch.float32)], "1GB")
    with pytest.raises(ValueError, match="plan expects 'x'"):
        writer.write("y", torch.zeros(2))
    with pytest.raises(ValueError, match="planned"):
        writer.write("x", torch.zeros(3))
    writer.write("x", torch.zeros(2))
    with pytest.raises(ValueError, match="'y' and 0 more not written"):
        writer.close()
    writer.abort()


@pytest.mark.parametrize(
    "text, value", [("5GB", 5 * 10**9), ("500MB", 5 * 10**8), ("2GiB", 2 * 2**30), (123, 123), ("1.5kb", 1500)]
)
def test_parse_size_uses_hf_units(text, value):
    assert parse_size(text) == value


def test_parse_size_rejects_nonsense():
    with pytest.raises(ValueError, match="cannot parse size"):
        parse_size("lots")
