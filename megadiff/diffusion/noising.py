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
"""

from __future__ import annotations

import torch

from megadiff.data.seeding import seeded_generator

NOISE_SEED_DOMAIN = 1  # keeps noise seeds apart from the dataset's shuffle seeds


def document_noise(seed: int, sample_id: int, epoch: int, length: int, t_low: float, t_high: float):
    """Return (t, u[length]) of one document: its mask ratio and its per-position uniforms."""
    generator = seeded_generator(NOISE_SEED_DOMAIN, seed, sample_id, epoch)
    t = t_low + (t_high - t_low) * torch.rand((), generator=generator).item()
    return t, torch.rand(length, generator=generator)


def noise_batch(
    batch: dict,
    mask_id: int,
    seed: int,
    epoch: int,
    t_low: float = 0.3,
    t_high: float = 0.8,
    complementary: bool = False,
) -> dict:
    """Return a copy of `batch` with noisy_ids (x_t, long), masked (bool) and t (float32), all [B, S].

    `batch` needs input_ids, position_ids, doc_ids, loss_mask, sample_ids ([B, S]); t is the t of each
    token's document, 0 where there is no document (pack-mode fill, sample id -1).
    """
    if not 0.0 < t_low <= t_high <= 1.0:
        raise ValueError(f"need 0 < t_low <= t_high <= 1, got t_low={t_low}, t_high={t_high}")
    input_ids, loss_mask = batch["input_ids"], batch["loss_mask"]
    sample_ids, positions, doc_ids = batch["sample_ids"].cpu(), batch["position_ids"].cpu(), batch["doc_ids"].cpu()
    u = torch.ones(input_ids.shape, dtype=torch.float32)  # u = 1 never masks
    t = torch.zeros(input_ids.shape, dtype=torch.float32)
    for b in range(input_ids.shape[0]):
        start = 0
        for count in torch.unique_consecutive(doc_ids[b], return_counts=True)[1].tolist():
            span = slice(start, start + count)
            start += count
            sample_id = int(sample_ids[b, span.start])
            if sample_id < 0:  # fill: no document, no noise
                continue
            pos = positions[b, span]
            doc_t, doc_u = document_noise(seed, sample_id, epoch, int(pos.max()) + 1, t_low, t_high)
            t[b, span] = doc_t
            u[b, span] = doc_u[pos]
    u, t = u.to(input_ids.device), t.to(input_ids.device)
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
    out["noisy_ids"] = torch.where(masked, torch.full_like(input_ids, mask_id), input_ids)
    out["masked"] = masked
    out["t"] = t
    return out
