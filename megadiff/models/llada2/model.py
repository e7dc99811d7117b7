"""Build LLaDA2 as megatron-core GPTModel chunks for the current rank.

LLaDA2 is built like every family (megadiff.models.common.gpt.build_gpt_chunks: its config,
its layer spec, RoPE at explicit position ids, the x_t-only output layer); the running helpers
(forward_chunk, set_xt_only_logits) live there too.
"""

import torch

from megadiff.models.common.gpt import build_gpt_chunks

from .config import LLaDA2ModelConfig, ParallelLayout


def build_model(
    model_cfg: LLaDA2ModelConfig,
    layout: ParallelLayout,
    params_dtype: torch.dtype = torch.float32,
    use_te: bool | None = None,
    attention_backend: str = "dense",
    xt_only_logits: bool = False,
    moe_experts: str = "auto",
    **config_overrides,
):
    """One GPTModel per virtual-pipeline chunk held by this rank (build_gpt_chunks' arguments)."""
    from .family import FAMILY

    return build_gpt_chunks(
        FAMILY,
        model_cfg,
        layout,
        params_dtype=params_dtype,
        use_te=use_te,
        attention_backend=attention_backend,
        xt_only_logits=xt_only_logits,
        moe_experts=moe_experts,
        **config_overrides,
    )
