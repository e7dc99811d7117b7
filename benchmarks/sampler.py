#!/usr/bin/env python
"""Cached vs uncached block-wise decoding: wall time and tokens per forward pass.

  .venv/bin/python benchmarks/sampler.py [--prompt-lengths 128 512 2048] [--write-results]

Tiny random LLaDA2 (the `tiny` preset), random prompts, gen_length 64, block 32, steps 32, threshold
0.95, EOS disabled so every run decodes all 64 tokens. The random model is never 95% sure, so every
step commits its quota of one token: 64 forward passes per run, the worst case for the cache ratio's
denominator and the same for both paths (--lm-head-scale sharpens the model to change that).
Both paths must return identical tokens (checked). The uncached path re-runs the whole prefix every
step, so its cost grows with the prompt; the cached path feeds only the current (and, once per block,
the previous) block. Goal: cached >= 3x faster at a 2048-token prompt. --write-results replaces the
`## sampler` section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import sys
import time

import torch

from megadiff.hf.reference import build_reference_model
from megadiff.inference import DecodingOptions, generate
from megadiff.models.llada2.presets import preset

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")
MASK_ID, EOS_ID = 511, 510


def time_both(model, prompt, gen_length, repeats):
    """{use_cache: (best wall seconds, result)}; cached and uncached runs alternate, so both see the
    same background load on a shared machine."""
    best = {True: (float("inf"), None), False: (float("inf"), None)}
    for _ in range(repeats):
        for use_cache in (True, False):
            options = DecodingOptions(gen_length=gen_length, block_length=32, steps=32, use_cache=use_cache)
            start = time.perf_counter()
            result = generate(model, [prompt], options, MASK_ID, eos_id=None)
            best[use_cache] = (min(best[use_cache][0], time.perf_counter() - start), result)
    return best


def run(prompt_lengths, gen_length, repeats, lm_head_scale):
    model = build_reference_model(preset("tiny", pad_token_id=EOS_ID, eos_token_id=EOS_ID), seed=0)
    with torch.no_grad():
        model.lm_head.weight.mul_(lm_head_scale)
    rows = []
    for n in prompt_lengths:
        prompt = torch.randint(0, 500, (n,), generator=torch.Generator().manual_seed(n)).tolist()
        timings = time_both(model, prompt, gen_length, repeats)
        (cached_s, cached), (uncached_s, uncached) = timings[True], timings[False]
        if cached.tokens != uncached.tokens:
            raise SystemExit(f"prompt {n}: cached and uncached decoding returned different tokens")
        rows.append(
            dict(
                prompt=n,
                cached_s=cached_s,
                uncached_s=uncached_s,
                speedup=uncached_s / cached_s,
                forwards=cached.model_calls,
                tokens_per_forward=cached.tokens_per_forward,
                tokens_per_s_cached=cached.num_tokens / cached_s,
                tokens_per_s_uncached=uncached.num_tokens / uncached_s,
            )
        )
        print(
            f"prompt {n:5d}: cached {cached_s:7.3f}s  uncached {uncached_s:7.3f}s  "
            f"speedup {rows[-1]['speedup']:5.1f}x  forwards {cached.model_calls}  "
            f"tokens/forward {cached.tokens_per_forward:.2f}",
            flush=True,
        )
    return rows


def markdown(rows, gen_length, repeats, lm_head_scale) -> str:
    machine = f"{os.cpu_count()}-core CPU ({platform.machine()}), torch {torch.__version__}, torch threads: {torch.get_num_threads()}"
    lines = [
        "## sampler",
        "",
        f"{datetime.date.today().isoformat()}, {machine}; `benchmarks/sampler.py` "
        f"(tiny random LLaDA2, lm_head scale {lm_head_scale}, gen_length {gen_length}, block 32, steps 32, "
        f"threshold 0.95, greedy, best of {repeats}, cached/uncached runs alternating). Cached and uncached returned identical tokens in every row.",
        "",
        "| prompt tokens | cached s | uncached s | uncached / cached | forward passes | tokens / forward | tokens/s cached | tokens/s uncached |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['prompt']} | {r['cached_s']:.3f} | {r['uncached_s']:.3f} | {r['speedup']:.1f}x | "
            f"{r['forwards']} | {r['tokens_per_forward']:.2f} | {r['tokens_per_s_cached']:.0f} | "
            f"{r['tokens_per_s_uncached']:.0f} |"
        )
    longest = max(rows, key=lambda r: r["prompt"])
    lines += [
        "",
        f"Goal cached >= 3x faster at the longest prompt ({longest['prompt']} tokens): "
        f"{'met' if longest['speedup'] >= 3 else 'NOT met'} ({longest['speedup']:.1f}x). The random model is "
        f"never 95% sure, so each step commits one token; a trained model commits more per forward, which "
        f"changes both paths alike.",
    ]
    return "\n".join(lines) + "\n"


def write_section(section: str) -> None:
    """Replace (or append) the `## sampler` section of RESULTS.md, leaving other sections alone."""
    text = open(RESULTS).read() if os.path.exists(RESULTS) else "# Benchmark results\n"
    pattern = re.compile(r"^## sampler\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    with open(RESULTS, "w") as f:
        f.write(text.rstrip("\n") + "\n")


def main(argv=None) -> int:
    from megadiff.platform import install_import_hook

    install_import_hook()  # first, before anything imports megatron-core
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt-lengths", type=int, nargs="+", default=[128, 512, 2048])
    parser.add_argument("--gen-length", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs per cell")
    parser.add_argument("--lm-head-scale", type=float, default=1.0, help="sharpen the random model's predictions")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (default 1: steadier timings on a shared 2-core machine)"
    )
    parser.add_argument("--write-results", action="store_true", help="update the ## sampler section of RESULTS.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(
        f"benchmarks/sampler.py --prompt-lengths {' '.join(map(str, args.prompt_lengths))} "
        f"--gen-length {args.gen_length} --repeats {args.repeats} --lm-head-scale {args.lm_head_scale} --threads {args.threads}"
        + (" --write-results" if args.write_results else "")
    )
    rows = run(args.prompt_lengths, args.gen_length, args.repeats, args.lm_head_scale)
    section = markdown(rows, args.gen_length, args.repeats, args.lm_head_scale)
    print(section)
    if args.write_results:
        write_section(section)
        print(f"results written to {RESULTS} (## sampler)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
