"""Packed SFT micro-batch -> noised model inputs for the two LLaDA2 training modes.

- full attention: the model reads x_t (answer tokens masked with probability t), bidirectional
  within each packed document.
- block diffusion: the model reads [x_t ; x_0] (length 2S), both halves at the document's
  positions; x_t block b sees x_t block b and x_0 blocks < b, x_0 block b sees x_0 blocks <= b.
Targets are always the clean tokens x_0 at the masked positions of the x_t half, and (editing stream,
diffusion.edit_ratio > 0) at the `edited` positions, where x_t holds a random replacement token; x_0
stays clean.

The positions the loss reads (masked, edited) and each token's answer length are also computed
here, on the host, where the batch is built: on the run device, boolean-mask indexing and per-token
loops make the host wait for the GPU (megadiff.platform.host_reads).
"""

import torch

from megadiff.diffusion.masks import block_diffusion_mask, full_attention_mask
from megadiff.diffusion.noising import noise_batch


def prepare_micro_batch(micro_batch: dict, diffusion, mask_id: int, seed: int, with_dense_mask: bool = True) -> dict:
    """Noise one micro-batch and lay it out for `diffusion.mode`. Keys: input_ids, position_ids,
    allowed (bool mask, True = may attend; omitted with with_dense_mask=False), targets, masked, edited,
    t, loss_mask, doc_ids (all [B, S] except the inputs / mask, which cover 2S in BD mode), and
    loss_positions' masked_at, edited_at, answer_length."""
    epochs = micro_batch["epoch"].unique()
    if epochs.numel() != 1:
        raise ValueError("a micro-batch mixes epochs; the dataset must not do that")
    noised = noise_batch(
        micro_batch,
        mask_id,
        seed,
        int(epochs[0]),
        diffusion.t_low,
        diffusion.t_high,
        complementary=diffusion.complementary_masks,
        edit_ratio=diffusion.edit_ratio,
    )
    clean, noisy = noised["input_ids"], noised["noisy_ids"]
    positions, doc_ids = noised["position_ids"], noised["doc_ids"]
    batch = dict(
        targets=clean,
        masked=noised["masked"],
        edited=noised["edited"],
        t=noised["t"],
        loss_mask=noised["loss_mask"],
        doc_ids=doc_ids,
        sample_ids=noised["sample_ids"],
    )
    if diffusion.mode == "full":
        batch.update(input_ids=noisy, position_ids=positions)
        if with_dense_mask:
            batch["allowed"] = full_attention_mask(doc_ids)
    else:
        batch.update(input_ids=torch.cat([noisy, clean], dim=1), position_ids=torch.cat([positions, positions], dim=1))
        if with_dense_mask:
            batch["allowed"] = block_diffusion_mask(doc_ids, positions, diffusion.block_size)
    batch.update(loss_positions(batch))
    return batch


def document_starts(doc_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """([B, S] bool: a token starts a document; [B, S] long: the column where its document starts).
    A document is a run of one doc id within a row (packing lays documents out contiguously)."""
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    columns = torch.arange(doc_ids.shape[1], device=doc_ids.device).expand_as(doc_ids)
    return starts, torch.where(starts, columns, torch.zeros_like(columns)).cummax(dim=1).values


def per_document_sum(values: torch.Tensor, doc_ids: torch.Tensor) -> torch.Tensor:
    """[B, S]: the sum of `values` ([B, S] integers) over each token's document (no host read)."""
    rows, seq = doc_ids.shape
    _, start_col = document_starts(doc_ids)
    document = torch.arange(rows, device=doc_ids.device)[:, None] * seq + start_col
    sums = torch.zeros(rows * seq, dtype=torch.long, device=doc_ids.device)
    return sums.scatter_add_(0, document.flatten(), values.flatten().long())[document]


def loss_positions(batch: dict) -> dict:
    """What the loss indexes with, from a noised micro-batch: masked_at / edited_at (row and column
    index tensors of the masked / edited positions, in row-major order as boolean indexing gives
    them) and answer_length ([B, S]: the answer tokens of each token's document)."""
    return {
        "masked_at": torch.nonzero(batch["masked"], as_tuple=True),
        "edited_at": torch.nonzero(batch["edited"], as_tuple=True),
        "answer_length": per_document_sum(batch["loss_mask"], batch["doc_ids"]),
    }


def loss_denominator(batch: dict, normalize: str) -> torch.Tensor:
    """The masked-diffusion loss denominator of one prepared micro-batch (known before forward), a
    0-dim double on the batch's device; no host read."""
    if normalize == "masked_tokens":
        return batch["masked"].sum().double()
    if normalize == "answer_tokens":
        return batch["loss_mask"].sum().double()
    starts, _ = document_starts(batch["doc_ids"])  # documents with at least one answer token
    answer_length = per_document_sum(batch["loss_mask"], batch["doc_ids"])
    return (starts & (answer_length > 0)).sum().double()
