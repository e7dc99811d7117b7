"""megadiff's full adapter state <-> PEFT adapters, checked against peft itself on the reference.

The oracle: the plain-PyTorch reference model with W + alpha/r * B @ A merged in (computed in
megatron's layout, mapped to HF by the parameter table) must give the logits of the same reference
with the exported PEFT adapter loaded by `peft` (fp32, max |diff| / max |logit| <= 1e-5)."""

import json
import os

import pytest
import torch

from megadiff.errors import CheckpointError
from megadiff.hf.checkpoint_reader import read_hf_config
from megadiff.hf.tiny import write_tiny_model_dir
from megadiff.lora.base_record import base_of_run
from megadiff.lora.init_from_peft import adapter_for_run
from megadiff.lora.peft_format import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    PeftAdapterError,
    from_peft,
    read_peft_adapter,
    to_peft,
    write_peft_adapter,
)
from tests.lora.peft_reference import merged_reference, peft_reference, random_full_adapter, rel_err

ALL = ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]
LORA = dict(rank=4, alpha=8.0, dropout=0.0, target_modules=ALL, experts=False, init="kaiming", seed=0)
TOL = 1e-5


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    hf_dir = write_tiny_model_dir(str(tmp_path_factory.mktemp("peft") / "hf"), seed=0)
    return hf_dir, read_hf_config(hf_dir)


def logits(model, seed=0):
    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("experts", [False, True], ids=["shared-and-dense", "routed-experts-too"])
def test_peft_adapter_on_the_reference_equals_the_merged_weights(tiny, tmp_path, experts):
    hf_dir, hf_config = tiny
    lora = dict(LORA, experts=experts)
    full = random_full_adapter(lora, hf_config, seed=1)
    state, adapter_config = to_peft(full, lora, hf_config, base_model_name_or_path=hf_dir)
    adapter_dir = write_peft_adapter(str(tmp_path / "adapter"), state, adapter_config)
    with_peft = logits(peft_reference(hf_dir, adapter_dir))  # also checks which modules peft adapted
    merged = logits(merged_reference(hf_dir, full, lora, hf_config))
    base = logits(merged_reference(hf_dir, full, dict(lora, target_modules=[]), hf_config))
    assert (merged - base).abs().max() > 0.1  # the adapters change the output a lot
    assert rel_err(merged, with_peft) <= TOL
    experts_in_file = [k for k in state if ".mlp.experts." in k]
    assert bool(experts_in_file) == experts


def test_from_peft_inverts_to_peft_exactly(tiny, tmp_path):
    hf_dir, hf_config = tiny
    lora = dict(LORA, experts=True)
    full = random_full_adapter(lora, hf_config, seed=2)
    out = write_peft_adapter(str(tmp_path / "a"), *to_peft(full, lora, hf_config))
    back, lora_back = from_peft(*read_peft_adapter(out), hf_config)
    assert back.keys() == full.keys()
    assert all(torch.equal(back[k], full[k]) for k in full)
    assert lora_back == {k: lora[k] for k in ("rank", "alpha", "dropout", "target_modules", "experts")}
    state, config = to_peft(full, lora, hf_config)
    assert config["target_modules"] == ["dense", "down_proj", "gate_proj", "query_key_value", "up_proj"]
    assert config["exclude_modules"] is None
    q = "base_model.model.model.layers.0.attention.query_key_value.lora_B.weight"
    assert not torch.equal(state[q], full["decoder.layers.0.self_attention.linear_qkv.lora_B.weight"])


def test_attention_only_adapter_has_no_mlp_targets(tiny):
    _, hf_config = tiny
    lora = dict(LORA, target_modules=["linear_qkv"])
    state, config = to_peft(random_full_adapter(lora, hf_config), lora, hf_config)
    assert config["target_modules"] == ["query_key_value"]
    assert all(".attention.query_key_value.lora_" in k for k in state) and len(state) == 2 * 4


def test_gate_and_up_with_different_a_are_refused_by_name(tiny):
    _, hf_config = tiny
    state, config = to_peft(random_full_adapter(LORA, hf_config), LORA, hf_config)
    key = "base_model.model.model.layers.1.mlp.shared_experts.up_proj.lora_A.weight"
    state[key] = state[key] + 1.0
    with pytest.raises(PeftAdapterError, match=r"layers\.1\.mlp\.shared_experts\.gate_proj and .*up_proj"):
        from_peft(state, config, hf_config)


