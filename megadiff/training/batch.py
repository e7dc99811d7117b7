"""Packed SFT micro-batch -> noised model inputs for the two LLaDA2 training modes.

- full attention: the model reads x_t (answer tokens masked with probability t), bidirectional
  within each packed document.
- block diffusion: the model reads [x_t ; x_0] (length 2S), both halves at the document's
  positions; x_t block b sees x_t block b and x_0 blocks < b, x_0 block b sees x_0 blocks <= b.
Targets are always the clean tokens x_0 at the masked positions of the x_t half, and (editing stream,
diffusion.edit_ratio > 0) at the `edited` positions, where x_t holds a random replacement token; x_0
stays clean.
"""

import torch

from megadiff.diffusion.masks import block_diffusion_mask, full_attention_mask
from megadiff.diffusion.noising import noise_batch


def prepare_micro_batch(micro_batch: dict, diffusion, mask_id: int, seed: int, with_dense_mask: bool = True) -> dict:
    """Noise one micro-batch and lay it out for `diffusion.mode`. Keys: input_ids, position_ids,
    allowed (bool mask, True = may attend; omitted with with_dense_mask=False), targets, masked, edited,
    t, loss_mask, doc_ids (all [B, S] except the inputs / mask, which cover 2S in BD mode)."""
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
    return batch


def loss_denominator(batch: dict, normalize: str) -> torch.Tensor:
    """The masked-diffusion loss denominator of one prepared micro-batch (known before forward)."""
    if normalize == "masked_tokens":
        return batch["masked"].sum().double()
    if normalize == "answer_tokens":
        return batch["loss_mask"].sum().double()
    documents = set()
    rows, cols = torch.nonzero(batch["loss_mask"], as_tuple=True)
    for r, c in zip(rows.tolist(), cols.tolist(), strict=True):
        documents.add((r, int(batch["doc_ids"][r, c])))
    return torch.tensor(float(len(documents)), dtype=torch.double, device=batch["doc_ids"].device)
