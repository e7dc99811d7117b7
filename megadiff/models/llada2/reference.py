"""LLaDA2's plain-PyTorch reference model (HF names): megadiff's own LLaDA2 remote code
(configuration_llada2_moe.py, modeling_llada2_moe.py, also written next to converted checkpoints),
built from config fields."""

import torch

from .configuration_llada2_moe import LLaDA2MoeConfig
from .modeling_llada2_moe import LLaDA2MoeModelLM


def build_reference_model(cfg: dict, seed: int | None = None, dtype=torch.float32) -> LLaDA2MoeModelLM:
    """A reference model from config fields. With `seed`, every weight is random and non-trivial:
    norms away from 1 and non-zero expert biases, so a test that ignores them fails."""
    config = LLaDA2MoeConfig(**{k: v for k, v in cfg.items() if k != "model_type"})
    if seed is not None:
        torch.manual_seed(seed)
    model = LLaDA2MoeModelLM(config).to(dtype).eval()
    if seed is not None:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "layernorm" in name or name.endswith("norm.weight"):
                    p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
                else:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.5 / p.shape[-1] ** 0.5)
            for _, block in model.moe_blocks():
                block.gate.expert_bias.copy_(0.05 * torch.randn(block.gate.expert_bias.shape, generator=g))
    return model
