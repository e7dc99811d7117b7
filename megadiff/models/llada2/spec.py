"""LLaDA2 layer specs: megatron-core's GPT decoder specs made bidirectional
(megadiff.models.common.spec), dense layer 0 and MoE after as the TransformerConfig says.

Routed experts: `experts="grouped"` swaps megatron-core's SequentialMLP for TorchGroupedMLP
(megadiff.models.common.grouped_experts: the same parameters, torch._grouped_mm in forward).
"""

from megadiff.models.common.grouped_experts import with_grouped_experts
from megadiff.models.common.spec import SequenceParallelRMSNorm, bidirectional_block_spec, transformer_engine_usable

__all__ = ["SequenceParallelRMSNorm", "llada2_block_spec", "transformer_engine_usable"]


def llada2_block_spec(config, use_te: bool, vp_stage=None, core_attention=None, experts: str = "sequential"):
    """The decoder block spec (dense layer 0, MoE after) for this pipeline stage / chunk.
    `core_attention`: a module class replacing every self-attention's core attention (None: the
    spec's own, DotProductAttention / TEDotProductAttention). `experts`: "te" / "sequential" (the
    spec's own, as config.moe_grouped_gemm says) or "grouped" (TorchGroupedMLP)."""
    spec = bidirectional_block_spec(config, use_te, vp_stage=vp_stage, core_attention=core_attention)
    return with_grouped_experts(spec) if experts == "grouped" else spec
