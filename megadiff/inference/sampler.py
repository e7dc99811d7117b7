"""Block-wise diffusion decoding for LLaDA2: the model card's `generate`, plus a prefix KV cache.
(With options.editing_threshold set, each block is decoded with LLaDA2.1's draft-and-edit rule
instead; both rules are in editing.py, this module owns the canvas, blocks, cache and batching.)

The rule (LLaDA2.0 model card), for one prompt of length P:
  - The sequence is the prompt followed by `gen_length` mask tokens, padded with mask tokens to a
    multiple of `block_length`. Blocks are aligned to absolute position 0, so the prompt is cut into
    blocks too, and attention is block-causal: a position sees its own block and every earlier one.
  - Decoding starts at block P // block_length and goes block by block. Each block gets up to
    `steps` iterations (steps = min(steps, gen_length // minimal_topk)). An iteration predicts every
    still-masked position of the block and commits some of them:
        quota = block_length // steps, plus one for the first block_length % steps iterations;
        if at least `quota` masked positions have confidence > threshold, commit ALL of those,
        else commit the min(quota, still masked) most confident ones.
    Confidence is the probability of the chosen token. The quotas add up to block_length, so a block
    is always complete after its iterations; with steps > block_length the later iterations have
    quota 0 and are never reached (steps > block_length decodes exactly like steps = block_length).
  - Temperature 0 takes the argmax; temperature > 0 samples after optional top-k / top-p filtering
    (filters apply at temperature 0 too, where they only change the confidence, as in the card).
  - After a block, decoding stops if an EOS is among the generated tokens so far. With
    `eos_early_stop` it stops as soon as an iteration commits an EOS that has no mask before it.
    The result is the generated tokens up to and including the first EOS (at most gen_length).

Differences from the card's code, each a fix rather than a change of the rule:
  - temperature 0 is argmax (the card's code samples from the softmax even at 0);
  - the mask token is never predicted (its logit is removed), so a committed position stays committed;
  - ties in confidence go to the earlier position (a stable sort), so results are reproducible;
  - with eos_early_stop only generated tokens are returned (the card returns the prompt too there).

Finished blocks never change, so their keys/values are cached (`use_cache=True`): the cache lags one
block behind, and the first forward of each block feeds [previous block ; current block] so it also
writes the previous block's keys/values. The prompt's whole blocks are written by the first forward.
Cached and uncached decoding compute the same thing; tests pin that they return the same tokens.

Batches: each row keeps its own block grid (no left padding, which would shift the grid). Rows that
start in the same block run their forward passes together; a row that has finished its block, or its
generation, simply stops taking part. Sampling uses one generator per row, seeded from (seed, row id),
so a row's tokens do not depend on which other rows share its batch.
"""

from __future__ import annotations

import hashlib
import importlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .editing import CardRule, EditRule

RULES = ("threshold", "low_confidence")
REMASKING = ("low_confidence", "random")

# This module and editing.py are also remote code: megadiff writes them beside the models it makes,
# where the model's `generate()` runs them (megadiff.models.llada2.modeling_llada2_moe). So they import only
# torch, the standard library and each other, never megadiff.


