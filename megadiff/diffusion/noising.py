"""Forward process of masked diffusion: x_0 -> x_t by replacing answer tokens with `<|mask|>`.

Every document (sample) draws its own t ~ U(t_low, t_high) and one uniform u per token, from a generator
seeded by (seed, global sample index, epoch); a token is masked iff it is an answer token (loss_mask)
and u < t. The uniform of a token is indexed by its position in its document, so the noise a sample
gets does not depend on the row, micro-batch, rank or parallel layout it lands in, nor on the packing
mode (pad_to_max only appends uniforms for its pad tail). Prompt tokens are never masked.
Default t range (0.3, 0.8) is dFactory's "mask-ratio bandwidth" for LLaDA2 (t ~ U(0.3, 0.8)).

complementary=True (LLaDA2.0 complementary masking) returns 2B rows: rows [0, B) are the batch noised
as above, rows [B, 2B) are the same rows masked exactly at the answer tokens rows [0, B) left unmasked
(u >= t). A token of the second copy is thus masked with probability 1 - t, so its `t` is 1 - t (what
the 1/t loss weight must use); second-copy t lies in [1 - t_high, 1 - t_low].

Editing (T2T) stream, edit_ratio > 0: our construction of LLaDA2.1's published description ("a mixture
of M2T and T2T objectives", T2T "recovers original tokens from random noise perturbations"; the paper
does not publish the recipe). An answer token that the mask left visible is a candidate with
probability edit_ratio (one more uniform v per position, drawn after u from the same document
generator, so the mask noise is unchanged); a candidate is replaced by a token drawn uniformly from the
positions of ITS OWN document's answer. Why the document's own tokens and not the vocabulary minus
special tokens: (1) they are real, in-distribution tokens, never the mask, a padded-vocabulary row or
a special id, with no list of specials to keep right; (2) they are the plausible, frequency-matched
mistakes a drafting model makes (a token from elsewhere in the answer), not uniform junk that is
trivially spotted; (3) they depend on the document only, so the noise stays independent of the row,
micro-batch, rank and layout (the batch's tokens would not). A candidate whose draw equals its own
token is not corrupted. `edited` marks the corrupted positions: x_t holds the replacement there, and
the loss asks for the original token (megadiff.diffusion.loss). With complementary masks each copy
corrupts the candidates that its own mask leaves visible.
"""

from __future__ import annotations

import torch

from megadiff.seeding import seeded_generator

NOISE_SEED_DOMAIN = 1  # keeps noise seeds apart from the dataset's shuffle seeds


def document_noise(
    seed: int, sample_id: int, epoch: int, length: int, t_low: float, t_high: float, with_edits: bool = False
):
    """Return (t, u[length]) of one document: its mask ratio and its per-position uniforms; with
    with_edits also (v[length], w[length]): the edit-candidate uniforms and the uniforms that pick
    each position's replacement among the document's answer tokens."""
    generator = seeded_generator(NOISE_SEED_DOMAIN, seed, sample_id, epoch)
    t = t_low + (t_high - t_low) * torch.rand((), generator=generator).item()
    u = torch.rand(length, generator=generator)
    if not with_edits:
        return t, u
    return t, u, torch.rand(length, generator=generator), torch.rand(length, generator=generator)


def noise_batch(
    batch: dict,
    mask_id: int,
    seed: int,
    epoch: int,
    t_low: float = 0.3,
    t_high: float = 0.8,
    complementary: bool = False,
    edit_ratio: float = 0.0,
) -> dict:
    """Return a copy of `batch` with noisy_ids (x_t, long), masked (bool), edited (bool) and t
    (float32), all [B, S].

    `batch` needs input_ids, position_ids, doc_ids, loss_mask, sample_ids ([B, S]); t is the t of each
    token's document, 0 where there is no document (pack-mode fill, sample id -1). edit_ratio: the
    probability that a visible answer token is a candidate for replacement (module docstring).
    """
    if not 0.0 < t_low <= t_high <= 1.0:
        raise ValueError(f"need 0 < t_low <= t_high <= 1, got t_low={t_low}, t_high={t_high}")
    if not 0.0 <= edit_ratio <= 1.0:
        raise ValueError(f"need 0 <= edit_ratio <= 1, got edit_ratio={edit_ratio}")
    input_ids, loss_mask = batch["input_ids"], batch["loss_mask"]
    sample_ids, positions, doc_ids = batch["sample_ids"].cpu(), batch["position_ids"].cpu(), batch["doc_ids"].cpu()
    u = torch.ones(input_ids.shape, dtype=torch.float32)  # u = 1 never masks
    t = torch.zeros(input_ids.shape, dtype=torch.float32)
    candidate = torch.zeros(input_ids.shape, dtype=torch.bool)
    replacement = input_ids.cpu().clone()
    cpu_ids, cpu_loss_mask = input_ids.cpu(), loss_mask.cpu()
    for b in range(input_ids.shape[0]):
        start = 0
        for count in torch.unique_consecutive(doc_ids[b], return_counts=True)[1].tolist():
            span = slice(start, start + count)
            start += count
            sample_id = int(sample_ids[b, span.start])
            if sample_id < 0:  # fill: no document, no noise
                continue
            pos = positions[b, span]
            noise = document_noise(seed, sample_id, epoch, int(pos.max()) + 1, t_low, t_high, edit_ratio > 0)
            t[b, span] = noise[0]
            u[b, span] = noise[1][pos]
            answer = cpu_loss_mask[b, span]
            if edit_ratio > 0 and bool(answer.any()):
                # the document's answer tokens in position order (the same list at every layout)
                pool = cpu_ids[b, span][answer][torch.argsort(pos[answer])]
                drawn = pool[(noise[3][pos] * len(pool)).long().clamp_max(len(pool) - 1)]
                replacement[b, span] = drawn
                candidate[b, span] = answer & (noise[2][pos] < edit_ratio) & (drawn != cpu_ids[b, span])
    u, t = u.to(input_ids.device), t.to(input_ids.device)
    candidate, replacement = candidate.to(input_ids.device), replacement.to(input_ids.device)
    masked = loss_mask & (u < t)
    out = dict(batch)
    if complementary:
        out = {
            k: torch.cat([v, v]) if torch.is_tensor(v) and v.shape[:1] == input_ids.shape[:1] else v
            for k, v in batch.items()
        }
        masked = torch.cat([masked, loss_mask & ~masked])
        t = torch.cat([t, torch.where(t > 0, 1.0 - t, t)])
        input_ids = out["input_ids"]
        candidate, replacement = torch.cat([candidate, candidate]), torch.cat([replacement, replacement])
    edited = candidate & ~masked
    noisy = torch.where(edited, replacement, input_ids)
    out["noisy_ids"] = torch.where(masked, torch.full_like(input_ids, mask_id), noisy)
    out["masked"] = masked
    out["edited"] = edited
    out["t"] = t
    return out
