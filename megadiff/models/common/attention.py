"""FlexAttention core attention for every family (block-sparse masks without [b, h, s, s] tensors).

Issue 28 phase 1: the code still lives in megadiff.models.llada2.flex_attention (context-parallel
work in flight edits it); it moves here once that is merged. Importing this module compiles
flex_attention (seconds): dense-attention runs never import it.
"""

from megadiff.models.llada2.flex_attention import (
    FlexCoreAttention,
    build_block_mask,
    check_flex_supported,
    flex_attention_bhsd,
)

__all__ = ["FlexCoreAttention", "build_block_mask", "check_flex_supported", "flex_attention_bhsd"]
