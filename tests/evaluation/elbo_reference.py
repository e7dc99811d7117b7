"""The loglikelihood estimator computed the plain way, as the tests' oracle: the whole [x_t ; x_0]
block-diffusion input of training (megadiff.diffusion.masks.block_diffusion_mask), one request at a
time, all MC samples in one forward, no cache, no padding; float64 sums."""

import torch
import torch.nn.functional as F

from megadiff.diffusion.masks import block_diffusion_mask
from megadiff.evaluation.likelihood import continuation_noise


@torch.no_grad()
def direct_loglikelihood(model, context, continuation, *, mask_id, mc_num, block_length, seed):
    """-(1/mc_num) * sum_k sum_{masked i} CE_i / t_k, with the noise of continuation_noise(seed, ...)."""
    if not continuation:
        return 0.0
    masks, t = continuation_noise(seed, context, continuation, mc_num)
    x0 = torch.tensor(list(context) + list(continuation))
    length, prompt = len(x0), len(context)
    xt = x0.repeat(mc_num, 1)
    xt[:, prompt:] = torch.where(masks, mask_id, xt[:, prompt:])
    positions = torch.arange(length)
    allowed = block_diffusion_mask(
        torch.zeros(mc_num, length, dtype=torch.long), positions.expand(mc_num, length), block_length
    )
    logits = model(
        torch.cat([xt, x0.expand(mc_num, -1)], dim=1),
        position_ids=torch.cat([positions, positions]).expand(mc_num, -1),
        attention_mask=allowed,
    ).logits[:, prompt:length]
    ce = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).double(), x0[prompt:].repeat(mc_num), reduction="none"
    ).view(mc_num, -1)
    return -((ce * masks).sum(dim=1) / t).mean().item()
