"""flex_attention on the CPU, with the backward torch lacks there.

The compiled forward is a fused C++ kernel (needs a C++ compiler; falls back to eager flex, which
materialises the scores, if compiling fails). torch's CPU flex has no backward, so when gradients
are needed the forward runs under `_CpuFlexAttention`, whose backward recomputes attention one
128-row query tile at a time over only the key tiles the BlockMask lists (memory
O(h * 128 * visible keys), like flash attention's backward). Correct, not fast: CPU is for tests
and development. The model's flex core attention (megadiff.models.common.attention) calls
`cpu_flex_attention` for CPU tensors.
"""

import warnings

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from .compat import flex_compile_errors, without_torch_function_modes

# Created once: torch.compile is lazy, the first call per input shape compiles (seconds).
_COMPILED_FLEX = torch.compile(flex_attention)
_cpu_compile_failed = False  # set when compiling flex on CPU failed once; eager flex from then on
_COMPILE_ERRORS = flex_compile_errors()


def cpu_flex_is_compiled() -> bool:
    """False once compiling flex_attention on CPU failed and the eager fallback is in use."""
    return not _cpu_compile_failed


def cpu_flex_attention(q, k, v, block_mask: BlockMask | None, scale: float) -> torch.Tensor:
    """flex_attention on CPU [b, h, s, d] tensors (GQA when k/v have fewer heads), differentiable."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        out = _CpuFlexAttention.apply(q, k, v, block_mask, scale)
    else:
        out = _cpu_flex_forward(q, k, v, block_mask, scale)
    # The CPU kernels run without torch-function modes; `.to` (a no-op here) tells a mode such
    # as megadiff.platform.device_audit that the output lives where q does.
    return out.to(q.device)


def _cpu_flex_forward(q, k, v, block_mask, scale):
    """Forward only (torch's CPU flex has no backward): the compiled fused kernel, or eager flex
    if this machine cannot compile."""
    global _cpu_compile_failed
    gqa = q.shape[1] != k.shape[1]
    q, k, v = q.detach(), k.detach(), v.detach()
    if not _cpu_compile_failed:
        try:
            # Without torch-function modes (megadiff.platform.cpu's CUDA->CPU mode): flex needs
            # none, and dynamo would otherwise also compile the mode's __torch_function__ frames.
            with without_torch_function_modes():
                return _COMPILED_FLEX(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=gqa)
        except _COMPILE_ERRORS as error:  # e.g. no C++ compiler
            _cpu_compile_failed = True
            warnings.warn(
                f"compiled flex_attention failed on CPU ({type(error).__name__}: "
                f"{str(error)[:200]}); using eager flex_attention (materialises scores)",
                stacklevel=2,
            )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return flex_attention(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=gqa)


class _CpuFlexAttention(torch.autograd.Function):
    """CPU flex attention with a backward: fused forward, tile-by-tile recomputing backward."""

    @staticmethod
    def forward(ctx, q, k, v, block_mask, scale):
        ctx.save_for_backward(q, k, v)
        ctx.block_mask, ctx.scale = block_mask, scale
        return _cpu_flex_forward(q, k, v, block_mask, scale)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v = ctx.saved_tensors
        with without_torch_function_modes():  # plain CPU tensor code: skip per-op mode dispatch
            dq, dk, dv = _blockwise_attention_backward(q, k, v, grad_out, ctx.block_mask, ctx.scale)
        return dq, dk, dv, None, None


def _tiles(block_mask: BlockMask | None, batch: int, q_len: int, kv_len: int):
    """Yield (b, query row slice, visible key rows, mask_mod or None) per query tile."""
    if block_mask is None:
        keys = torch.arange(kv_len)
        for b in range(batch):
            for start in range(0, q_len, 128):
                yield b, slice(start, min(start + 128, q_len)), keys, None
        return
    if block_mask.kv_num_blocks.shape[1] != 1:
        raise ValueError("FlexCoreAttention on CPU: per-head BlockMasks are not supported (use H=None)")
    q_block, kv_block = block_mask.BLOCK_SIZE
    mask_b = block_mask.kv_num_blocks.shape[0]
    offsets = torch.arange(kv_block)
    for b in range(batch):
        mb = b if mask_b > 1 else 0
        for i, start in enumerate(range(0, q_len, q_block)):
            blocks = [block_mask.kv_indices[mb, 0, i, : block_mask.kv_num_blocks[mb, 0, i]]]
            if block_mask.full_kv_num_blocks is not None:
                blocks.append(block_mask.full_kv_indices[mb, 0, i, : block_mask.full_kv_num_blocks[mb, 0, i]])
            blocks = torch.cat(blocks).to("cpu", torch.long)
            keys = (blocks[:, None] * kv_block + offsets).flatten()
            yield b, slice(start, min(start + q_block, q_len)), keys[keys < kv_len], block_mask.mask_mod


def _blockwise_attention_backward(q, k, v, grad_out, block_mask, scale):
    """Gradients of softmax(q k^T * scale + mask) v, recomputed per query tile over visible keys.

    q [b, hq, sq, d], k/v [b, hkv, sk, d], query head h uses kv head h // (hq / hkv)."""
    batch, hq, q_len, dim = q.shape
    hkv, kv_len = k.shape[1], k.shape[2]
    group = hq // hkv
    compute = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    dq = torch.zeros(q.shape, dtype=compute)
    dk = torch.zeros(k.shape, dtype=compute)
    dv = torch.zeros(v.shape, dtype=compute)
    allowed_fn = None
    for b, rows, keys, mask_mod in _tiles(block_mask, batch, q_len, kv_len):
        if keys.numel() == 0:
            continue
        r, n = rows.stop - rows.start, keys.numel()
        qi = q[b, :, rows].to(compute).reshape(hkv, group * r, dim)
        doi = grad_out[b, :, rows].to(compute).reshape(hkv, group * r, dim)
        ks, vs = k[b].index_select(1, keys).to(compute), v[b].index_select(1, keys).to(compute)
        scores = (qi @ ks.transpose(1, 2)).mul_(scale)
        if mask_mod is not None:
            if allowed_fn is None:
                allowed_fn = torch.vmap(
                    torch.vmap(mask_mod, in_dims=(None, None, None, 0)), in_dims=(None, None, 0, None)
                )
            allowed = allowed_fn(torch.tensor(b), torch.tensor(0), torch.arange(rows.start, rows.stop), keys)
            scores = scores.view(hkv, group, r, n).masked_fill(~allowed, float("-inf")).view(hkv, group * r, n)
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # rows with no visible key -> 0
        dv[b].index_add_(1, keys, probs.transpose(1, 2) @ doi)
        dprobs = doi @ vs.transpose(1, 2)
        dscores = probs * (dprobs - (probs * dprobs).sum(-1, keepdim=True))
        dq[b, :, rows] = (dscores @ ks).mul_(scale).view(hq, r, dim)
        dk[b].index_add_(1, keys, (dscores.transpose(1, 2) @ qi).mul_(scale))
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
