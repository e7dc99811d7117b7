"""LLaDA's sampler (the public LLaDA `generate.py`): semi-autoregressive blocks after the prompt with
low-confidence remasking, full attention, no cache. sampler.generate runs it for options.rule
"low_confidence" (the LLaDA and LLaDA-MoE families' SamplerDefaults).

The rule, for one prompt of length P:
  - The canvas is the prompt followed by `gen_length` mask tokens, nothing else. The answer is cut into
    gen_length // block_length blocks that start right after the prompt (block b covers positions
    P + b * block_length ... P + (b + 1) * block_length); gen_length must be a multiple of block_length.
  - `steps` counts iterations over the whole answer: each block gets steps // num_blocks of them
    (steps must be a multiple of num_blocks). At the start of a block its quotas are fixed: the
    block's masks spread evenly over its iterations, one more for each of the first (masks %
    iterations) iterations (generate.py's get_num_transfer_tokens).
  - An iteration runs the model over the whole canvas (full attention, no cache) and predicts a token
    x0 at every position: at temperature 0 the argmax, else the Gumbel-max sample
    argmax(exp(logits) / (-log u) ** temperature) with u ~ U(0, 1) in float64 (a sample of
    softmax(logits / temperature)). Confidence: with remasking "low_confidence" the probability of x0
    under softmax(logits) in float64 (the temperature does not enter it); with "random" a U(0, 1) draw.
    Only the masked positions of the current block compete: the `quota` most confident are committed.
  - Blocks never change once finished, so decoding stops after the block in which an EOS appears; the
    result is the generated tokens up to and including the first EOS (at most gen_length).

Differences from generate.py, none of which changes the tokens of a model that never predicts the mask:
  - the mask token's logit is removed before anything (generate.py could predict the mask itself and
    leave the position masked, to be re-decided in any later iteration, even of a later block);
  - ties in confidence go to the earlier position (torch.topk leaves their order unspecified);
  - the noise is drawn only for the current block's positions (generate.py draws it for the whole
    canvas and discards all but the block's), from one generator per row, noise first, then the
    random confidences; iterations whose quota is 0 for every row of a batch are skipped;
  - rows of a batch may have different prompt lengths: rows of equal length decode together.
"""

from __future__ import annotations

import torch

# Remote code like sampler.py (see there): torch and the standard library only.


def transfer_quotas(masks: int, iterations: int) -> list[int]:
    """Tokens to commit at each of a block's iterations (generate.py's get_num_transfer_tokens):
    `masks` spread evenly, the remainder going one each to the first iterations."""
    base, remainder = divmod(masks, iterations)
    return [base + 1 if i < remainder else base for i in range(iterations)]


def predict(logits: torch.Tensor, temperature: float, remasking: str, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [n, V] -> (x0 [n], confidence [n] float64) as in the module docstring."""
    logits = logits.to(torch.float64)
    if temperature > 0:
        noise = torch.rand(logits.shape, dtype=torch.float64, generator=generator, device=logits.device)
        x0 = torch.argmax(logits.exp() / (-torch.log(noise)) ** temperature, dim=-1)
    else:
        x0 = torch.argmax(logits, dim=-1)
    if remasking == "low_confidence":
        confidence = torch.softmax(logits, dim=-1).gather(-1, x0[:, None]).squeeze(-1)
    else:  # "random"
        confidence = torch.rand(x0.shape, dtype=torch.float64, generator=generator, device=logits.device)
    return x0, confidence


def commit_most_confident(confidence: torch.Tensor, masked: torch.Tensor, quota: int) -> torch.Tensor:
    """[n] bool: the `quota` masked positions of highest confidence (ties: the earlier position)."""
    order = torch.sort(confidence.masked_fill(~masked, float("-inf")), descending=True, stable=True).indices
    chosen = torch.zeros_like(masked)
    chosen[order[: min(quota, int(masked.sum()))]] = True
    return chosen


def decode_group(model, prompts, drafts, options, mask_id, eos_id, generators, out_rows, result, device) -> None:
    """Decode prompts of one length in lockstep; write row i's tokens into result[out_rows[i]]."""
    length, gen, bl = len(prompts[0]), options.gen_length, options.block_length
    num_blocks = gen // bl
    iterations = options.steps // num_blocks
    x = torch.full((len(prompts), length + gen), mask_id, dtype=torch.long, device=device)
    for i, (prompt, draft) in enumerate(zip(prompts, drafts, strict=True)):
        x[i, :length] = torch.tensor(prompt, dtype=torch.long, device=device)
        x[i, length : length + len(draft)] = torch.tensor(draft, dtype=torch.long, device=device)
    active = list(range(len(prompts)))
    for block in range(num_blocks):
        begin, end = length + block * bl, length + (block + 1) * bl
        quotas = {r: transfer_quotas(int((x[r, begin:end] == mask_id).sum()), iterations) for r in active}
        for step in range(iterations):
            stepping = [r for r in active if quotas[r][step] > 0]
            if not stepping:
                continue
            logits = model(x[stepping]).logits[:, begin:end]
            result.model_calls += 1
            logits[..., mask_id] = float("-inf")
            for i, r in enumerate(stepping):
                result.forward_passes[out_rows[r]] += 1
                x0, confidence = predict(logits[i], options.temperature, options.remasking, generators[r])
                masked = x[r, begin:end] == mask_id
                commit = commit_most_confident(confidence, masked, quotas[r][step])
                x[r, begin:end][commit] = x0[commit]
        if eos_id is not None:
            active = [r for r in active if not (x[r, length:end] == eos_id).any()]
        if not active:
            break
    for i in range(len(prompts)):
        tokens = x[i, length:].tolist()
        if eos_id is not None and eos_id in tokens:
            tokens = tokens[: tokens.index(eos_id) + 1]
        result.tokens[out_rows[i]] = tokens
