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
"""

import torch
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy


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


def _answer_lengths(batch: dict, selected: torch.Tensor) -> torch.Tensor:
    """[n]: the answer length (loss_mask tokens) of the document of each selected position."""
    if "answer_length" in batch:  # per token, from whole rows (a context-parallel rank's part of a row)
        return batch["answer_length"][selected]
    doc = batch["doc_ids"]
    answer_len = {}
    for r, c in zip(*[x.tolist() for x in torch.nonzero(batch["loss_mask"], as_tuple=True)], strict=True):
        key = (r, int(doc[r, c]))
        answer_len[key] = answer_len.get(key, 0) + 1
    rows, cols = torch.nonzero(selected, as_tuple=True)
    return torch.tensor([answer_len[(r, int(doc[r, c]))] for r, c in zip(rows.tolist(), cols.tolist(), strict=True)])


def diffusion_loss_sums(logits: torch.Tensor, batch: dict, diffusion) -> dict:
    """Sums over one micro-batch: `numerator` (weighted CE at masked positions, with grad),
    `cap_numerator` (entropy at correctly predicted masked positions, with grad), and counts.

    logits: [B, S_in, V/tp] from the model; only the first S (the x_t half) is used (S_in is S,
    2S, or S plus sequence-parallel padding with the x_t-only head)."""
    targets, masked = batch["targets"], batch["masked"]
    x_t_logits = logits[:, : targets.shape[1]]
    selected = x_t_logits[masked].float()  # [n, V/tp]
    chosen = targets[masked]
    ce = vocab_parallel_cross_entropy(selected.clone(), chosen)
    weight = torch.ones_like(ce)
    if diffusion.loss_weight == "inverse_t":
        weight = 1.0 / batch["t"][masked].float()
    if diffusion.normalize == "sequence":
        weight = weight / _answer_lengths(batch, masked).to(weight)
    numerator = (weight * ce).sum()
    edited = batch.get("edited")
    if edited is not None and bool(edited.any()):
        edit_ce = vocab_parallel_cross_entropy(x_t_logits[edited].float().clone(), targets[edited])
        if diffusion.normalize == "sequence":
            edit_ce = edit_ce / _answer_lengths(batch, edited).to(edit_ce)
        numerator = numerator + diffusion.edit_weight * edit_ce.sum()
    out = {"numerator": numerator, "ce_sum": ce.detach().sum(), "masked_tokens": masked.sum()}
    if diffusion.confidence_beta:
        entropy, correct = _vocab_parallel_entropy_and_correct(selected, chosen)
        out["cap_numerator"] = (entropy * correct).sum()
        out["correct_tokens"] = correct.sum()
    else:
        out["cap_numerator"] = selected.sum() * 0.0
    return out
