"""Layer specs shared by every family: megatron-core's GPT decoder block specs, bidirectional.

`bidirectional_block_spec` is megatron-core's GPT decoder block spec (dense and MoE layers as the
TransformerConfig says) with every self-attention taking an arbitrary optional mask instead of the
causal one, an optional core-attention replacement (FlexCoreAttention), and, without Transformer
Engine, `SequenceParallelRMSNorm` norms (TP > 1 with MoE needs sequence parallelism, which
megatron-core's torch norm wrapper refuses).

Issue 28 phase 1: the code still lives in megadiff.models.llada2.spec, where other work in flight
edits it; it moves here, with llada2 re-exporting it, once that work is merged.
"""

import dataclasses
import functools

from megatron.core.transformer.spec_utils import ModuleSpec

from megadiff.models.llada2.spec import SequenceParallelRMSNorm, llada2_block_spec, transformer_engine_usable

__all__ = ["SequenceParallelRMSNorm", "bidirectional_block_spec", "transformer_engine_usable", "with_moe_router"]


def bidirectional_block_spec(config, use_te: bool, vp_stage=None, core_attention=None):
    """The decoder block spec of this pipeline stage / chunk (see the module docstring)."""
    return llada2_block_spec(config, use_te, vp_stage=vp_stage, core_attention=core_attention)


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
