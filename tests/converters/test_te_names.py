"""Checkpoints under Transformer Engine names (what a TE model saves), written and read on CPU
without Transformer Engine through the parameter table: converters, exporter and loaders read
either spec's names, in both directions, bit-exactly.

The single-process converter run (conftest) makes the chain ck111 (local names) -> HF -> te1
(--spec te) -> HF -> te2 (--spec te), and -> local2 (--spec local); the 4-process run loads te1
into the local-spec model at TP2/EP2/PP2 and asks the local ck111 for a TE model's keys.
"""

import os

import pytest
import torch

from megadiff.checkpoint import DistCheckpointReader, read_meta
from megadiff.hf.reference import load_reference_model
from megadiff.inference.loading import load_reference_from_mcore
from megadiff.models.llada2.checkpoint_keys import checkpoint_spec, other_spec_keys, units_for
from tests.converters.test_moe_convertor import assert_same_checkpoint
from tests.converters.test_roundtrip import LOGIT_TOL, export

MOE_NORM_TE, MOE_NORM_LOCAL = (
    "decoder.layers.1.pre_mlp_layernorm.weight",
    "decoder.layers.1.mlp.linear_fc1.layer_norm_weight",
)
DENSE_NORM = "decoder.layers.0.mlp.linear_fc1.layer_norm_weight"  # both specs: fused into fc1


def _reader(root):
    return DistCheckpointReader(os.path.join(root, "iter_0000000"))


def _objects(root):
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    metadata = FileSystemReader(os.path.join(root, "iter_0000000")).read_metadata().state_dict_metadata
    return {k for k, v in metadata.items() if isinstance(v, BytesStorageMetadata)}


def assert_same_tensors(a_root, b_root):
    """Every tensor of two checkpoints equal bit for bit (same keys, dtypes and values)."""
    a, b = _reader(a_root), _reader(b_root)
    assert a.keys() == b.keys()
    for key in a.keys():
        x, y = a.read(key), b.read(key)
        assert x.dtype == y.dtype and torch.equal(x.view(torch.uint8), y.view(torch.uint8)), key


def test_table_names_the_moe_pre_mlp_norm_differently_per_spec():
    from megadiff.models.llada2.presets import preset

    cfg = preset("tiny")
    local = {u.key for u in units_for(cfg, "local")}
    te = {u.key for u in units_for(cfg, "te")}
    moe_layers = cfg["num_hidden_layers"] - cfg["first_k_dense_replace"]
    assert local - te == {
        f"decoder.layers.{i}.mlp.linear_fc1.layer_norm_weight"
        for i in range(cfg["first_k_dense_replace"], cfg["num_hidden_layers"])
    }
    assert len(te - local) == moe_layers and MOE_NORM_TE in te and DENSE_NORM in te and DENSE_NORM in local
    renames = other_spec_keys(cfg)
    assert renames[MOE_NORM_LOCAL] == MOE_NORM_TE and renames[MOE_NORM_TE] == MOE_NORM_LOCAL
    assert checkpoint_spec(te, cfg) == "te" and checkpoint_spec(local, cfg, recorded="te") == "local"
    with pytest.raises(KeyError, match="decoder.layers.0.self_attention.linear_qkv.weight"):
        checkpoint_spec(local - {"decoder.layers.0.self_attention.linear_qkv.weight"}, cfg)


@pytest.mark.slow  # shares the single-process megatron run
def test_converter_writes_te_names_through_the_table(single_process_run):
    te1 = single_process_run["te1"]
    meta = read_meta(te1)
    assert meta["spec"] == "te" and read_meta(single_process_run["ck111"])["spec"] == "local"
    keys = set(_reader(te1).keys())
    assert keys == {u.key for u in units_for(meta["hf_config"], "te")}
    assert MOE_NORM_TE in keys and MOE_NORM_LOCAL not in keys and DENSE_NORM in keys
    # The local linears' `_extra_state` objects (None) are written as for the local spec; the ones
    # only TE modules have are not invented (megadiff.checkpoint.dist gives a TE model its own).
    assert _objects(te1) == _objects(single_process_run["ck111"]) and _objects(te1)


@pytest.mark.slow
def test_te_named_to_hf_to_te_named_is_bit_exact(single_process_run, tiny_hf, tmp_path):
    assert_same_checkpoint(tiny_hf, export(single_process_run["te1"], tmp_path / "hf"))
    assert_same_tensors(single_process_run["te1"], single_process_run["te2"])


@pytest.mark.slow
def test_local_to_te_named_to_local_is_bit_exact(single_process_run):
    assert_same_tensors(single_process_run["ck111"], single_process_run["local2"])
    # the same bytes under the other key: te1 holds exactly ck111's tensors
    local, te = _reader(single_process_run["ck111"]), _reader(single_process_run["te1"])
    assert torch.equal(local.read(MOE_NORM_LOCAL), te.read(MOE_NORM_TE))


@pytest.mark.slow
def test_reference_model_loads_from_te_names_with_the_same_logits(single_process_run, tiny_hf):
    model = load_reference_from_mcore(single_process_run["te1"])
    reference = load_reference_model(tiny_hf)
    ids = torch.randint(0, 400, (2, 12), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(12).expand(2, 12)
    with torch.no_grad():
        assert torch.equal(model(ids, pos).logits, reference(ids, pos).logits)


@pytest.mark.dist
@pytest.mark.slow
def test_local_spec_model_loads_te_names_with_reference_logits(four_process_run):
    loaded = four_process_run["results"]["te1@tp=2,ep=2,etp=1,pp=2"]
    assert loaded["weights"] == 0.0 and loaded["logits"] <= LOGIT_TOL, loaded


@pytest.mark.dist
@pytest.mark.slow
def test_te_request_loads_a_local_checkpoint_keeping_its_own_extra_state(four_process_run):
    result = four_process_run["results"]["te_request:ck111"]
    assert result["renamed"] > 0, result  # this rank's MoE pre-MLP norms were asked for under TE keys
    assert result["max_diff"] == 0.0 and result["same_keys"] and result["extra_state_kept"], result
