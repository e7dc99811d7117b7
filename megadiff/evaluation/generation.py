"""lm-eval's `generate_until` on megadiff's block-wise sampler, and `is_greedy` from the same sampler.

A request is (prompt ids, the task's generation kwargs). Its decoding is the model args' DecodingOptions
(threshold rule or LLaDA2.1 editing, block_length, steps, ...) with, from the request:
  - max_gen_toks (or max_new_tokens) -> gen_length (else the model arg gen_length). The sampler always decodes whole blocks
    of block_length (the last one padded with masks, blocks aligned to position 0, as in generate.py) and
    returns at most gen_length tokens, cut after the first EOS;
  - do_sample / temperature / top_k / top_p: greedy (temperature 0) unless do_sample is true, as
    Hugging Face's generate reads them;
  - until: the text is cut before the first stop string. It applies to the decoded text without special
    tokens (lm-eval's HF model decodes the same way), so the EOS that ends an answer is never text.
With the low_confidence rule (LLaDA, LLaDA-MoE) the request's length must be whole blocks, and its
steps are the model args' iterations per block times its blocks. Any other generation kwarg is an
error that names it. Requests with the same decoding run together,
batch_size prompts per sampler call (similar prompt lengths together, so they share blocks), with the
prompt cache on unless the model args turn it off; each request samples from its own seeded generator
(seed, request index), so its text does not depend on the batch it lands in.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

from megadiff.inference.sampler import DecodingOptions, generate
from megadiff.inference.text import decode_tokens

GEN_KWARGS = ("until", "max_gen_toks", "max_new_tokens", "do_sample", "temperature", "top_k", "top_p")


def request_decoding(base: DecodingOptions, gen_kwargs: dict) -> tuple[DecodingOptions, tuple[str, ...]]:
    """(DecodingOptions, stop strings) of one request (module docstring); ValueError names a bad kwarg."""
    unknown = [k for k in gen_kwargs if k not in GEN_KWARGS]
    if unknown:
        raise ValueError(
            f"generation kwarg {unknown[0]!r} is not supported by the megadiff model (supported: {', '.join(GEN_KWARGS)})"
        )
    until = gen_kwargs.get("until") or ()
    until = (until,) if isinstance(until, str) else tuple(until)
    if not all(isinstance(s, str) and s for s in until):
        raise ValueError(
            f"generation kwarg until={gen_kwargs.get('until')!r} must be a string or a list of non-empty strings"
        )
    changes = {}
    for name in ("max_gen_toks", "max_new_tokens"):  # lm-eval's name; Hugging Face's, which a few tasks use
        if gen_kwargs.get(name) is not None:
            changes["gen_length"] = gen_kwargs[name]
    if base.rule == "low_confidence" and "gen_length" in changes:
        # LLaDA's rule decodes whole blocks after the prompt with steps/blocks iterations each: a request's
        # length keeps the model args' iterations per block
        per_block = base.steps // (base.gen_length // base.block_length)
        changes["steps"] = per_block * max(1, changes["gen_length"] // base.block_length)
    if gen_kwargs.get("do_sample"):
        changes["temperature"] = float(gen_kwargs.get("temperature", 1.0))
        changes["top_k"] = gen_kwargs.get("top_k")
        changes["top_p"] = gen_kwargs.get("top_p")
    else:
        changes.update(temperature=0.0, top_k=None, top_p=None)
    try:
        return dataclasses.replace(base, **changes), until
    except ValueError as e:
        raise ValueError(f"generation kwargs {gen_kwargs}: {e}") from None


def cut_at_stop_strings(text: str, until: Sequence[str]) -> str:
    """`text` up to (not including) the earliest occurrence of any stop string."""
    end = min((i for i in (text.find(s) for s in until) if i >= 0), default=len(text))
    return text[:end]


def generate_texts(
    model,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    decodings: Sequence[tuple[DecodingOptions, tuple[str, ...]]],
    *,
    mask_id: int,
    eos_id: int,
    batch_size: int,
    progress: Callable[[int], None] | None = None,
) -> list[str]:
    """The text generated for each prompt (ids) with its (options, stop strings), cut at the stop
    strings; `progress(n)` after each sampler call of n prompts."""
    texts: list[str | None] = [None] * len(prompts)
    groups: dict[DecodingOptions, list[int]] = {}
    for i, (options, _) in enumerate(decodings):
        groups.setdefault(options, []).append(i)
    for options, members in groups.items():
        members = sorted(members, key=lambda i: len(prompts[i]))
        for first in range(0, len(members), batch_size):
            batch = members[first : first + batch_size]
            result = generate(model, [prompts[i] for i in batch], options, mask_id, eos_id, row_ids=batch)
            for i, tokens in zip(batch, result.tokens, strict=True):
                texts[i] = cut_at_stop_strings(decode_tokens(tokens, tokenizer), decodings[i][1])
            if progress:
                progress(len(batch))
    return texts


def greedy_matches(
    model,
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
    base: DecodingOptions,
    *,
    mask_id: int,
    eos_id: int,
    batch_size: int,
) -> list[bool]:
    """is_greedy for lm-eval: whether the sampler, greedy (temperature 0) with the model args' decoding
    and gen_length = the continuation's length, writes exactly the continuation after the context."""
    matches = [len(c) == 0 for _, c in pairs]
    by_length: dict[int, list[int]] = {}
    for i, (_, continuation) in enumerate(pairs):
        if continuation:
            by_length.setdefault(len(continuation), []).append(i)
    for length, members in by_length.items():
        options = dataclasses.replace(base, gen_length=length, temperature=0.0, top_k=None, top_p=None)
        for first in range(0, len(members), batch_size):
            batch = members[first : first + batch_size]
            result = generate(model, [pairs[i][0] for i in batch], options, mask_id, eos_id, row_ids=batch)
            for i, tokens in zip(batch, result.tokens, strict=True):
                matches[i] = list(tokens) == [int(t) for t in pairs[i][1]]
    return matches
