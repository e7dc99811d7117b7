"""log p(continuation | context) under a diffusion LLM: a Monte-Carlo estimate of the diffusion ELBO.

lm-eval's `loglikelihood` asks for log p(y | c). A masked-diffusion model has no left-to-right
factorisation; LLaDA's evaluation (`eval_llada.py`) estimates the ELBO instead, and so does this module:

    log p(y | c)  >=  E_t [ (1/t) * sum over masked positions i of log p_theta(y_i | c, y_t) ]

- the context c stays clean; of the L continuation tokens, MC sample k masks exactly n_k, at positions
  drawn uniformly, and t_k = n_k / L;
- the n_k are stratified as in LLaDA: one offset o ~ U{1..L}, n_k = round(o + k * L / mc_num), wrapped
  into [1, L], for k = 0 .. mc_num-1, so the mask ratios cover (0, 1] evenly;
- estimate = -(1/mc_num) * sum_k sum_{masked i} CE_i / t_k (cross-entropy over the full vocabulary,
  as in training).

LLaDA2 is a block-diffusion model (blocks of `block_length`, 32): as in its training, a noised block sees
the clean tokens of earlier blocks (the [x_t ; x_0] input of megadiff.diffusion.masks.block_diffusion_mask),
and every block of the continuation is noised with the same t (the block ELBO of the LLaDA2.0 report,
§5.3). With block_length at least the sequence length this is LLaDA's full-attention estimate (what the
lm-eval model uses for families trained with full attention, LLaDA and LLaDA-MoE: no cache is needed).

How it is computed: the clean half (x_0, block-causal) does not depend on the noise, so each request runs
it once and keeps it as a KV cache; every MC sample then runs only the noised blocks (from the block that
holds the continuation's first token) against that cache. For those positions this is what the full
[x_t ; x_0] forward computes (tests compare the two), without paying for x_0 once per sample. MC samples
of several requests share a forward (right padding, one attention mask per row), batch_size rows at a time.

The noise of a request depends only on (seed, its context ids, its continuation ids), so a result does not
depend on batch_size, the order of the requests or which of them share a forward (beyond float rounding).
One difference from LLaDA's script: it draws one offset per batch of batch_size samples (and needs
mc_num % batch_size == 0); here one offset covers all mc_num samples of a request.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from megadiff.inference.sampler import model_config_of
from megadiff.seeding import seeded_generator

LIKELIHOOD_SEED_DOMAIN = 2  # apart from the dataset's shuffle (0) and the training noise (1)


def stratified_mask_counts(length: int, mc_num: int, generator: torch.Generator) -> torch.Tensor:
    """[mc_num] long: how many of `length` tokens each MC sample masks (LLaDA's stratification)."""
    offset = int(torch.randint(1, length + 1, (), generator=generator))
    counts = torch.round(offset + torch.arange(mc_num, dtype=torch.float64) * (length / mc_num)).long()
    return (counts - 1) % length + 1


def continuation_noise(
    seed: int, context: Sequence[int], continuation: Sequence[int], mc_num: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(masks [mc_num, L] bool, t [mc_num] float64) for one request: which continuation tokens each MC
    sample masks, and its mask ratio. Depends only on the seed and the token ids."""
    length = len(continuation)
    generator = seeded_generator(LIKELIHOOD_SEED_DOMAIN, seed, len(context), *context, *continuation)
    counts = stratified_mask_counts(length, mc_num, generator)
    masks = torch.zeros(mc_num, length, dtype=torch.bool)
    for k, count in enumerate(counts.tolist()):
        masks[k, torch.randperm(length, generator=generator)[:count]] = True
    return masks, counts.double() / length


@dataclass
class _Request:
    """One (context, continuation) pair laid out on the block grid."""

    ids: list[int]  # context + continuation
    context_len: int
    start: int  # first position of the block holding the first continuation token
    cache_end: int  # first position of the last block: the clean prefix the noised blocks may see
    masks: torch.Tensor
    t: torch.Tensor


def check_pairs(pairs, vocab_size: int, mask_id: int, max_positions: int | None) -> None:
    """ValueError naming pairs[i] when its ids cannot be scored (mask token, out of vocabulary, too long)."""
    for i, (context, continuation) in enumerate(pairs):
        for part, ids in (("context", context), ("continuation", continuation)):
            for token in ids:
                if token == mask_id:
                    raise ValueError(f"pairs[{i}]: the {part} holds the mask token {mask_id}; it cannot be scored")
                if not 0 <= token < vocab_size:
                    raise ValueError(f"pairs[{i}]: {part} token {token} is outside the vocabulary [0, {vocab_size})")
        total = len(context) + len(continuation)
        if max_positions is not None and total > max_positions:
            raise ValueError(
                f"pairs[{i}]: context + continuation is {total} tokens, beyond the model's "
                f"max_position_embeddings={max_positions}"
            )


@torch.no_grad()
def estimate_loglikelihoods(
    model,
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    mask_id: int,
    mc_num: int,
    batch_size: int,
    block_length: int,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
) -> list[float]:
    """The ELBO estimate of log p(continuation | context) for each (context ids, continuation ids) pair
    (module docstring). An empty continuation scores 0. `progress(n)` is called as n requests finish.
    model: a reference model (called like the sampler calls it; a KV cache only with block_length below the
    sequence length, which LLaDA2's reference has)."""
    for name, value in (("mc_num", mc_num), ("batch_size", batch_size), ("block_length", block_length)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    pairs = [([int(t) for t in c], [int(t) for t in y]) for c, y in pairs]
    config = model_config_of(model)
    check_pairs(pairs, config.vocab_size, mask_id, getattr(config, "max_position_embeddings", None))
    requests = {}
    for i, (context, continuation) in enumerate(pairs):
        if not continuation:
            continue
        masks, t = continuation_noise(seed, context, continuation, mc_num)
        total = len(context) + len(continuation)
        requests[i] = _Request(
            ids=context + continuation,
            context_len=len(context),
            start=len(context) // block_length * block_length,
            cache_end=(total - 1) // block_length * block_length,
            masks=masks,
            t=t,
        )
    totals = dict.fromkeys(requests, 0.0)
    if progress and len(requests) < len(pairs):
        progress(len(pairs) - len(requests))
    device = next(model.parameters()).device
    # Longest first, so requests of similar length share forwards; a group's clean prefixes run together.
    order = sorted(requests, key=lambda i: -len(requests[i].ids))
    per_group = max(1, batch_size // mc_num)
    for first in range(0, len(order), per_group):
        group = [requests[i] for i in order[first : first + per_group]]
        cache = _clean_prefix_cache(model, group, block_length, mask_id, device)
        samples = [(j, k) for j in range(len(group)) for k in range(mc_num)]
        for at in range(0, len(samples), batch_size):
            chunk = samples[at : at + batch_size]
            sums = _noised_forward(model, group, chunk, cache, block_length, mask_id, device)
            for (j, _), value in zip(chunk, sums.tolist(), strict=True):
                totals[order[first + j]] += value
        if progress:
            progress(len(group))
    return [-totals[i] / mc_num if i in totals else 0.0 for i in range(len(pairs))]


def _clean_prefix_cache(model, group: list[_Request], block_length: int, pad_id: int, device):
    """The keys/values of each request's clean tokens before its last block, block-causal (what the
    x_0 half of block diffusion computes); rows padded on the right. None when no request has any."""
    length = max(r.cache_end for r in group)
    if length == 0:
        return None
    ids = torch.full((len(group), length), pad_id, dtype=torch.long)
    for j, r in enumerate(group):
        ids[j, : r.cache_end] = torch.tensor(r.ids[: r.cache_end])
    positions = torch.arange(length)
    block = positions // block_length
    valid = positions[None, :] < torch.tensor([r.cache_end for r in group])[:, None]
    allowed = valid[:, None, :] & (block[None, None, :] <= block[None, :, None])
    allowed |= torch.eye(length, dtype=torch.bool)  # a padding query sees itself (no empty softmax row)
    out = model(
        ids.to(device),
        position_ids=positions.expand(len(group), -1).to(device),
        attention_mask=allowed.to(device),
        use_cache=True,
    )
    return out.past_key_values


def _noised_forward(model, group, chunk, cache, block_length: int, mask_id: int, device) -> torch.Tensor:
    """[len(chunk)] float64: sum over masked positions of CE / t for each (request j, sample k) row."""
    rows = [group[j] for j, _ in chunk]
    width = max(len(r.ids) - r.start for r in rows)
    ids = torch.full((len(rows), width), mask_id, dtype=torch.long)
    targets = torch.zeros((len(rows), width), dtype=torch.long)
    masked = torch.zeros((len(rows), width), dtype=torch.bool)
    for row, (r, (_, k)) in enumerate(zip(rows, chunk, strict=True)):
        region = torch.tensor(r.ids[r.start :])
        targets[row, : len(region)] = region
        masked[row, r.context_len - r.start : len(region)] = r.masks[k]
        ids[row, : len(region)] = torch.where(masked[row, : len(region)], mask_id, region)
    starts = torch.tensor([r.start for r in rows])
    positions = starts[:, None] + torch.arange(width)[None, :]
    q_block = positions // block_length
    in_region = torch.arange(width)[None, :] < torch.tensor([len(r.ids) - r.start for r in rows])[:, None]
    allowed = in_region[:, None, :] & (q_block[:, :, None] == q_block[:, None, :])
    allowed |= torch.eye(width, dtype=torch.bool)  # a padding query sees itself
    past = None
    if cache is not None:
        cache_len = cache[0][0].shape[2]
        key_block = torch.arange(cache_len) // block_length
        cached = torch.arange(cache_len)[None, :] < torch.tensor([r.cache_end for r in rows])[:, None]
        allowed = torch.cat([cached[:, None, :] & (key_block[None, None, :] < q_block[:, :, None]), allowed], dim=2)
        index = torch.tensor([j for j, _ in chunk], device=device)
        past = [(k.index_select(0, index), v.index_select(0, index)) for k, v in cache]
    cached = {} if past is None else dict(past_key_values=past, use_cache=False)  # references without a cache
    logits = model(
        ids.to(device), position_ids=positions.to(device), attention_mask=allowed.to(device), **cached
    ).logits
    masked = masked.to(device)
    ce = F.cross_entropy(logits[masked].float(), targets.to(device)[masked], reduction="none").double()
    row_of = torch.arange(len(rows), device=device)[:, None].expand_as(masked)[masked]
    sums = torch.zeros(len(rows), dtype=torch.float64, device=device).index_add_(0, row_of, ce)
    t = torch.stack([group[j].t[k] for j, k in chunk]).to(device)
    return (sums / t).cpu()
