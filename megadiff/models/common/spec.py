"""Layer specs shared by every family: megatron-core's GPT decoder block specs, bidirectional.

- Attention is bidirectional: every self-attention takes an arbitrary (optional) mask instead of
  megatron-core's default causal mask. `core_attention` optionally replaces the core attention
  module (e.g. `FlexCoreAttention`, which takes a BlockMask as that mask).
- Without Transformer Engine, norms are `SequenceParallelRMSNorm` (torch RMSNorm whose weight is
  marked `sequence_parallel`); megatron-core's torch norm wrapper refuses sequence parallelism,
  which TP>1 with MoE requires.
With TE and CUDA, the TE spec (fused norm+linear, TE grouped-GEMM experts) is used otherwise as is.
"""

import dataclasses
import functools

import torch
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm

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


def bidirectional_block_spec(config, use_te: bool, vp_stage=None, core_attention=None):
    """The decoder block spec of this pipeline stage / chunk (dense and MoE layers as the
    TransformerConfig says; see the module docstring). `core_attention`: a module class replacing
    every self-attention's core attention (None: DotProductAttention / TEDotProductAttention)."""
    spec = get_gpt_decoder_block_spec(config, use_transformer_engine=use_te, normalization="RMSNorm", vp_stage=vp_stage)
    return _swap(spec, use_te, core_attention)


def with_moe_router(block_spec, router):
    """`block_spec` with every MoE layer's router built by `router` (a TopKRouter subclass).

    megatron-core 0.16 describes an MoE layer as ModuleSpec(MoELayer, submodules=MoESubmodules),
    0.17+ as functools.partial(MoELayer, submodules=MoESubmodules); both carry the router class in
    MoESubmodules.router. Dense layers are left alone."""

    def swap(mlp):
        if isinstance(mlp, functools.partial) and hasattr(mlp.keywords.get("submodules"), "router"):
            submodules = dataclasses.replace(mlp.keywords["submodules"], router=router)
            return functools.partial(mlp.func, *mlp.args, **dict(mlp.keywords, submodules=submodules))
        if isinstance(mlp, ModuleSpec) and hasattr(mlp.submodules, "router"):
            return dataclasses.replace(mlp, submodules=dataclasses.replace(mlp.submodules, router=router))
        return mlp

    layers = [
        dataclasses.replace(layer, submodules=dataclasses.replace(layer.submodules, mlp=swap(layer.submodules.mlp)))
        for layer in block_spec.layer_specs
    ]
    return dataclasses.replace(block_spec, layer_specs=layers)
