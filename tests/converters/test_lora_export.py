"""Exports of LoRA adapters: the merged model (W + alpha/r * B @ A) and the PEFT adapter.

The oracle is peft itself: the reference model from the base HF dir with the PEFT adapter loaded
by `peft` must give the merged export's logits (fp32, max |diff| / max |logit| <= 1e-5). The merged export must
reproduce the trainer's logits (megatron-core model with adapters vs the reference loaded from the
merged dir, <= 1e-4 as every layout parity test). Bases: the suite's converted tiny checkpoint
(conftest's ck111, fp32, the weights of the tiny HF dir) and, through a LoRA run, the HF dir itself.
"""

import os

import pytest
import torch

from checkpoint_converters.mcore_to_hf import convert_mcore_to_hf
from megadiff.errors import CheckpointError
from megadiff.hf.checkpoint_reader import HFCheckpointReader, read_hf_config
from megadiff.hf.reference import load_reference_model
from megadiff.lora.merge import hf_deltas
from megadiff.lora.peft_format import to_peft, write_peft_adapter
from tests.converters.conftest import WORKERS
from tests.dist.launch import run_torchrun
from tests.lora.peft_reference import peft_reference, random_full_adapter, rel_err

QUIET = dict(progress=False, log=lambda *a: None)
TOL = 1e-5
ALL = ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]
LORA = dict(rank=4, alpha=8.0, dropout=0.0, target_modules=ALL, experts=True, init="kaiming", seed=0)


def logits(model):
    return logits_of(model, torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0)))


def logits_of(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(scope="module")
def adapters(tiny_hf, tmp_path_factory):
    """A random adapter on every target (routed experts too) and the same adapter as a PEFT dir."""
    hf_config = read_hf_config(tiny_hf)
    full = random_full_adapter(LORA, hf_config, seed=3)
    peft_dir = str(tmp_path_factory.mktemp("lora_export") / "peft")
    write_peft_adapter(peft_dir, *to_peft(full, LORA, hf_config, base_model_name_or_path=tiny_hf))
    return full, hf_config, logits(peft_reference(tiny_hf, peft_dir))


@pytest.mark.parametrize("io_mode", ["auto", "plain"])
def test_merged_export_of_an_mcore_base_equals_peft_on_the_reference(single_process_run, adapters, tmp_path, io_mode):
    full, hf_config, with_peft = adapters
    ck111 = single_process_run["ck111"]
    deltas = hf_deltas(full, LORA, hf_config)
    out = convert_mcore_to_hf(ck111, str(tmp_path / "merged"), deltas=deltas, io_mode=io_mode, **QUIET)
    merged = logits(load_reference_model(out))
    base = logits(load_reference_model(convert_mcore_to_hf(ck111, str(tmp_path / "base"), io_mode=io_mode, **QUIET)))
    assert (merged - base).abs().max() > 0.1  # the adapters matter
    assert rel_err(merged, with_peft) <= TOL
    reader = HFCheckpointReader(out)
    untouched = "model.layers.1.attention.query_layernorm.weight"
    assert torch.equal(reader.get(untouched), HFCheckpointReader(str(tmp_path / "base")).get(untouched))


def test_a_delta_for_a_weight_the_checkpoint_lacks_is_refused_before_writing(single_process_run, adapters, tmp_path):
    full, hf_config, _ = adapters
    deltas = dict(hf_deltas(full, LORA, hf_config), **{"model.layers.9.attention.dense.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match=r"has no weight 'model\.layers\.9\.attention\.dense\.weight'"):
        convert_mcore_to_hf(single_process_run["ck111"], str(tmp_path / "out"), deltas=deltas, **QUIET)
    assert not (tmp_path / "out").exists()


@pytest.mark.dist
@pytest.mark.slow
def test_a_lora_run_exports_merged_and_peft_and_restarts_from_its_peft_adapter(tiny_run_dir, tmp_path):
    """A 2-process LoRA run at EP=2 (routed experts adapted) saves its adapter-only checkpoint; the
    tool exports it merged and as PEFT; a run with lora.init_from_peft starts from the same model."""
    out = tmp_path / "logits.pt"
    run_torchrun(
        2,
        os.path.join(WORKERS, "lora_export_run.py"),
        ["--config", tiny_run_dir / "cfg.yaml", "--layout", "1,2,1", "--work", tmp_path, "--out", out],
    )
    run = torch.load(out)
    hf_dir = str(tiny_run_dir / "hf")
    merged = logits_of(load_reference_model(str(tmp_path / "merged_hf")), run["ids"])
    base = logits_of(load_reference_model(hf_dir), run["ids"])
    with_peft = logits_of(peft_reference(hf_dir, str(tmp_path / "peft_adapter")), run["ids"])
    assert (run["trained"] - base).abs().max() > 1e-3  # the trained adapters change the model
    assert (merged - run["trained"]).abs().max() <= 1e-4  # megatron (with adapters) vs reference (merged)
    assert rel_err(merged, with_peft) <= TOL
    assert (run["from_peft"] - run["trained"]).abs().max() <= 1e-6  # same layout, the same adapters back
