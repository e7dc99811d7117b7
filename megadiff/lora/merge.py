"""LoRA adapters merged into HF weights: W + alpha/r * B @ A, as per-tensor deltas in HF names.

The delta of an adapted base weight is computed in megatron's layout (B's rows are megatron's) and
mapped to HF by the parameter table's row of that weight, like the weight itself; the transform
only moves rows, so hf(W + delta) = hf(W) + hf(delta). A converter adds each delta to its HF tensor
in fp32 and casts back to the tensor's dtype.
"""

import torch

from megadiff.models.llada2.hf_experts import PROJS, merged_name, split_name
from megadiff.models.llada2.hf_mapping import hf_from_full_mcore

from .peft_format import adapted_modules, hf_modules, model_config


def hf_deltas(full: dict[str, torch.Tensor], lora_cfg: dict, hf_config, merged_experts: bool = False):
    """{HF tensor name: fp32 delta} for every adapted weight. `merged_experts`: routed experts'
    deltas stacked [E, ...] under dFactory's merged names, as that layout stores the weights."""
    cfg = model_config(hf_config)
    scale = lora_cfg["alpha"] / lora_cfg["rank"]
    deltas = {}
    for path in adapted_modules(lora_cfg, cfg):
        a, b = full[path + ".lora_A.weight"].float(), full[path + ".lora_B.weight"].float()
        rule, names = hf_modules(path)
        for name, delta in zip(names, hf_from_full_mcore(rule, scale * (b @ a), cfg), strict=True):
            deltas[name + ".weight"] = delta
    if merged_experts and lora_cfg.get("experts"):
        for layer in range(cfg.first_k_dense_replace, cfg.num_hidden_layers):
            for proj in PROJS:
                names = [split_name(layer, e, proj) for e in range(cfg.num_experts)]
                if names[0] in deltas:
                    deltas[merged_name(layer, proj)] = torch.stack([deltas.pop(n) for n in names])
    return deltas


def add_delta(weight: torch.Tensor, delta: torch.Tensor, name: str) -> torch.Tensor:
    """weight + delta, summed in fp32, in the weight's dtype."""
    if tuple(weight.shape) != tuple(delta.shape):
        raise ValueError(f"{name}: adapter delta has shape {list(delta.shape)}, the weight {list(weight.shape)}")
    return (weight.float() + delta).to(weight.dtype)
