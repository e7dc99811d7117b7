"""Packing vs dFactory-style pad_to_max on a GSM8K-like SFT length mix.

What it answers: how much of each max_seq_len row is real data (the GPU does the same work per row
either way, so answer tokens per row is the training-throughput ratio), and how fast the CPU side
(planning + building row tensors) produces useful answer tokens. Goal: pack >= 95% real tokens.

    .venv/bin/python benchmarks/packing.py [--samples 4000] [--max-seq-len 2048] [--seed 0]
"""

from __future__ import annotations

import argparse
import random
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megadiff.data.packing import PACK, PAD_TO_MAX, build_row, plan_packed_rows

RESULTS = Path(__file__).with_name("RESULTS.md")
SECTION = "## packing"


def synthetic_samples(n: int, seed: int) -> list[tuple[list[int], int]]:
    """n samples with prompt ~ U[60, 200] and answer ~ U[50, 300] tokens (GSM8K-like)."""
    rng = random.Random(seed)
    samples = []
    for _ in range(n):
        prompt, answer = rng.randint(60, 200), rng.randint(50, 300)
        samples.append(([rng.randrange(400) for _ in range(prompt + answer)], prompt))
    return samples


def measure(samples, max_seq_len: int, mode: str) -> dict:
    """Plan and build every row of one mode; return its stats plus preparation time."""
    start = time.perf_counter()
    plans, stats = plan_packed_rows(samples, max_seq_len, mode)
    for plan in plans:
        build_row(plan, samples, max_seq_len, pad_id=0, mode=mode)
    stats["seconds"] = time.perf_counter() - start
    stats["answer_tokens_per_s"] = stats["answer_tokens"] / stats["seconds"]
    stats["answer_tokens_per_row"] = stats["answer_tokens"] / stats["rows"]
    return stats


def results_table(args, results: dict) -> str:
    pack, pad = results[PACK], results[PAD_TO_MAX]
    lines = [
        SECTION,
        "",
        (
            f"`python benchmarks/packing.py --samples {args.samples} --max-seq-len {args.max_seq_len} --seed {args.seed}`: "
            f"prompt ~ U[60,200], answer ~ U[50,300] tokens, rows of {args.max_seq_len}; CPU data preparation "
            "(plan + build row tensors). Answer tokens exclude pad_to_max's trained pad tail."
        ),
        "",
        "| mode | rows | real tokens | answer tokens | answer tokens / row | prep s | answer tokens / s (prep) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for mode, r in results.items():
        lines.append(
            f"| {mode} | {r['rows']} | {r['real_token_fraction']:.1%} | {r['answer_token_fraction']:.1%} | "
            f"{r['answer_tokens_per_row']:.0f} | {r['seconds']:.3f} | {r['answer_tokens_per_s']:,.0f} |"
        )
    lines += [
        "",
        (
            f"pack / pad_to_max: {pack['answer_tokens_per_row'] / pad['answer_tokens_per_row']:.2f}x answer tokens per row "
            f"(= per unit of model compute), {pack['answer_tokens_per_s'] / pad['answer_tokens_per_s']:.2f}x answer "
            f"tokens/s of data preparation. Goal pack >= 95% real tokens: "
            f"{'met' if pack['real_token_fraction'] >= 0.95 else 'NOT met'} ({pack['real_token_fraction']:.1%})."
        ),
        "",
    ]
    return "\n".join(lines)


def write_section(text: str, path: Path = RESULTS) -> None:
    """Replace (or append) the `## packing` section of RESULTS.md, leaving other sections alone."""
    old = path.read_text() if path.exists() else "# Benchmarks\n"
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.DOTALL | re.MULTILINE)
    new = pattern.sub(lambda _: text, old) if pattern.search(old) else old.rstrip("\n") + "\n\n" + text
    path.write_text(new)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=4000)
    parser.add_argument("--max-seq-len", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(f"python benchmarks/packing.py --samples {args.samples} --max-seq-len {args.max_seq_len} --seed {args.seed}")
    samples = synthetic_samples(args.samples, args.seed)
    results = {mode: measure(samples, args.max_seq_len, mode) for mode in (PACK, PAD_TO_MAX)}
    text = results_table(args, results)
    print(text)
    write_section(text)
    print(f"wrote {SECTION!r} to {RESULTS}")


if __name__ == "__main__":
    main()
