"""Masked-diffusion loss on vocab-parallel logits (never gathers the vocabulary over TP).

The same quantities as megadiff.diffusion.loss (the plain-PyTorch reference), computed with
megatron-core's vocab-parallel cross entropy. The trainer divides by the GLOBAL denominator of the
step (all micro-batches, all data-parallel ranks; it only depends on the noise, so it is known
before the forward pass), which makes the loss and its gradients independent of the layout.

CAP (confidence_beta > 0): beta * sum of predictive entropy at masked positions predicted
correctly, divided by the same global denominator (not by the number of correct positions, which
is only known after every forward of the step).

Editing stream (batch["edited"], diffusion.edit_weight): edit_weight * CE against the original token
at the corrupted positions joins the numerator (divided by the answer length with
normalize="sequence"); the denominator stays the M2T one (megadiff.diffusion.loss).

No host reads: the masked / edited positions and the answer lengths come with the batch
(megadiff.training.batch.loss_positions, computed on the host where the batch is built), so the
loss gathers with index tensors of known size instead of boolean masks.
"""

import torch
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

from megadiff.training.batch import per_document_sum


class _VocabParallelEntropy(torch.autograd.Function):
    """Entropy H = log Z - E_p[logit] of softmax over a TP-sharded vocabulary.

    Backward is local: dH/dlogit_i = -p_i * (logit_i - E_p[logit]); no communication needed."""

    @staticmethod
    def forward(ctx, logits, group):
        global_max = logits.max(dim=-1).values
        torch.distributed.all_reduce(global_max, op=torch.distributed.ReduceOp.MAX, group=group)
        shifted = logits - global_max.unsqueeze(-1)
        sum_exp = shifted.exp().sum(-1)
        torch.distributed.all_reduce(sum_exp, group=group)
        probs = (shifted - sum_exp.log().unsqueeze(-1)).exp()
        expected = (probs * shifted).sum(-1)
        torch.distributed.all_reduce(expected, group=group)
        ctx.save_for_backward(probs, shifted, expected)
        return sum_exp.log() - expected

    @staticmethod
    def backward(ctx, grad_entropy):
        probs, shifted, expected = ctx.saved_tensors
        grad = -probs * (shifted - expected.unsqueeze(-1)) * grad_entropy.unsqueeze(-1)
        return grad, None


def _vocab_parallel_entropy_and_correct(logits: torch.Tensor, targets: torch.Tensor):
    """Entropy of softmax(logits) and whether argmax == target, for [n, V/tp] vocab shards."""
    group = ps.get_tensor_model_parallel_group()
    rank = ps.get_tensor_model_parallel_rank()
    entropy = _VocabParallelEntropy.apply(logits, group)
    global_max = logits.detach().max(dim=-1).values
    torch.distributed.all_reduce(global_max, op=torch.distributed.ReduceOp.MAX, group=group)
    vocab_start = rank * logits.shape[-1]
    local = (targets >= vocab_start) & (targets < vocab_start + logits.shape[-1])
    index = (targets - vocab_start).clamp(0, logits.shape[-1] - 1)[:, None]
    target_logit = torch.where(local, logits.detach().gather(-1, index)[:, 0], torch.zeros_like(global_max))
    torch.distributed.all_reduce(target_logit, group=group)
    return entropy, target_logit >= global_max


def _positions(batch: dict, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, columns) of batch[name]'s True positions; from batch[name + "_at"] when the batch
    brings them (prepare_micro_batch does), else computed here: a host wait on a GPU."""
    return batch.get(f"{name}_at") or torch.nonzero(batch[name], as_tuple=True)


def _answer_length(batch: dict) -> torch.Tensor:
    if "answer_length" in batch:
        return batch["answer_length"]
    return per_document_sum(batch["loss_mask"], batch["doc_ids"])


def diffusion_loss_sums(logits: torch.Tensor, batch: dict, diffusion) -> dict:
    """Sums over one micro-batch: `numerator` (weighted CE at masked positions, with grad),
    `cap_numerator` (entropy at correctly predicted masked positions, with grad), and counts.

    logits: [B, S_in, V/tp] from the model; only the first S (the x_t half) is used (S_in is S,
    2S, or S plus sequence-parallel padding with the x_t-only head)."""
    targets, masked = batch["targets"], batch["masked"]
    at = _positions(batch, "masked")  # columns < S: the x_t half
    selected = logits[at].float()  # [n, V/tp]
    chosen = targets[at]
    ce = vocab_parallel_cross_entropy(selected.clone(), chosen)
    weight = torch.ones_like(ce)
    if diffusion.loss_weight == "inverse_t":
        weight = 1.0 / batch["t"][at].float()
    if diffusion.normalize == "sequence":
        weight = weight / _answer_length(batch)[at].to(weight)
    numerator = (weight * ce).sum()
    if batch.get("edited") is not None:
        edited_at = _positions(batch, "edited")
        if edited_at[0].numel():  # a size: known on the host
            edit_ce = vocab_parallel_cross_entropy(logits[edited_at].float().clone(), targets[edited_at])
            if diffusion.normalize == "sequence":
                edit_ce = edit_ce / _answer_length(batch)[edited_at].to(edit_ce)
            numerator = numerator + diffusion.edit_weight * edit_ce.sum()
    out = {"numerator": numerator, "ce_sum": ce.detach().sum(), "masked_tokens": masked.sum()}
    if diffusion.confidence_beta:
        entropy, correct = _vocab_parallel_entropy_and_correct(selected, chosen)
        out["cap_numerator"] = (entropy * correct).sum()
        out["correct_tokens"] = correct.sum()
    else:
        out["cap_numerator"] = selected.sum() * 0.0
    return out
