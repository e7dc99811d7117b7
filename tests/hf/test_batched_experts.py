"""The batched routed experts (inference path of the reference: tokens sorted by expert, grouped
matmuls, no host sync per expert) equal the plain per-expert loop, routing included (sigmoid
scores + expert bias, group-limited top-k): fp32, max |Δ| <= 1e-6 per MoE block output (values are
O(1)), with torch._grouped_mm and with its gather-bmm fallback."""

import pytest
import torch

from megadiff.hf.reference import build_reference_model
from megadiff.models.llada2.presets import preset

TOL = 1e-6


@pytest.fixture(scope="module")
def model():
    # 16 experts in 4 groups, top-2 groups, top-4 experts: group limits and bias change the choice
    return build_reference_model(preset("tiny", num_experts=16, n_group=4, topk_group=2), seed=5)


def _blocks(model):
    return [block for _, block in model.moe_blocks()]


def test_routing_is_group_limited_and_biased(model):
    block = _blocks(model)[0]
    assert block.gate.expert_bias.abs().max() > 0
    x = torch.randn(64, model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    indices, _ = block.gate(x)
    groups = indices // (model.config.num_experts // model.config.n_group)
    assert max(len(set(g.tolist())) for g in groups) <= model.config.topk_group
    assert len(set(indices.flatten().tolist())) == model.config.num_experts  # every expert used somewhere


@pytest.mark.parametrize("grouped_mm", [True, False], ids=["grouped_mm", "gather_bmm"])
def test_batched_experts_equal_the_per_expert_loop(model, grouped_mm, monkeypatch):
    if not grouped_mm:
        monkeypatch.delattr(torch, "_grouped_mm", raising=False)
        monkeypatch.setattr(type(_blocks(model)[0]), "_GATHER_ELEMENTS", 3000)  # several chunks
    elif not hasattr(torch, "_grouped_mm"):
        pytest.skip("this torch has no torch._grouped_mm")
    g = torch.Generator().manual_seed(2)
    for block in _blocks(model):
        x = torch.randn(2, 37, model.config.hidden_size, generator=g)
        flat = x.reshape(-1, x.shape[-1])
        with torch.no_grad():
            indices, weights = block.gate(flat)
            loop = block._routed_experts_loop(flat, indices, weights)
            batched = block._routed_experts_batched(flat, indices, weights)
            whole = block(x)  # no grad: the batched path, shared expert added
        assert loop.abs().max() > 0.1
        assert float((batched - loop).abs().max()) <= TOL
        assert float((whole.reshape_as(loop) - loop - block.shared_experts(flat)).abs().max()) <= TOL


def test_model_logits_batched_equal_loop_and_follow_weight_updates(model, monkeypatch):
    ids = torch.randint(0, model.config.vocab_size, (2, 21), generator=torch.Generator().manual_seed(3))
    pos = torch.arange(21).expand(2, 21)

    def logits(batched):
        monkeypatch.setattr(type(_blocks(model)[0]), "batched_experts", batched)
        with torch.no_grad():
            return model(ids, pos).logits

    assert float((logits(True) - logits(False)).abs().max()) <= 1e-5
    expert = _blocks(model)[0].experts[3]
    before = expert.down_proj.weight.clone()
    with torch.no_grad():
        expert.down_proj.weight.mul_(-2.0)  # the cached stack must notice an in-place update
    try:
        assert float((logits(True) - logits(False)).abs().max()) <= 1e-5
    finally:
        with torch.no_grad():
            expert.down_proj.weight.copy_(before)


def test_training_keeps_the_loop_so_gradients_reach_every_expert(model):
    block = _blocks(model)[0]
    x = torch.randn(40, model.config.hidden_size, generator=torch.Generator().manual_seed(4))
    block.zero_grad()
    block(x).sum().backward()
    used = set(block.last_routing[0].flatten().tolist())
    assert all(block.experts[e].gate_proj.weight.grad is not None for e in used)
    block.zero_grad()
