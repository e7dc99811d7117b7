"""HF -> megatron -> HF is exact at any layout, and what comes back runs like the original.

The megatron side runs in two launches shared by the whole suite (conftest): one plain process
converting at (1,1,1), one 4-process torchrun converting at TP2/EP2/PP2 and loading checkpoints
across layouts. The exports below need neither megatron-core nor a process group.

Both I/O paths, every time: the launches convert through the plain path too (`<output>-plain`),
and `export` exports through both; the outputs must be bit-equal (same_outputs).
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from checkpoint_converters.mcore_to_hf import convert_mcore_to_hf
from megadiff.checkpoint import DistCheckpointReader, latest_iteration, read_meta
from megadiff.hf.checkpoint_reader import HFCheckpointReader
from megadiff.hf.reference import load_reference_model
from megadiff.inference.loading import load_reference_from_mcore
from tests.converters.same_outputs import assert_same_dist_checkpoint, assert_same_hf_output
from tests.converters.test_moe_convertor import assert_same_checkpoint

QUIET = dict(progress=False, log=lambda *a: None)
LOGIT_TOL = 1e-4


def export(ckpt, out, **kwargs):
    """Export through the byte-copy engine to OUT and through the plain path to OUT-plain; the two
    must be bit-equal. Returns OUT."""
    fast = convert_mcore_to_hf(ckpt, str(out), io_mode="fast", **kwargs, **QUIET)
    plain = convert_mcore_to_hf(ckpt, f"{out}-plain", io_mode="plain", **kwargs, **QUIET)
    assert_same_hf_output(fast, plain)
    return fast


@pytest.mark.slow
def test_plain_io_path_writes_the_same_checkpoints_in_one_process(single_process_run):
    for name in single_process_run["plain_twins"]:
        assert_same_dist_checkpoint(single_process_run[name], single_process_run[name] + "-plain")
    for exported in single_process_run["exports"]:  # the worker's exports, through both paths
        assert_same_hf_output(str(exported), f"{exported}-plain")


@pytest.mark.dist
@pytest.mark.slow
def test_plain_io_path_writes_the_same_checkpoints_at_tp2_ep2_pp2(four_process_run):
    for name in four_process_run["plain_twins"]:
        fast, plain = four_process_run[name], four_process_run[name] + "-plain"
        assert_same_dist_checkpoint(fast, plain)
        assert len([f for f in os.listdir(os.path.join(plain, "iter_0000000")) if f.endswith(".distcp")]) > 4


@pytest.mark.dist
@pytest.mark.slow
def test_hf_to_tp2_ep2_pp2_to_hf_is_bit_identical(four_process_run, tiny_hf, tmp_path):
    ck = four_process_run["ck222"]
    meta = read_meta(ck)
    assert meta["layout"] == {"tp": 2, "ep": 2, "etp": 1, "pp": 2, "vpp": None}
    assert (meta["iteration"], meta["dtype"], meta["world_size"]) == (0, "fp32", 4)
    assert meta["hf_source_dir"] == os.path.abspath(tiny_hf)
    assert len([f for f in os.listdir(os.path.join(ck, "iter_0000000")) if f.endswith(".distcp")]) == 4
    out = export(ck, tmp_path / "hf", max_shard_size="300KB")
    assert_same_checkpoint(tiny_hf, out)
    assert len([f for f in os.listdir(out) if f.endswith(".safetensors")]) > 1


@pytest.mark.dist
@pytest.mark.slow
def test_bf16_round_trip_keeps_dtypes(four_process_run, tiny_hf_bf16, tmp_path):
    ck = four_process_run["ck222_bf16"]
    assert read_meta(ck)["dtype"] == "bf16"
    reader = DistCheckpointReader(os.path.join(ck, "iter_0000000"))
    assert reader.dtype("decoder.layers.1.self_attention.linear_qkv.weight") == torch.bfloat16
    assert reader.dtype("decoder.layers.1.mlp.router.expert_bias") == torch.float32
    assert_same_checkpoint(tiny_hf_bf16, export(ck, tmp_path / "hf"))


@pytest.mark.slow
def test_merged_input_at_111_exports_the_split_original(single_process_run, tiny_hf, tiny_hf_merged, tmp_path):
    ck = single_process_run["ck111_merged"]
    meta = read_meta(ck)
    assert meta["layout"] == {"tp": 1, "ep": 1, "etp": 1, "pp": 1, "vpp": None}  # one process saves at (1,1,1)
    assert meta["extra"]["requested_layout"] == {"tp": 2, "ep": 2, "etp": 1, "pp": 2, "vpp": None}
    assert meta["extra"]["hf_expert_format"] == "merged"
    assert_same_checkpoint(tiny_hf, export(ck, tmp_path / "split"))
    assert_same_checkpoint(tiny_hf_merged, export(ck, tmp_path / "merged", merged_experts=True))


@pytest.mark.dist
@pytest.mark.slow
def test_checkpoints_load_across_layouts_with_reference_logits(four_process_run):
    results = four_process_run["results"]
    cross = {
        "ck111@tp=2,ep=2,etp=1,pp=2": {"tp": 1, "ep": 1, "etp": 1, "pp": 1, "vpp": None},
        "ck222@tp=1,ep=1,etp=1,pp=1": {"tp": 2, "ep": 2, "etp": 1, "pp": 2, "vpp": None},
    }
    for key, saved_at in cross.items():
        assert results[key]["saved_layout"] == saved_at, key
        assert results[key]["weights"] == 0.0, (key, results[key])
        assert results[key]["logits"] <= LOGIT_TOL, (key, results[key])
    vpp = results["ck222@tp=1,ep=1,etp=1,pp=2,vpp=2"]  # 'model0'/'model1' state keys
    assert vpp["weights"] == 0.0, vpp


@pytest.mark.dist
@pytest.mark.slow
def test_training_checkpoint_ignores_optimizer_state(four_process_run, tiny_hf, tmp_path):
    saved = four_process_run["results"]["save"]
    root = four_process_run["trained"]
    assert saved["path"] == os.path.join(root, "iter_0000007") and latest_iteration(root) == 7
    assert saved["exp_avg"] == [7.0] * 4 and saved["scheduler"] == {"lr": 0.5} and saved["extra"] == {"step": 7}
    assert open(os.path.join(root, "latest_checkpointed_iteration.txt")).read().strip() == "7"
    loaded = four_process_run["results"]["trained@tp=1,ep=1,etp=1,pp=1"]
    assert loaded["weights"] == 0.0 and loaded["logits"] <= LOGIT_TOL, loaded
    assert_same_checkpoint(tiny_hf, export(root, tmp_path / "hf"))  # optimizer keys are not exported


@pytest.mark.slow
def test_reference_model_from_mcore_in_a_plain_process(single_process_run, tiny_hf):
    model = load_reference_from_mcore(single_process_run["ck111"])
    assert not torch.distributed.is_initialized()
    reference = load_reference_model(tiny_hf)
    ids = torch.randint(0, 400, (2, 12), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(12).expand(2, 12)
    with torch.no_grad():
        assert torch.equal(model(ids, pos).logits, reference(ids, pos).logits)
    bf16 = load_reference_from_mcore(os.path.join(single_process_run["ck111"], "iter_0000000"), dtype=torch.bfloat16)
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}


AUTO_LOAD = """
import sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
ids = torch.randint(0, 400, (2, 12), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    logits = model(ids, position_ids=torch.arange(12).expand(2, 12)).logits
torch.save({"logits": logits, "module": type(model).__module__}, sys.argv[2])
"""


@pytest.mark.slow
def test_export_loads_with_transformers_remote_code(single_process_run, tiny_hf, tmp_path):
    out = export(single_process_run["ck111"], tmp_path / "hf")
    files = set(os.listdir(out))
    assert {
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "configuration_llada2_moe.py",
        "modeling_llada2_moe.py",
        "model.safetensors.index.json",
    } <= files
    with open(os.path.join(out, "config.json")) as f, open(os.path.join(tiny_hf, "config.json")) as g:
        assert json.load(f) == json.load(g)
    result = tmp_path / "auto.pt"
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf_home"), PYTHONWARNINGS="ignore")
    # a fresh interpreter that never imports megadiff: only the copied remote code can build the model
    proc = subprocess.run(
        [sys.executable, "-c", AUTO_LOAD, out, str(result)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=str(tmp_path),
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(result)
    assert got["module"].startswith("transformers_modules"), got["module"]
    reference = load_reference_model(tiny_hf)
    ids = torch.randint(0, 400, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = reference(ids, torch.arange(12).expand(2, 12)).logits
    assert float((got["logits"] - want).abs().max()) <= LOGIT_TOL


@pytest.mark.slow
def test_export_without_template_uses_megadiff_remote_code(single_process_run, tiny_hf, tmp_path):
    import shutil

    ck = tmp_path / "ck"
    shutil.copytree(single_process_run["ck111"], ck)
    meta_path = ck / "iter_0000000" / "megadiff.json"
    meta = json.loads(meta_path.read_text())
    meta["hf_source_dir"] = str(tmp_path / "gone")
    meta_path.write_text(json.dumps(meta))
    out = export(str(ck), tmp_path / "hf")
    files = set(os.listdir(out))
    assert {"configuration_llada2_moe.py", "modeling_llada2_moe.py", "generation_config.json"} <= files
    assert "tokenizer.json" not in files
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_llada2_moe.LLaDA2MoeModelLM"
    assert HFCheckpointReader(out).names() == HFCheckpointReader(tiny_hf).names()


@pytest.mark.dist
@pytest.mark.slow
def test_reader_boxes_across_shards_match_torch_dcp(four_process_run):
    """Boxes spanning TP / EP shards of a (2,2,2) checkpoint: the direct reader equals torch DCP's."""
    reader = DistCheckpointReader(os.path.join(four_process_run["ck222"], "iter_0000000"))
    boxes = [
        ("embedding.word_embeddings.weight", None, None),
        ("decoder.layers.1.mlp.experts.experts.linear_fc1.weight", (2, 10, 0), (4, 40, 64)),
        ("decoder.layers.3.self_attention.linear_qkv.weight", (5, 3), (100, 20)),
        ("decoder.layers.2.mlp.router.expert_bias", (1,), (6,)),
    ]
    direct = reader.read_many(boxes)
    reader._direct = False
    for a, b in zip(direct, reader.read_many(boxes), strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)
