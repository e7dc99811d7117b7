"""Masked-diffusion loss, plain-PyTorch reference, returned as sums so micro-batches combine exactly.

The references disagree on weighting and normalisation (LLaDA's SFT weights each masked token by 1/t and
divides by the answer length; dFactory uses no 1/t and divides by the number of masked tokens), so
both are named options:

| option                       | per masked token i           | numerator                      | denominator                        |
|------------------------------|------------------------------|--------------------------------|------------------------------------|
| loss_weight="none" (default) | w_i = 1                      |                                |                                    |
| loss_weight="inverse_t"      | w_i = 1 / t_i                |                                |                                    |
| normalize="masked_tokens"    |                              | sum_i w_i CE_i                 | number of masked tokens            |
| (default; dFactory/LLaDA2)   |                              |                                |                                    |
| normalize="answer_tokens"    |                              | sum_i w_i CE_i                 | number of answer (loss_mask) tokens|
| normalize="sequence"         |                              | sum_docs (sum_{i in doc} w_i   | number of documents with >= 1      |
| (LLaDA SFT, with inverse_t)  |                              |   CE_i) / answer_len(doc)      | answer token                       |
| confidence_beta=beta (CAP)   | H_i = entropy of p(. | x_t)  | cap: sum of H_i over masked i  | cap: number of masked i with       |
|                              |                              |   with argmax_i == target_i    |   argmax == target                 |

CE_i = cross-entropy of logits[i] against x_0[i] (no shift: position i predicts its own token), only at
masked positions. A document is a (row, doc_id) pair; answer_len counts its loss_mask tokens (so in
pad_to_max mode the pad tail counts, as dFactory trains on it).

    loss = numerator / denominator + beta * cap_numerator / cap_denominator       (a term is 0 when its
                                                                                    denominator is 0)

Editing stream (edited, edit_weight; see megadiff.diffusion.noising for how positions are corrupted):
the numerator also gets edit_weight * sum over edited positions e of CE_e (cross-entropy against the
ORIGINAL token x_0[e], divided by answer_len(doc) with normalize="sequence", no 1/t weight: t is the
mask ratio, not the edit ratio). The denominator is unchanged (the M2T one), so the edit term shares
the global normalisation and the loss stays independent of the micro-batch and parallel layout.
Across micro-batches and data-parallel ranks the exact global loss is the same formula applied to the
SUMS of each piece (`loss_from_sums`): sum numerators / sum denominators, and likewise for CAP. The
cross-entropy denominator is known before the forward pass (it only depends on the noise), so a trainer
can scale each micro-batch by the global denominator up front. The CAP denominator depends on the
predictions, so it is only known after every forward of the step; a trainer that must backpropagate each
micro-batch immediately should all-reduce the counts and rescale, or accept the per-micro-batch ratio.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSS_WEIGHTS = ("none", "inverse_t")
NORMALIZATIONS = ("masked_tokens", "answer_tokens", "sequence")


def document_index(doc_ids: torch.Tensor) -> torch.Tensor:
    """Return [B, S] long numbering each (row, doc_id) pair 0..D-1, so documents of different rows differ."""
    row = torch.arange(doc_ids.shape[0], device=doc_ids.device)[:, None].expand_as(doc_ids)
    _, index = torch.unique(torch.stack([row, doc_ids]).flatten(1), dim=1, return_inverse=True)
    return index.view_as(doc_ids)


def loss_from_sums(numerator, denominator, cap_numerator=0.0, cap_denominator=0.0, confidence_beta: float = 0.0):
    """Return numerator/denominator + beta * cap_numerator/cap_denominator; a term with denominator 0 is 0."""
    loss = numerator / denominator if denominator > 0 else numerator * 0.0
    if confidence_beta and cap_denominator > 0:
        loss = loss + confidence_beta * cap_numerator / cap_denominator
    return loss


def masked_diffusion_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    masked: torch.Tensor,
    t: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    doc_ids: torch.Tensor | None = None,
    loss_weight: str = "none",
    normalize: str = "masked_tokens",
    confidence_beta: float = 0.0,
    edited: torch.Tensor | None = None,
    edit_weight: float = 1.0,
) -> tuple[torch.Tensor, dict]:
    """Return (loss, stats) for logits [B, S, V] and targets/masked/t/loss_mask [B, S] (table above).

    doc_ids [B, S] delimits documents (normalize="sequence", `documents` stat); None: one per row.
    stats: numerator, denominator, cap_numerator, cap_denominator (float32 0-dim tensors; numerators carry
    gradients) to be summed across micro-batches/ranks, plus masked_tokens, answer_tokens, documents,
    correct_tokens, ce_sum (unweighted CE over masked tokens), edited_tokens, edit_ce_sum for logging.
    edited [B, S] bool: corrupted visible answer positions (editing stream), None: none.
    """
    if loss_weight not in LOSS_WEIGHTS:
        raise ValueError(f"loss_weight={loss_weight!r} is not one of {', '.join(LOSS_WEIGHTS)}")
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize={normalize!r} is not one of {', '.join(NORMALIZATIONS)}")
    if bool((masked & ~loss_mask).any()):
        raise ValueError("masked has positions outside loss_mask; only answer tokens may be noised")
    if edited is None:
        edited = torch.zeros_like(masked)
    if bool((edited & (masked | ~loss_mask)).any()):
        raise ValueError("edited has masked or non-answer positions; only visible answer tokens may be edited")

    masked_logits = logits[masked].float()
    masked_targets = targets[masked]
    ce = F.cross_entropy(masked_logits, masked_targets, reduction="none")
    weight = torch.ones_like(ce)
    if loss_weight == "inverse_t":
        t_masked = t[masked].float()
        if bool((t_masked <= 0).any()):
            raise ValueError("t must be > 0 at masked positions for loss_weight='inverse_t'")
        weight = 1.0 / t_masked
    weighted = weight * ce

    doc_index = document_index(doc_ids if doc_ids is not None else torch.zeros_like(targets))
    answer_len = torch.bincount(doc_index[loss_mask], minlength=int(doc_index.max()) + 1).float()
    documents = (answer_len > 0).sum()
    if normalize == "sequence":
        numerator = (weighted / answer_len[doc_index[masked]]).sum()
        denominator = documents.float()
    else:
        numerator = weighted.sum()
        denominator = (masked.sum() if normalize == "masked_tokens" else loss_mask.sum()).float()
    edit_ce = F.cross_entropy(logits[edited].float(), targets[edited], reduction="none")
    if normalize == "sequence":
        edit_ce_scaled = edit_ce / answer_len[doc_index[edited]]
    else:
        edit_ce_scaled = edit_ce
    numerator = numerator + edit_weight * edit_ce_scaled.sum()

    correct = masked_logits.argmax(-1) == masked_targets
    if confidence_beta:
        log_p = F.log_softmax(masked_logits[correct], dim=-1)
        cap_numerator = -(log_p.exp() * log_p).sum()
    else:
        cap_numerator = torch.zeros((), device=logits.device)
    cap_denominator = correct.sum().float()

    loss = loss_from_sums(numerator, denominator, cap_numerator, cap_denominator, confidence_beta)
    stats = {
        "numerator": numerator,
        "denominator": denominator,
        "cap_numerator": cap_numerator,
        "cap_denominator": cap_denominator,
        "masked_tokens": masked.sum(),
        "answer_tokens": loss_mask.sum(),
        "documents": documents,
        "correct_tokens": correct.sum(),
        "ce_sum": ce.detach().sum(),
        "edited_tokens": edited.sum(),
        "edit_ce_sum": edit_ce.detach().sum(),
    }
    return loss, stats
