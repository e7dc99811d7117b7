"""Bit-equality of two converter outputs (the plain and the fast I/O path write the same thing).

Files need not be byte-identical (the plain dist checkpoint has one file per tensor, safetensors'
save_file orders a header its own way); what a loader sees must be: the same key set, the same
metadata (shapes, dtypes, chunks, index), and the same tensor bytes."""

import json
import os

import torch
from safetensors import safe_open

from megadiff.checkpoint import DistCheckpointReader, read_meta, resolve_checkpoint_dir
from megadiff.checkpoint.untrusted import read_dcp_metadata
from megadiff.hf.checkpoint_reader import HFCheckpointReader

_META_FIELDS_THAT_DIFFER = ("saved_at",)


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (NaN payloads and -0.0 included, unlike torch.equal)."""
    if (a.dtype, a.shape) != (b.dtype, b.shape):
        return False
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def assert_same_hf_output(a: str, b: str) -> None:
    """Two HF dirs: same tensors (names, dtypes, shapes, bytes), same shard of every tensor
    (index weight_map and total_size), same shard metadata, same config.json."""
    ra, rb = HFCheckpointReader(a), HFCheckpointReader(b)
    assert ra.names() == rb.names()
    for name in ra.names():
        assert ra.file_of(name) == rb.file_of(name), name
        assert same_bytes(ra.get(name), rb.get(name)), name
    index = "model.safetensors.index.json"
    with open(os.path.join(a, index)) as fa, open(os.path.join(b, index)) as fb:
        assert json.load(fa) == json.load(fb)
    for shard in sorted(set(ra.file_of(n) for n in ra.names())):
        with safe_open(os.path.join(a, shard), "pt") as fa, safe_open(os.path.join(b, shard), "pt") as fb:
            assert fa.metadata() == fb.metadata(), shard
    with open(os.path.join(a, "config.json")) as fa, open(os.path.join(b, "config.json")) as fb:
        assert json.load(fa) == json.load(fb)


def assert_same_dist_checkpoint(a: str, b: str) -> None:
    """Two megadiff checkpoints (roots or iteration dirs): same megadiff.json (but its time), same
    DCP keys with the same global shapes, dtypes and chunks, the same bytes in every chunk, and
    the same common state."""
    da, db = resolve_checkpoint_dir(a), resolve_checkpoint_dir(b)
    ma, mb = read_meta(da), read_meta(db)
    for field in _META_FIELDS_THAT_DIFFER:
        ma.pop(field), mb.pop(field)
    assert ma == mb
    sa, sb = read_dcp_metadata(da).state_dict_metadata, read_dcp_metadata(db).state_dict_metadata
    assert sorted(sa) == sorted(sb)
    ra, rb = DistCheckpointReader(da), DistCheckpointReader(db)
    for key, meta in sa.items():
        other = sb[key]
        assert type(meta) is type(other), key
        if not hasattr(meta, "chunks"):
            continue  # a byte item (common state, extra state): compared below where it matters
        assert (meta.size, meta.properties.dtype) == (other.size, other.properties.dtype), key
        chunks = sorted((tuple(c.offsets), tuple(c.sizes)) for c in meta.chunks)
        assert chunks == sorted((tuple(c.offsets), tuple(c.sizes)) for c in other.chunks), key
        for offsets, sizes in chunks:
            assert same_bytes(ra.read(key, offsets, sizes), rb.read(key, offsets, sizes)), (key, offsets)
    common_a, common_b = os.path.join(da, "common.pt"), os.path.join(db, "common.pt")
    assert os.path.isfile(common_a) == os.path.isfile(common_b)
    if os.path.isfile(common_a):
        assert torch.load(common_a, weights_only=False) == torch.load(common_b, weights_only=False)
