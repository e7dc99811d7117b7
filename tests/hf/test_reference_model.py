"""The plain-PyTorch reference is the oracle, so it is checked against first principles here."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from megadiff.errors import CheckpointError
from megadiff.hf import build_reference_model, load_reference_model, save_reference_model
from megadiff.models.llada2 import preset


@pytest.fixture(scope="module")
def model():
    return build_reference_model(preset("tiny"), seed=0)


def test_router_keeps_best_groups_and_normalises_unbiased_scores(model):
    gate = model.moe_blocks()[0][1].gate
    x = torch.randn(64, model.config.hidden_size)
    indices, weights = gate(x)
    scores = torch.sigmoid(x @ gate.weight.T)
    biased = scores + gate.expert_bias
    per_group = model.config.num_experts // model.config.n_group
    for t in range(x.shape[0]):
        group_score = [
            sorted(biased[t, g * per_group : (g + 1) * per_group].tolist())[-2:] for g in range(model.config.n_group)
        ]
        best = sorted(range(model.config.n_group), key=lambda g: -sum(group_score[g]))[: model.config.topk_group]
        allowed = [e for e in range(model.config.num_experts) if e // per_group in best]
        chosen = sorted(allowed, key=lambda e: -biased[t, e].item())[: model.config.num_experts_per_tok]
        assert sorted(indices[t].tolist()) == sorted(chosen)
        s = scores[t, indices[t]]
        torch.testing.assert_close(weights[t], s / s.sum() * 2.5)


def test_expert_bias_changes_selection_but_not_weights_formula(model):
    gate = model.moe_blocks()[0][1].gate
    x = torch.randn(32, model.config.hidden_size)
    before, _ = gate(x)
    saved = gate.expert_bias.clone()
    gate.expert_bias.fill_(0.0)
    gate.expert_bias[0] = 10.0  # expert 0 always wins
    try:
        idx, w = gate(x)
        assert (idx == 0).any(dim=1).all()
        assert not torch.equal(before, idx)
    finally:
        gate.expert_bias.copy_(saved)


def test_rope_follows_position_ids_for_block_diffusion_halves(model):
    ids = torch.randint(0, 512, (1, 12))
    half = torch.arange(6)
    both = model(ids, torch.cat([half, half])[None], _block_diagonal(6)).logits
    first = model(ids[:, :6], half[None]).logits
    second = model(ids[:, 6:], half[None]).logits
    torch.testing.assert_close(both, torch.cat([first, second], dim=1), atol=1e-5, rtol=1e-5)


def _block_diagonal(n):
    m = torch.zeros(2 * n, 2 * n, dtype=torch.bool)
    m[:n, :n] = m[n:, n:] = True
    return m[None]


def test_kv_cache_continuation_equals_full_forward(model):
    # Attention is bidirectional, so the cached prefix must not see the suffix in the full pass.
    ids = torch.randint(0, 512, (2, 10))
    allowed = torch.ones(10, 10, dtype=torch.bool)
    allowed[:6, 6:] = False
    full = model(ids, attention_mask=allowed.expand(2, 10, 10)).logits
    prefix = model(ids[:, :6], use_cache=True)
    rest = model(ids[:, 6:], past_key_values=prefix.past_key_values).logits
    torch.testing.assert_close(rest, full[:, 6:], atol=1e-5, rtol=1e-5)


def test_save_then_load_sharded_gives_same_logits(model, tmp_path):
    save_reference_model(model, tmp_path, max_shard_size="200KB")
    assert os.path.isfile(tmp_path / "model.safetensors.index.json")
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["auto_map"]["AutoModelForCausalLM"] == "modeling_llada2_moe.LLaDA2MoeModelLM"
    loaded = load_reference_model(str(tmp_path))
    ids = torch.randint(0, 512, (1, 8))
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=0, rtol=0)


def test_transformers_auto_classes_load_megadiff_dir(model, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    save_reference_model(model, tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).model_type == "llada2_moe"
    for remote in (False, True):
        auto = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=remote).eval()
        ids = torch.randint(0, 512, (1, 8))
        torch.testing.assert_close(auto(ids).logits, model(ids).logits, atol=1e-6, rtol=1e-6)


def _single_file_dir(model, tmp_path):
    save_reference_model(model, tmp_path)
    return tmp_path / "model.safetensors"


def test_missing_tensor_is_named(model, tmp_path):
    path = _single_file_dir(model, tmp_path)
    tensors = load_file(path)
    del tensors["model.layers.2.mlp.experts.5.up_proj.weight"]
    save_file(tensors, path)
    with pytest.raises(CheckpointError, match="'model.layers.2.mlp.experts.5.up_proj.weight' is missing"):
        load_reference_model(str(tmp_path))


def test_extra_tensor_is_named(model, tmp_path):
    path = _single_file_dir(model, tmp_path)
    tensors = load_file(path)
    tensors["model.layers.9.attention.dense.weight"] = torch.zeros(2, 2)
    save_file(tensors, path)
    with pytest.raises(CheckpointError, match="unexpected tensor 'model.layers.9.attention.dense.weight'"):
        load_reference_model(str(tmp_path))


def test_wrongly_shaped_tensor_is_named(model, tmp_path):
    path = _single_file_dir(model, tmp_path)
    tensors = load_file(path)
    tensors["model.layers.0.mlp.up_proj.weight"] = torch.zeros(3, 64)
    save_file(tensors, path)
    with pytest.raises(
        CheckpointError,
        match=r"'model.layers.0.mlp.up_proj.weight' has shape \[3, 64\], config.json implies \[128, 64\]",
    ):
        load_reference_model(str(tmp_path))


def test_missing_shard_in_index_is_named(model, tmp_path):
    save_reference_model(model, tmp_path, max_shard_size="200KB")
    shard = sorted(p for p in os.listdir(tmp_path) if p.endswith(".safetensors"))[1]
    os.remove(tmp_path / shard)
    with pytest.raises(CheckpointError, match=f"shard '{shard}' is listed but missing"):
        load_reference_model(str(tmp_path))
