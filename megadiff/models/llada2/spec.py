"""LLaDA2 layer specs: megatron-core's GPT decoder specs with two entries swapped.

- Attention is bidirectional: every self-attention takes an arbitrary (optional) mask instead of
  megatron-core's default causal mask. `core_attention` optionally replaces the core attention
  module (e.g. `FlexCoreAttention`, which takes a BlockMask as that mask).
- Without Transformer Engine, norms are `SequenceParallelRMSNorm` (torch RMSNorm whose weight is
  marked `sequence_parallel`); megatron-core's torch norm wrapper refuses sequence parallelism,
  which TP>1 with MoE requires.
- Routed experts: `experts="grouped"` swaps megatron-core's SequentialMLP for TorchGroupedMLP
  (megadiff.models.common.grouped_experts: the same parameters, torch._grouped_mm in forward).
With TE and CUDA, the TE spec (fused norm+linear, TE grouped-GEMM experts) is used otherwise as is.
"""

import dataclasses

import torch
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm

from megadiff.models.common.grouped_experts import with_grouped_experts
from megadiff.platform.kernels import transformer_engine_usable as usable


class SequenceParallelRMSNorm(torch.nn.RMSNorm):
    """torch RMSNorm built like megatron-core norms: (config, hidden_size, eps)."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-6, **unused):
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)
        # finalize_model_grads sums grads of `sequence_parallel` params over the TP group.
        self.weight.sequence_parallel = config.sequence_parallel


def transformer_engine_usable() -> bool:
    """The TE spec is used when the run device is CUDA and megatron-core's own TE flags are set
    (megadiff.platform.kernels decides)."""
    return usable()


def _swap(spec, use_te: bool, core_attention=None):
    """Recursively rewrite a spec tree (ModuleSpec / dataclass submodules / classes)."""
    if spec is WrappedTorchNorm and not use_te:
        return SequenceParallelRMSNorm
    if isinstance(spec, ModuleSpec):
        params = dict(spec.params)
        submodules = _swap(spec.submodules, use_te, core_attention)
        if isinstance(spec.module, type) and issubclass(spec.module, SelfAttention):
            params["attn_mask_type"] = AttnMaskType.arbitrary
            if core_attention is not None:
                submodules = dataclasses.replace(submodules, core_attention=core_attention)
        return dataclasses.replace(spec, params=params, submodules=submodules)
    if dataclasses.is_dataclass(spec) and not isinstance(spec, type):
        changes = {f.name: _swap(getattr(spec, f.name), use_te, core_attention) for f in dataclasses.fields(spec)}
        return dataclasses.replace(spec, **changes)
    if isinstance(spec, list):
        return [_swap(s, use_te, core_attention) for s in spec]
    return spec


def llada2_block_spec(config, use_te: bool, vp_stage=None, core_attention=None, experts: str = "sequential"):
    """The decoder block spec (dense layer 0, MoE after) for this pipeline stage / chunk.
    `core_attention`: a module class replacing every self-attention's core attention (None: the
    spec's own, DotProductAttention / TEDotProductAttention). `experts`: "te" / "sequential" (the
    spec's own, as config.moe_grouped_gemm says) or "grouped" (TorchGroupedMLP)."""
    spec = get_gpt_decoder_block_spec(config, use_transformer_engine=use_te, normalization="RMSNorm", vp_stage=vp_stage)
    spec = _swap(spec, use_te, core_attention)
    return with_grouped_experts(spec) if experts == "grouped" else spec
