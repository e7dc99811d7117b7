"""One call that runs micro-batches through megatron-core's pipeline schedules (PP and VPP included).

Losses follow megatron-core's per-token convention (`calculate_per_token_loss=True`): a loss
function returns (sum of per-token losses, number of tokens, logged values) and gradients are
divided by the global token count in finalize_model_grads, so the result does not depend on how
the batch is split into micro-batches, data-parallel ranks or pipeline stages.
"""

from collections.abc import Callable
from functools import partial

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from .gpt import forward_chunk

# loss_fn(micro_batch, output) -> (loss_sum, num_tokens, {name: tensor})
LossFn = Callable[[dict, torch.Tensor], tuple]


def _forward_step(loss_fn: LossFn, data_iterator, model):
    batch = next(data_iterator)
    output = forward_chunk(
        model, batch["input_ids"], batch["position_ids"], batch.get("allowed"), batch.get("embedding_noise")
    )
    return output, partial(loss_fn, batch)


def forward_backward(
    chunks: list[torch.nn.Module],
    micro_batches: list[dict],
    loss_fn: LossFn,
    forward_only: bool = False,
) -> list[dict]:
    """Run every micro-batch (dicts of [b, s] tensors: input_ids, position_ids, optional allowed
    mask [b, s, s]) through the model. Returns the loss functions' logged dicts (last stage only;
    other stages get []). Every stage needs the full micro-batch: positions and masks are used
    by every layer. Under context parallelism input_ids are this rank's tokens (position ids and
    masks still cover the whole row; megadiff.models.common.context_parallel)."""
    first = micro_batches[0]
    iterators = [iter(micro_batches) for _ in chunks]
    return get_forward_backward_func()(
        forward_step_func=partial(_forward_step, loss_fn),
        data_iterator=iterators if len(chunks) > 1 else iterators[0],
        model=chunks if len(chunks) > 1 else chunks[0],
        num_microbatches=len(micro_batches),
        # megatron-core divides the whole sequence by cp (and tp with SP) for pipeline messages
        seq_length=first["input_ids"].shape[1] * parallel_state.get_context_parallel_world_size(),
        micro_batch_size=first["input_ids"].shape[0],
        forward_only=forward_only,
    )