@dataclass(frozen=True)
class DecodingOptions:
    """Every knob of block-wise decoding; invalid values raise ValueError naming the argument."""

    gen_length: int = 256
    block_length: int = 32
    steps: int = 32  # "threshold": iterations per block; "low_confidence": over the whole answer
    threshold: float = 0.95
    temperature: float = 0.0
    top_k: int | None = None  # None or 0: off
    top_p: float | None = None  # None or 1.0: off
    minimal_topk: int = 1
    eos_early_stop: bool = False
    use_cache: bool = True
    seed: int = 0
    # LLaDA2.1 draft and edit (editing.py); None = off, the 2.0 rule above is used
    editing_threshold: float | None = None
    max_post_steps: int = 16
    num_to_transfer: int = 1
    # "threshold": the rule above (LLaDA2); "low_confidence": LLaDA's generate.py (low_confidence.py),
    # whose `remasking` is "low_confidence" (commit the most probable) or "random"
    rule: str = "threshold"
    remasking: str = "low_confidence"

    def __post_init__(self):
        for name in ("gen_length", "block_length", "steps", "minimal_topk"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {self.threshold!r}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature!r}")
        if self.top_k is not None and self.top_k < 0:
            raise ValueError(f"top_k must be >= 1 (or 0/None for off), got {self.top_k!r}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] (or None for off), got {self.top_p!r}")
        if self.editing_threshold is not None and not 0.0 <= self.editing_threshold <= 1.0:
            raise ValueError(f"editing_threshold must be in [0, 1] (or None for off), got {self.editing_threshold!r}")
        for name, low in (("max_post_steps", 0), ("num_to_transfer", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if self.rule not in RULES:
            raise ValueError(f"rule must be one of {', '.join(RULES)}, got {self.rule!r}")
        if self.remasking not in REMASKING:
            raise ValueError(f"remasking must be one of {', '.join(REMASKING)}, got {self.remasking!r}")
        if self.rule == "low_confidence":
            self._check_low_confidence()
        if self.gen_length // self.minimal_topk < 1:
            raise ValueError(
                f"minimal_topk={self.minimal_topk} > gen_length={self.gen_length} leaves no decoding "
                f"steps (steps = min(steps, gen_length // minimal_topk)); lower minimal_topk"
            )

    def _check_low_confidence(self) -> None:
        """LLaDA's generate.py asserts both divisions; its rule has no filters and no editing."""
        if self.gen_length % self.block_length:
            raise ValueError(
                f"gen_length={self.gen_length} is not a multiple of block_length={self.block_length} "
                f"(the low_confidence rule cuts the answer into whole blocks)"
            )
        num_blocks = self.gen_length // self.block_length
        if self.steps % num_blocks:
            raise ValueError(
                f"steps={self.steps} is not a multiple of the {num_blocks} blocks (gen_length / block_length): "
                f"the low_confidence rule gives every block steps / blocks iterations"
            )
        for name in ("top_k", "top_p", "editing_threshold"):
            if getattr(self, name) not in (None, 0, 1.0):
                raise ValueError(f"{name} is not part of the low_confidence rule; leave it unset")

    @property
    def effective_steps(self) -> int:
        """Iterations per block, as the card caps them: min(steps, gen_length // minimal_topk)."""
        return min(self.steps, self.gen_length // self.minimal_topk)


@dataclass
class GenerationResult:
    """tokens[i]: row i's generated ids up to and including the first EOS.
    forward_passes[i]: forward passes that predicted row i's tokens (what row-by-row decoding needs).
    model_calls: model forward calls made (one call serves every row of a batch group).
    edits[i]: committed tokens that row i's decoding re-wrote (T2T; always 0 without editing)."""

    tokens: list[list[int]]
    forward_passes: list[int]
    model_calls: int
    edits: list[int] | None = None

    def __post_init__(self):
        if self.edits is None:
            self.edits = [0] * len(self.tokens)

    @property
    def num_edits(self) -> int:
        return sum(self.edits)

    @property
    def num_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)

    @property
    def tokens_per_forward(self) -> float:
        return self.num_tokens / max(1, sum(self.forward_passes))


def block_causal_mask(q_start: int, end: int, block_length: int, device=None) -> torch.Tensor:
    """[1, end - q_start, end] bool: query at position q (q_start <= q < end) may attend key k < end
    iff block(k) <= block(q), with block(p) = p // block_length."""
    q_block = torch.arange(q_start, end, device=device) // block_length
    k_block = torch.arange(end, device=device) // block_length
    return (k_block[None, :] <= q_block[:, None])[None]


def filter_logits(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Set logits outside the top-k, then outside the top-p nucleus, to -inf (the card's filters).
    The nucleus is the smallest set of most likely tokens whose probability reaches top_p."""
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        drop_sorted = torch.zeros_like(cumulative, dtype=torch.bool)
        drop_sorted[..., 1:] = cumulative[..., :-1] > top_p  # keep tokens until top_p is reached
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_tokens(
    logits: torch.Tensor,
    temperature: float,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [n, V] -> (tokens [n], confidence [n]): argmax at temperature 0, else a sample; the
    confidence is the chosen token's probability under the (tempered, filtered) distribution."""
    logits = logits.float()
    if temperature > 0:
        logits = logits / temperature
    probs = torch.softmax(filter_logits(logits, top_k, top_p), dim=-1)
    if temperature > 0:
        tokens = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    else:
        tokens = probs.argmax(dim=-1)
    return tokens, probs.gather(-1, tokens[:, None]).squeeze(-1)


def check_token_ids(vocab_size: int, mask_id: int, eos_id: int | None, prompts: Sequence[Sequence[int]]) -> None:
    """Raise ValueError naming the argument when a special id or a prompt token cannot be used."""
    if not 0 <= mask_id < vocab_size:
        raise ValueError(f"mask_id={mask_id} is outside the model vocabulary [0, {vocab_size})")
    if eos_id is not None and not 0 <= eos_id < vocab_size:
        raise ValueError(f"eos_id={eos_id} is outside the model vocabulary [0, {vocab_size})")
    if eos_id == mask_id:
        raise ValueError(f"eos_id and mask_id are both {mask_id}; they must differ")
    if not prompts:
        raise ValueError("prompts is empty; pass at least one prompt (a list of token ids)")
    for i, prompt in enumerate(prompts):
        for j, token in enumerate(prompt):
            if token == mask_id:
                raise ValueError(f"prompts[{i}][{j}] is the mask token {mask_id}; prompts must not contain it")
            if not 0 <= token < vocab_size:
                raise ValueError(f"prompts[{i}][{j}]={token} is outside the model vocabulary [0, {vocab_size})")


def check_positions(max_positions: int | None, prompts: Sequence[Sequence[int]], options: DecodingOptions) -> None:
    """Raise ValueError when a prompt plus gen_length, padded with masks to whole blocks (the positions
    the model is fed), goes past the model's position range (config.json max_position_embeddings)."""
    if max_positions is None:
        return
    for i, prompt in enumerate(prompts):
        fed = len(prompt) + options.gen_length
        padded = ""
        if options.rule == "threshold":  # the canvas is padded to whole blocks
            fed = -(-fed // options.block_length) * options.block_length
            padded = f", padded to whole blocks of {options.block_length},"
        if fed > max_positions:
            raise ValueError(
                f"prompts[{i}] has {len(prompt)} tokens; with gen_length={options.gen_length}{padded} "
                f"that is {fed} positions, beyond the model's "
                f"max_position_embeddings={max_positions}; shorten the prompt or lower gen_length"
            )


@torch.no_grad()
def generate(
    model,
    prompts: Sequence[Sequence[int]],
    options: DecodingOptions,
    mask_id: int,
    eos_id: int | None,
    row_ids: Sequence[int] | None = None,
    drafts: Sequence[Sequence[int]] | None = None,
) -> GenerationResult:
    """Decode every prompt (a list of token ids) with the block-wise rule; see the module docstring
    (options.rule "low_confidence": LLaDA's rule instead, low_confidence.py).

    model: called as model(input_ids, position_ids=, attention_mask=, past_key_values=, use_cache=)
    -> .logits, .past_key_values (the reference LLaDA2MoeModelLM). row_ids name the rows for
    seeding (default 0..n-1): row i samples from a generator seeded by (options.seed, row_ids[i]).
    drafts: optional tokens (at most gen_length each; mask ids allowed) written after each prompt
    before decoding, as already-committed generated tokens: the 2.0 rule only fills their masks,
    draft-and-edit may also re-write them (re-decoding a corrupted or earlier answer).
    """
    prompts = [[int(t) for t in p] for p in prompts]
    config = model_config_of(model)
    check_token_ids(config.vocab_size, mask_id, eos_id, prompts)
    check_positions(getattr(config, "max_position_embeddings", None), prompts, options)
    row_ids = list(range(len(prompts))) if row_ids is None else list(row_ids)
    if len(row_ids) != len(prompts):
        raise ValueError(f"row_ids has {len(row_ids)} entries for {len(prompts)} prompts")
    drafts = [[] for _ in prompts] if drafts is None else [[int(t) for t in d] for d in drafts]
    if len(drafts) != len(prompts):
        raise ValueError(f"drafts has {len(drafts)} entries for {len(prompts)} prompts")
    for i, draft in enumerate(drafts):
        if len(draft) > options.gen_length or any(not 0 <= t < config.vocab_size for t in draft):
            raise ValueError(f"drafts[{i}] must be at most gen_length={options.gen_length} ids in the vocabulary")
    device = next(model.parameters()).device
    generators = [_row_generator(options.seed, r, device) for r in row_ids]
    result = GenerationResult(tokens=[[] for _ in prompts], forward_passes=[0] * len(prompts), model_calls=0)
    groups: dict[int, list[int]] = {}
    if options.rule == "low_confidence":  # LLaDA's generate.py: rows of one prompt length decode together
        # Imported by name, not `from .low_confidence import`: transformers and hf_template copy a remote
        # file's static sibling imports into LLaDA2 dirs, whose generate() never uses this rule.
        decode_group = importlib.import_module(".low_confidence", __package__).decode_group
        for i, prompt in enumerate(prompts):
            groups.setdefault(len(prompt), []).append(i)
        for length in sorted(groups):
            rows = groups[length]
            decode_group(
                model,
                [prompts[i] for i in rows],
                [drafts[i] for i in rows],
                options,
                mask_id,
                eos_id,
                [generators[i] for i in rows],
                rows,
                result,
                device,
            )
        return result
    for i, prompt in enumerate(prompts):
        groups.setdefault(len(prompt) // options.block_length, []).append(i)
    for start_block in sorted(groups):
        rows = groups[start_block]
        _decode_group(
            model,
            [prompts[i] for i in rows],
            [drafts[i] for i in rows],
            start_block,
            options,
            mask_id,
            eos_id,
            [generators[i] for i in rows],
            rows,
            result,
            device,
        )
    return result


def model_config_of(model):
    """The model's config (vocab_size, max_position_embeddings): `config` of the HF-style LLaDA2
    reference, `cfg` of the other families' references (megadiff.models.<family>.reference)."""
    config = getattr(model, "config", None)
    return config if config is not None else model.cfg


def row_seed(seed: int, row_id: int) -> int:
    """megadiff.seeding.stable_seed(seed, row_id), written out (see the imports; a test holds them equal)."""
    text = f"{int(seed)}:{int(row_id)}".encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1


def _row_generator(seed: int, row_id: int, device) -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(row_seed(seed, row_id))
    return generator


def _decode_group(model, prompts, drafts, start_block, options, mask_id, eos_id, generators, out_rows, result, device):
    """Decode prompts that all start in `start_block`, in lockstep; write into result[out_rows[i]].
    What an iteration commits is the rule's (editing.py); this loop owns the canvas and the cache."""
    rule_class = CardRule if options.editing_threshold is None else EditRule
    rule = rule_class(options, mask_id, eos_id)
    bl = options.block_length
    num_blocks = [-(-(len(p) + options.gen_length) // bl) for p in prompts]
    x = torch.full((len(prompts), max(num_blocks) * bl), mask_id, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        x[i, : len(p)] = torch.tensor(p, dtype=torch.long, device=device)
        x[i, len(p) : len(p) + len(drafts[i])] = torch.tensor(drafts[i], dtype=torch.long, device=device)

    active = list(range(len(prompts)))  # rows still decoding; the cache's batch rows follow this order
    cache, cached_len = None, 0
    for block in range(start_block, max(num_blocks)):
        active, cache = _keep(active, cache, [block < num_blocks[r] for r in active])
        begin, end = block * bl, (block + 1) * bl
        in_prompt = [torch.arange(begin, end, device=device) < len(prompts[r]) for r in range(len(prompts))]
        states = {r: rule.start_block() for r in active}
        while active:
            stepping = {r for r in active if rule.wants_step(states[r], x[r, begin:end])}
            if not stepping:
                break
            start = cached_len if options.use_cache else 0
            out = model(
                x[active, start:end],
                position_ids=torch.arange(start, end, device=device).expand(len(active), -1),
                attention_mask=block_causal_mask(start, end, bl, device),
                past_key_values=cache,
                use_cache=options.use_cache,
            )
            result.model_calls += 1
            if options.use_cache and cached_len < begin:  # earlier blocks are final: keep their k/v
                cache = [(k[:, :, :begin], v[:, :, :begin]) for k, v in out.past_key_values]
                cached_len = begin
            logits = out.logits[:, -bl:]
            logits[..., mask_id] = float("-inf")
            stopped = []
            for i, r in enumerate(active):
                if r not in stepping:
                    continue
                result.forward_passes[out_rows[r]] += 1
                tokens, confidence = sample_tokens(
                    logits[i], options.temperature, options.top_k, options.top_p, generators[r]
                )
                edits, stop = rule.step(
                    states[r],
                    x[r, begin:end],
                    tokens,
                    confidence,
                    in_prompt[r],
                    x[r, len(prompts[r]) : end],  # a view: sees the block's update
                )
                result.edits[out_rows[r]] += edits
                if stop:
                    stopped.append(r)
            active, cache = _keep(active, cache, [r not in stopped for r in active])
        assert not (x[active, begin:end] == mask_id).any(), "a block ended with masks left"
        generated = [x[r, len(prompts[r]) : end] for r in active]
        active, cache = _keep(active, cache, [not rule.stop_after_block(g) for g in generated])
        if not active:
            break

    for i, p in enumerate(prompts):
        tokens = x[i, len(p) : len(p) + options.gen_length].tolist()
        if eos_id is not None and eos_id in tokens:
            tokens = tokens[: tokens.index(eos_id) + 1]
        result.tokens[out_rows[i]] = tokens


def _keep(active: list[int], cache, keep: list[bool]):
    """Drop rows from the active list and the matching batch rows of the cache."""
    if all(keep):
        return active, cache
    index = [i for i, k in enumerate(keep) if k]
    if cache is not None:
        idx = torch.tensor(index, dtype=torch.long, device=cache[0][0].device)
        cache = [(k.index_select(0, idx), v.index_select(0, idx)) for k, v in cache]
    return [active[i] for i in index], cache
