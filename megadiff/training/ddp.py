"""Wrap model chunks in megatron-core DDP, with gradient finalisation wired into the schedule."""

from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads


def finalize_model_grads_unscaled(model, num_tokens=None, *args, **kwargs):
    """finalize_model_grads without the division by the global token count, for losses that are
    already divided by their global denominator (the trainer's: their loss functions return 0
    tokens). Skips the token count's broadcast and all-reduce, and the host read of `num_tokens >
    0` that megatron-core 0.16 makes there (0.19 divides by max(num_tokens, 1) instead)."""
    return finalize_model_grads(model, None, *args, **kwargs)


def wrap_ddp(
    chunks: list,
    use_distributed_optimizer: bool = False,
    overlap_grad_reduce: bool = False,
    ddp_config: DistributedDataParallelConfig | None = None,
    divide_by_tokens: bool = True,
) -> list:
    """megatron-core DDP around every chunk (fp32 grad buffers). The schedule then calls
    finalize_model_grads itself: DP/EP gradient reduction, TP sums of sequence-parallel norm
    grads, and division by the global token count (per-token losses; not with
    divide_by_tokens=False). `ddp_config` (the trainer's, from megadiff.training.mcore_configs)
    replaces the two flags."""
    if ddp_config is None:
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=overlap_grad_reduce,
            use_distributed_optimizer=use_distributed_optimizer,
        )
    wrapped = [
        DistributedDataParallel(
            config=chunk.config,
            ddp_config=ddp_config,
            module=chunk,
            disable_bucketing=i > 0,  # only the first chunk overlaps its buckets
        )
        for i, chunk in enumerate(chunks)
    ]
    for chunk in wrapped:
        chunk.config.finalize_model_grads_func = (
            finalize_model_grads if divide_by_tokens else finalize_model_grads_unscaled
        )
    return wrapped
