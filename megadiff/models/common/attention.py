"""FlexAttention core attention for megatron-core: block-sparse masks without [b, h, s, s] tensors.

megatron-core's local `DotProductAttention` (and TE's unfused path, the only TE path that takes an
arbitrary mask) materialises the scores and the mask per head, [b, h, s, s]. Block diffusion on
[x_t ; x_0] doubles s and leaves ~75% of the score matrix masked. `FlexCoreAttention` is a drop-in
core attention (same constructor and forward as `DotProductAttention`; selected by
`build_model(..., attention_backend="flex")`) that runs `flex_attention` with a `BlockMask` passed
as megatron's `attention_mask`: masked 128x128 tiles are skipped and no dense mask exists.

`build_block_mask` builds that BlockMask once per micro-batch from a mask_mod (B = batch, H = 1,
shared by every head and layer); megadiff.diffusion.block_mask picks the mask_mod of the diffusion
mode. megatron-core's
TransformerBlock / TransformerLayer / SelfAttention pass `attention_mask` through untouched, so the
BlockMask reaches every layer as is; the exception is activation recompute (`recompute_granularity`
"full", or "selective" with "core_attn"), whose checkpoint function calls
`save_for_backward(attention_mask)`, which only takes tensors: `build_model` refuses that
combination.

Context parallelism (cp > 1): the local queries attend to the keys and values of the whole sequence,
all-gathered over the CP group (megadiff.models.common.context_parallel); the BlockMask must then be
the rank's local-query mask (`build_block_mask(..., q_length=length // cp)` of a
`local_query_mask_mod`; megadiff.diffusion.block_mask.block_mask_for builds it).

Devices:
- CUDA: `torch.compile(flex_attention)` (fused Triton kernels for forward and backward).
- CPU: megadiff.platform.cpu_flex_attention (a fused C++ forward, and the backward torch's CPU
  flex lacks). Correct, not fast: CPU is for tests and development.
"""

from __future__ import annotations

import math

import torch
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.utils import divide
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from megadiff.models.common.context_parallel import gather_keys_values
from megadiff.platform.cpu_flex_attention import cpu_flex_attention

# Created once: torch.compile is lazy, the first call per input shape compiles (seconds).
_COMPILED_FLEX = torch.compile(flex_attention)
_COMPILED_CREATE_BLOCK_MASK = torch.compile(create_block_mask)
# Eager create_block_mask evaluates the mask_mod on a dense [B, 1, Q, KV] grid (several int64
# intermediates: ~0.7 GB at 8192^2); compiled it does not, but compiling costs seconds once.
COMPILE_BLOCK_MASK_MIN_ELEMENTS = 2048 * 2048


def build_block_mask(mask_mod, batch: int, length: int, device, q_length: int | None = None) -> BlockMask:
    """The BlockMask of `mask_mod` over [0, q_length) queries (default: length) and [0, length) keys
    (H = 1, shared by every head): built eagerly for short rows, compiled from
    COMPILE_BLOCK_MASK_MIN_ELEMENTS on."""
    q_length = length if q_length is None else q_length
    build = create_block_mask
    if q_length * length >= COMPILE_BLOCK_MASK_MIN_ELEMENTS:
        build = _COMPILED_CREATE_BLOCK_MASK
    return build(mask_mod, batch, None, q_length, length, device=device)


def check_flex_supported(config) -> None:
    """Refuse TransformerConfig settings under which a BlockMask attention_mask cannot work."""
    recompute_attention = config.recompute_granularity == "full" or (
        config.recompute_granularity == "selective" and "core_attn" in (config.recompute_modules or [])
    )
    if recompute_attention:
        raise ValueError(
            f"attention_backend='flex' with recompute_granularity={config.recompute_granularity!r} "
            f"(recompute_modules={config.recompute_modules}): megatron-core's checkpoint function "
            f"saves attention_mask with save_for_backward, which takes tensors, not a BlockMask. "
            f"Use selective recompute without 'core_attn' (flex attention keeps no [s, s] "
            f"activations to recompute), or attention_backend='dense'"
        )


class FlexCoreAttention(MegatronModule):
    """Core attention running flex_attention; `attention_mask` is a BlockMask (None = full).

    Drop-in for megatron-core's DotProductAttention: query [sq, b, np, hn], key/value
    [sk, b, ng, hn] (per TP rank; GQA when ng < np) -> context [sq, b, np * hn]. Under context
    parallelism sq = sk are this rank's tokens; keys and values are gathered over the CP group."""

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        where = f"FlexCoreAttention (layer {layer_number})"
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if dropout:
            raise ValueError(f"{where}: attention_dropout={dropout} is not supported; set it to 0")
        if config.softmax_type != "vanilla":
            raise ValueError(f"{where}: softmax_type={config.softmax_type!r} is not supported")
        if config.window_size is not None:
            raise ValueError(f"{where}: window attention is not supported")
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp", "cp"])
        self.cp_group = pg_collection.cp if pg_collection.cp.size() > 1 else None
        if config.context_parallel_size != pg_collection.cp.size():
            raise ValueError(
                f"{where}: TransformerConfig.context_parallel_size={config.context_parallel_size} but the CP "
                f"process group has {pg_collection.cp.size()} ranks; initialise the groups with the model's layout"
            )
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type
        tp = pg_collection.tp.size()
        self.num_attention_heads_per_partition = divide(config.num_attention_heads, tp)
        self.num_query_groups_per_partition = divide(config.num_query_groups, tp)
        self.hidden_size_per_partition = divide(config.kv_channels * config.num_attention_heads, tp)
        # DotProductAttention's apply_query_key_layer_scaling divides and re-multiplies by the
        # layer number: the net scale is this one.
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: BlockMask | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias=None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("FlexCoreAttention: packed_seq_params and attention_bias are not supported")
        if attention_mask is not None and not isinstance(attention_mask, BlockMask):
            raise TypeError(
                f"FlexCoreAttention needs a BlockMask as attention_mask (see megadiff.diffusion.block_mask), got "
                f"{type(attention_mask).__name__}; for dense bool masks build the model with "
                f"attention_backend='dense'"
            )
        if self.cp_group is not None:
            key, value = gather_keys_values(key, value, self.cp_group)
        # [s, b, n, d] -> [b, n, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        context = flex_attention_bhsd(q, k, v, attention_mask, self.softmax_scale)
        # [b, np, sq, hn] -> [sq, b, np * hn]
        sq, b = query.shape[0], query.shape[1]
        return context.permute(2, 0, 1, 3).reshape(sq, b, self.hidden_size_per_partition)


def flex_attention_bhsd(q, k, v, block_mask: BlockMask | None, scale: float) -> torch.Tensor:
    """flex_attention on [b, h, s, d] tensors (GQA when k/v have fewer heads), on any device,
    differentiable on CPU too."""
    gqa = q.shape[1] != k.shape[1]
    if q.device.type != "cpu":
        return _COMPILED_FLEX(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=gqa)
    return cpu_flex_attention(q, k, v, block_mask, scale)
