"""Layer specs shared by every family: megatron-core's GPT decoder block specs, bidirectional.

`bidirectional_block_spec` is megatron-core's GPT decoder block spec (dense and MoE layers as the
TransformerConfig says) with every self-attention taking an arbitrary optional mask instead of the
causal one, an optional core-attention replacement (FlexCoreAttention), and, without Transformer
Engine, `SequenceParallelRMSNorm` norms (TP > 1 with MoE needs sequence parallelism, which
megatron-core's torch norm wrapper refuses).

Issue 28 phase 1: the code still lives in megadiff.models.llada2.spec, where other work in flight
edits it; it moves here, with llada2 re-exporting it, once that work is merged.
"""

from megadiff.models.llada2.spec import SequenceParallelRMSNorm, llada2_block_spec, transformer_engine_usable

__all__ = ["SequenceParallelRMSNorm", "bidirectional_block_spec", "transformer_engine_usable"]


def bidirectional_block_spec(config, use_te: bool, vp_stage=None, core_attention=None):
    """The decoder block spec of this pipeline stage / chunk (see the module docstring)."""
    return llada2_block_spec(config, use_te, vp_stage=vp_stage, core_attention=core_attention)
