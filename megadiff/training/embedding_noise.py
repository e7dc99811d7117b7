"""diffusion.mask_embedding_noise: Gaussian noise on the input embeddings of masked positions during
the first steps of a run. The LLaDA2.0 report (§4) uses it against the gradient explosions of early
AR -> diffusion training; it does not publish the scale, so `std` and `steps` are the user's.

The noise of a row comes from a generator seeded by (seed, step, the row's first sample id, its
epoch): a row gets the same noise whatever micro-batch, rank or layout it lands in, and the parity
tests can hand the reference model exactly the same. It is zero except at the masked positions of
the x_t half. The model adds it to its embedding output (megadiff.models.common.gpt.forward_chunk).
"""

import torch

from megadiff.seeding import seeded_generator

NOISE_SEED_DOMAIN = 3  # apart from the shuffle (0), mask (1) and validation (2) seeds


def noise_active(diffusion, step: int) -> bool:
    """Whether 0-based step `step` gets embedding noise."""
    noise = diffusion.mask_embedding_noise
    return bool(noise) and step < noise["steps"] and noise["std"] > 0


def embedding_noise(prepared: dict, raw: dict, hidden_size: int, std: float, seed: int, step: int) -> torch.Tensor:
    """[B, S_in, hidden] noise for one prepared micro-batch (megadiff.training.batch): N(0, std^2) at
    its masked positions, 0 elsewhere (the x_0 half of block diffusion included)."""
    masked = prepared["masked"]  # [B', S]; B' = 2B with complementary masks (copies share their row's noise)
    rows, seq_len = masked.shape
    input_len = prepared["input_ids"].shape[1]
    sample_ids, epochs = raw["sample_ids"], raw["epoch"]
    noise = torch.zeros(rows, input_len, hidden_size)
    for r in range(rows):
        source = r % sample_ids.shape[0]
        generator = seeded_generator(NOISE_SEED_DOMAIN, seed, step, int(sample_ids[source, 0]), int(epochs[source]))
        draw = torch.randn(seq_len, hidden_size, generator=generator) * std
        noise[r, :seq_len] = torch.where(masked[r].cpu()[:, None], draw, 0.0)
    return noise
