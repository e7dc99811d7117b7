"""The trainer under context parallelism (parallel.cp > 1): this rank's part of a micro-batch, and
its share of the loss denominator (the config checks are megadiff.training.config's).

Every rank of a CP group reads the same micro-batches (they share a data-parallel rank) and keeps,
of each, what it computes on (megadiff.models.common.context_parallel has the zig-zag partition):
- what the model embeds per token (input_ids, embedding noise): its zig-zag part of the model's
  sequence ([x_t ; x_0] in block diffusion, x_t in full attention);
- what the loss reads per x_t token (targets, masked, edited, t, loss_mask, answer lengths): the x_t
  positions among those, in the same order as the logits the model returns for them (block
  diffusion: the first half of the rank's tokens, which the x_t-only output layer keeps);
- whole rows of what describes a row (position_ids: megatron-core slices RoPE itself; doc_ids and
  sample_ids: the step's token and FLOP counts, reduced over DP only as without CP).
Per-document quantities of the loss (answer lengths, which documents the `sequence` normalisation
counts) are computed on the whole row first: a document can span ranks.

Reductions: each rank's loss is its tokens' share of the numerator over the global denominator, and
the denominator is the sum of every rank's share (`loss_denominator_share`) over the data-parallel
group *with* the CP ranks (`ps.get_data_parallel_group(with_context_parallel=True)`): the trainer
all-reduces it, and the loss it logs, there. megatron-core's DDP sums gradients over the same group
when the CP groups exist (calculate_per_token_loss: no averaging), so the gradient is exact.
"""

import torch

from megadiff.diffusion.loss import document_index
from megadiff.models.common.context_parallel import zigzag_positions
from megadiff.training.batch import loss_denominator

# Keys of a prepared micro-batch (megadiff.training.batch.prepare_micro_batch and the trainer).
MODEL_TOKEN_KEYS = ("input_ids", "embedding_noise")  # [B, model sequence, ...]: what the model embeds
LOSS_TOKEN_KEYS = ("targets", "masked", "edited", "t", "loss_mask", "answer_length", "counted_document")
WHOLE_ROW_KEYS = ("position_ids", "doc_ids", "sample_ids", "epoch", "allowed")
LOSS_POSITION_KEYS = ("masked_at", "edited_at")  # (rows, columns) of a LOSS_TOKEN_KEYS mask: recomputed
CP_LOCAL = "cp_local"  # marks a micro-batch that holds one CP rank's part


def split_micro_batch(batch: dict, mode: str, cp: int, cp_rank: int) -> dict:
    """CP rank `cp_rank`'s part of a prepared micro-batch (see the module docstring); `mode` is
    diffusion.mode. The BlockMask in "allowed" must already be the rank's (block_mask_for(cp=...))."""
    if cp == 1:
        return batch
    seq = batch["targets"].shape[1]
    model_len = batch["input_ids"].shape[1]
    device = batch["input_ids"].device
    positions = zigzag_positions(model_len, cp, cp_rank, device)
    xt_positions = positions[positions < seq]  # block diffusion: the first half; full: all
    batch = dict(batch, **loss_document_terms(batch))
    local = {CP_LOCAL: True}
    for key, value in batch.items():
        if key in MODEL_TOKEN_KEYS:
            local[key] = value.index_select(1, positions)
        elif key in LOSS_TOKEN_KEYS:
            local[key] = value.index_select(1, xt_positions)
        elif key in WHOLE_ROW_KEYS or key in LOSS_POSITION_KEYS or not isinstance(value, torch.Tensor):
            local[key] = value
        else:
            raise ValueError(
                f"context parallel ({mode}): the micro-batch key {key!r} is neither per token nor per row in "
                f"megadiff.training.context_parallel; name it in MODEL_TOKEN_KEYS, LOSS_TOKEN_KEYS or WHOLE_ROW_KEYS"
            )
    for key in LOSS_POSITION_KEYS:  # index tensors of the local masks, as prepare_micro_batch builds them
        if key in batch:
            local[key] = torch.nonzero(local[key.removesuffix("_at")], as_tuple=True)
    return local


def loss_document_terms(batch: dict) -> dict:
    """Per-token terms of the loss that depend on a whole document, from whole rows: answer_length
    (the answer tokens of the token's document; normalize=sequence divides by it) and
    counted_document (True at the first answer token of each document: it counts the document in
    the `sequence` denominator). Kept when the batch already has them."""
    if "answer_length" in batch and "counted_document" in batch:
        return {}
    loss_mask = batch["loss_mask"]
    document = document_index(batch["doc_ids"])  # numbers (row, doc) pairs
    flat_doc, flat_answer = document.flatten(), loss_mask.flatten()
    answer_length = torch.bincount(flat_doc[flat_answer], minlength=int(document.max()) + 1)
    columns = torch.arange(flat_doc.numel(), device=flat_doc.device)
    first = torch.full_like(answer_length, flat_doc.numel()).scatter_reduce(
        0, flat_doc[flat_answer], columns[flat_answer], reduce="amin"
    )
    counted = flat_answer & (columns == first[flat_doc])
    return {"answer_length": answer_length[document], "counted_document": counted.view_as(loss_mask)}


def loss_denominator_share(batch: dict, normalize: str) -> torch.Tensor:
    """This rank's share of the loss denominator (a 0-dim double): the micro-batch's own without
    CP; under CP the part of its tokens, which the DP x CP all-reduce adds up."""
    if not batch.get(CP_LOCAL):
        return loss_denominator(batch, normalize)
    if normalize == "masked_tokens":
        return batch["masked"].sum().double()
    if normalize == "answer_tokens":
        return batch["loss_mask"].sum().double()
    return batch["counted_document"].sum().double()