def test_bad_adapters_name_the_culprit(tiny, tmp_path):
    _, hf_config = tiny
    full = random_full_adapter(LORA, hf_config)
    missing = dict(full)
    del missing["decoder.layers.2.self_attention.linear_proj.lora_B.weight"]
    with pytest.raises(PeftAdapterError, match=r"missing \['decoder\.layers\.2\.self_attention\.linear_proj"):
        to_peft(missing, LORA, hf_config)
    with pytest.raises(PeftAdapterError, match=r"linear_qkv\.lora_A\.weight has shape \[4, 64\], expected \[8, 64\]"):
        to_peft(full, dict(LORA, rank=8), hf_config)
    with pytest.raises(PeftAdapterError, match=r"lora\.target_modules: unknown module\(s\) \['router'\]"):
        to_peft(full, dict(LORA, target_modules=["router"]), hf_config)
    state, config = to_peft(full, LORA, hf_config)
    for field, value, match in (
        ("use_rslora", True, "use_rslora: is True"),
        ("peft_type", "IA3", "peft_type: is 'IA3'"),
        ("r", 0, "r: must be a positive integer"),
        ("target_modules", ["query_key_value", "gate_proj"], "gate_proj and up_proj must be adapted together"),
    ):
        with pytest.raises(PeftAdapterError, match=match):
            from_peft(state, dict(config, **{field: value}), hf_config)
    extra = dict(state, **{"base_model.model.model.layers.1.mlp.experts.3.down_proj.lora_A.weight": torch.ones(4, 32)})
    with pytest.raises(PeftAdapterError, match=r"missing \['base_model\.model\.model\.layers\.1\.mlp\.experts\.0"):
        from_peft(extra, config, hf_config)  # one routed expert adapted: not a megadiff adapter


def test_adapter_dir_is_written_atomically_and_read_with_named_errors(tiny, tmp_path, monkeypatch):
    _, hf_config = tiny
    state, config = to_peft(random_full_adapter(LORA, hf_config), LORA, hf_config)
    out = str(tmp_path / "adapter")
    with pytest.raises(PeftAdapterError, match="parent directory of the adapter does not exist"):
        write_peft_adapter(str(tmp_path / "no" / "such"), state, config)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(json, "dump", crash)  # the config is written after the weights
    with pytest.raises(OSError, match="disk full"):
        write_peft_adapter(out, state, config)
    assert os.listdir(tmp_path) == []  # no half-written adapter, no staging dir left
    monkeypatch.undo()
    write_peft_adapter(out, state, config)
    with pytest.raises(PeftAdapterError, match="already exists"):
        write_peft_adapter(out, state, config)
    with open(os.path.join(out, CONFIG_NAME), "w") as f:
        f.write("{not json")
    with pytest.raises(PeftAdapterError, match=rf"{CONFIG_NAME}: not valid JSON"):
        read_peft_adapter(out)
    os.remove(os.path.join(out, WEIGHTS_NAME))
    with pytest.raises(PeftAdapterError, match=rf"{WEIGHTS_NAME}: not found"):
        read_peft_adapter(out)


def test_init_from_peft_refuses_an_adapter_that_does_not_fit_the_run(tiny, tmp_path):
    hf_dir, hf_config = tiny
    full = random_full_adapter(LORA, hf_config)
    base = base_of_run(hf_dir, None)
    adapter = write_peft_adapter(str(tmp_path / "a"), *to_peft(full, LORA, hf_config, hf_dir), base=base.to_dict())
    got, note = adapter_for_run(adapter, LORA, hf_config, base)
    assert all(torch.equal(got[k], full[k]) for k in full) and got.keys() == full.keys()
    assert note.startswith("base checked")
    for field, value, match in (
        ("rank", 8, r"r=4 in adapter_config.json \(lora.rank=4\), this run has lora.rank=8"),
        ("alpha", 4.0, r"lora_alpha=8.0 .*this run has lora.alpha=4.0"),
        ("target_modules", ["linear_qkv"], r"this run has lora.target_modules=\['linear_qkv'\]"),
        ("experts", True, r"no routed-expert adapters \(lora.experts=False\), this run has lora.experts=True"),
    ):
        with pytest.raises(PeftAdapterError, match=rf"lora.init_from_peft={adapter}: the adapter has .*{match}"):
            adapter_for_run(adapter, dict(LORA, **{field: value}), hf_config, base)
    other = write_tiny_model_dir(str(tmp_path / "other"), seed=1)  # same shapes, other weights
    with pytest.raises(CheckpointError, match=rf"trained on the base {hf_dir} .*not on {other}.*point model.hf_dir"):
        adapter_for_run(adapter, LORA, hf_config, base_of_run(other, None))
    # another tool's adapter (no base record): its local base_model_name_or_path is fingerprinted
    foreign = write_peft_adapter(str(tmp_path / "foreign"), *to_peft(full, LORA, hf_config, hf_dir))
    assert adapter_for_run(foreign, LORA, hf_config, base)[1].startswith("base checked: base_model_name_or_path")
    with pytest.raises(CheckpointError, match="another model"):
        adapter_for_run(foreign, LORA, hf_config, base_of_run(other, None))
