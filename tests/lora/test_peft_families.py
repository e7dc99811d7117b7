"""LoRA export for the LLaDA and LLaDA-MoE families, checked against peft itself on each family's
own reference model (tests/lora/test_peft_format.py does the same for LLaDA2).

megatron's fused linear_qkv adapter exports as separate q_proj / k_proj / v_proj adapters sharing
its A, B's rows regrouped like the base weights (per KV group -> q, k, v); fc1's as gate / up.
Oracle: the reference with W + alpha/r * B @ A merged in megatron's layout and mapped to HF by the
family's mapping objects must give the logits of the reference carrying the exported PEFT adapter,
loaded by peft (fp32, max |diff| / max |logit| <= 1e-5); merging through megadiff.lora.merge
(what the converters add to HF weights) gives them too; from_peft inverts to_peft bit for bit.
"""

import pytest
import torch

from megadiff.lora.merge import add_delta, hf_deltas
from megadiff.lora.peft_format import PeftAdapterError, from_peft, read_peft_adapter, to_peft, write_peft_adapter
from megadiff.models.common.hf_dir import write_reference_dir
from megadiff.models.registry import family
from tests.lora.peft_reference import load_reference, merged_reference, peft_reference, random_full_adapter, rel_err

ALL = ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]
LORA = dict(rank=4, alpha=8.0, dropout=0.0, target_modules=ALL, experts=False, init="kaiming", seed=0)
TOL = 1e-5
PEFT_TARGETS = {
    "llada": ["attn_out", "ff_out", "ff_proj", "k_proj", "q_proj", "up_proj", "v_proj"],
    "lladamoe": ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"],
}


@pytest.fixture(scope="module", params=["llada", "lladamoe"])
def tiny(request, tmp_path_factory):
    hf_dir = str(tmp_path_factory.mktemp(request.param) / "hf")
    return request.param, hf_dir, write_reference_dir(family(request.param), hf_dir, seed=0)


def logits(model):
    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_peft_adapter_on_the_family_reference_equals_the_merged_weights(tiny, tmp_path):
    name, hf_dir, hf_config = tiny
    lora = dict(LORA, experts=name == "lladamoe")  # LLaDA-MoE: the routed experts too
    full = random_full_adapter(lora, hf_config, seed=1)
    state, adapter_config = to_peft(full, lora, hf_config, base_model_name_or_path=hf_dir)
    assert adapter_config["target_modules"] == PEFT_TARGETS[name]
    adapter_dir = write_peft_adapter(str(tmp_path / "adapter"), state, adapter_config)
    # peft adapts exactly the file's modules (LLaDA's output layer, also named ff_out, is excluded)
    with_peft = logits(peft_reference(hf_dir, adapter_dir))
    merged = logits(merged_reference(hf_dir, full, lora, hf_config))
    base = logits(load_reference(hf_dir))
    assert (merged - base).abs().max() > 0.1  # the adapters change the output a lot
    assert rel_err(merged, with_peft) <= TOL

    # the converters' merge: HF weights + deltas (fp64, rounded once) give the same model
    model = load_reference(hf_dir)
    deltas = hf_deltas(full, lora, hf_config)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for tensor_name, delta in deltas.items():
            params[tensor_name].copy_(add_delta(params[tensor_name], delta, tensor_name))
    assert rel_err(logits(model), merged) <= TOL

    back, lora_back = from_peft(*read_peft_adapter(adapter_dir), hf_config)
    assert back.keys() == full.keys() and all(torch.equal(back[k], full[k]) for k in full)
    assert lora_back == {k: lora[k] for k in ("rank", "alpha", "dropout", "target_modules", "experts")}
    assert any(".mlp.experts." in k for k in state) == lora["experts"]


def test_separate_qkv_adapters_need_one_shared_a(tiny):
    name, _, hf_config = tiny
    state, config = to_peft(random_full_adapter(LORA, hf_config), LORA, hf_config)
    prefix = "base_model.model." + ("model.transformer.blocks.0." if name == "llada" else "model.layers.0.self_attn.")
    q_a, k_b = state[prefix + "q_proj.lora_A.weight"], state[prefix + "k_proj.lora_B.weight"]
    assert torch.equal(state[prefix + "v_proj.lora_A.weight"], q_a)  # the fused adapter's one A
    assert k_b.shape[0] < state[prefix + "q_proj.lora_B.weight"].shape[0]  # GQA: k has the KV heads' rows
    state[prefix + "k_proj.lora_A.weight"] = q_a + 1.0
    with pytest.raises(PeftAdapterError, match=r"q_proj and .*k_proj and .*v_proj have different lora_A"):
        from_peft(state, config, hf_config)
    partial = dict(config, target_modules=[m for m in config["target_modules"] if m != "v_proj"])
    with pytest.raises(PeftAdapterError, match="q_proj and k_proj and v_proj must be adapted together"):
        from_peft(state, partial, hf_config)
