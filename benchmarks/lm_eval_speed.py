#!/usr/bin/env python
"""Requests per second of the `megadiff` lm-eval model, as ratios against one sampler call per request.

  .venv/bin/python benchmarks/lm_eval_speed.py [--model demo_out/trained_hf] [--write-results]

Requests: the demo's arithmetic questions (megadiff.data.synthetic) in the chat template, as lm-eval sends
them with --apply_chat_template. Baseline: one sampler call per request (megadiff.inference.generate on
one prompt, gen_length 32, block 32, steps 32, threshold 0.95: the demo's decoding). Measured, in the same
process, through the lm-eval model (MegadiffLM, lm-eval's Instance objects):
  - loglikelihood of the right answer ("a + b = c\\n#### c") at mc_num 1, 8 and 32 (batch_size rows per
    forward: MC samples of several requests share a forward when mc_num < batch_size);
  - generate_until with the same decoding as the baseline, batch_size prompts per sampler call.
Each cell is the best of --repeats runs, the baseline measured between them. The model: --model DIR (the
demo's trained model decodes like a real one: confident, answers end at EOS), else a tiny random LLaDA2
(2 layers, as the demo's) written to a temporary dir. --write-results replaces the `## lm_eval_speed`
section of benchmarks/RESULTS.md. Needs lm-eval (pip install -e '.[eval]').
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import platform
import re
import sys
import tempfile
import time

import torch

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")
SECTION = "lm_eval_speed"


def best_of(repeats, fn):
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def run(model_dir, requests, repeats, batch_size):
    from lm_eval.api.instance import Instance

    from megadiff.data.synthetic import arithmetic_problems
    from megadiff.evaluation import register_lm_eval_model
    from megadiff.inference import generate

    megadiff_lm = register_lm_eval_model()
    lm = megadiff_lm(pretrained=model_dir, batch_size=batch_size, gen_length=32, block_length=32, steps=32)
    rows = arithmetic_problems(requests, seed=5)
    contexts = [lm.apply_chat_template([{"role": "user", "content": r["question"]}]) for r in rows]
    prompts = [lm.tokenizer.encode(c, add_special_tokens=False) for c in contexts]
    likelihood = [
        Instance("loglikelihood", {}, (c, r["answer"]), i) for i, (c, r) in enumerate(zip(contexts, rows, strict=True))
    ]
    generation = [
        Instance("generate_until", {}, (c, {"until": [], "max_gen_toks": 32}), i) for i, c in enumerate(contexts)
    ]

    def baseline():
        for i, prompt in enumerate(prompts):
            generate(lm.model, [prompt], lm.options, lm.mask_id, lm.eos_id, row_ids=[i])

    baseline_s = [best_of(repeats, baseline)]
    cells = []
    for name, mc_num, rows_per_forward in (
        ("loglikelihood", 1, 1),
        ("loglikelihood", 1, batch_size),
        ("loglikelihood", 8, batch_size),
        ("loglikelihood", 32, batch_size),
        ("generate_until", None, batch_size),
    ):
        lm.args = dataclasses.replace(lm.args, mc_num=mc_num or 1, batch_size=rows_per_forward)
        if name == "loglikelihood":
            seconds = best_of(repeats, lambda: lm.loglikelihood(likelihood, disable_tqdm=True))
        else:
            seconds = best_of(repeats, lambda: lm.generate_until(generation, disable_tqdm=True))
        baseline_s.append(best_of(1, baseline))
        cells.append(dict(request=name, mc_num=mc_num, batch_size=rows_per_forward, seconds=seconds))
        print(f"{name} mc_num={mc_num} batch_size={rows_per_forward}: {requests / seconds:.1f} requests/s", flush=True)
    base = min(baseline_s)
    for cell in cells:
        cell["rps"] = requests / cell["seconds"]
        cell["ratio"] = base / cell["seconds"]
    return requests / base, cells


def markdown(model_label, requests, repeats, baseline_rps, cells) -> str:
    machine = f"{os.cpu_count()}-core CPU ({platform.machine()}), torch {torch.__version__}, torch threads: {torch.get_num_threads()}"
    lines = [
        f"## {SECTION}",
        "",
        f"{datetime.date.today().isoformat()}, {machine}; `benchmarks/lm_eval_speed.py` ({model_label}; {requests} "
        f"demo arithmetic questions in the chat template; best of {repeats}). Baseline: one sampler call per "
        f"request (gen_length 32, block 32, steps 32, threshold 0.95): {baseline_rps:.1f} requests/s. "
        "A ratio above 1 is faster than the baseline.",
        "",
        "| request type | mc_num | batch_size (rows per forward) | requests/s | vs one sampler call per request |",
        "|---|---:|---:|---:|---:|",
    ]
    for c in cells:
        lines.append(
            f"| {c['request']} | {c['mc_num'] or '-'} | {c['batch_size']} | {c['rps']:.1f} | {c['ratio']:.2f}x |"
        )
    lines += [
        "",
        "loglikelihood runs each request's clean prefix once (a KV cache) and then only the noised blocks, "
        "mc_num rows per request, several requests per forward; its cost grows with mc_num / batch_size. "
        "generate_until batches prompts that start in the same block.",
    ]
    return "\n".join(lines) + "\n"


def write_section(section: str) -> None:
    """Replace (or append) this benchmark's section of RESULTS.md, leaving the others alone."""
    text = open(RESULTS).read() if os.path.exists(RESULTS) else "# Benchmark results\n"
    pattern = re.compile(rf"^## {SECTION}\n.*?(?=^## |\Z)", re.S | re.M)
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
    parser.add_argument("--model", default=None, help="HF or mcore model dir (default: a tiny random LLaDA2)")
    parser.add_argument("--requests", type=int, default=64, help="requests per measurement")
    parser.add_argument("--batch-size", type=int, default=32, help="rows per forward (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs per cell")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (default 1: steadier on a shared machine)"
    )
    parser.add_argument("--write-results", action="store_true", help=f"update the ## {SECTION} section of RESULTS.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(
        f"benchmarks/lm_eval_speed.py{' --model ' + args.model if args.model else ''} --requests {args.requests} "
        f"--batch-size {args.batch_size} --repeats {args.repeats} --threads {args.threads}"
        + (" --write-results" if args.write_results else ""),
        flush=True,
    )
    with tempfile.TemporaryDirectory() as tmp:
        if args.model:
            model_dir, label = args.model, f"model {args.model}"
        else:
            from megadiff.hf.tiny import write_tiny_model_dir

            model_dir, label = write_tiny_model_dir(tmp, seed=0, num_hidden_layers=2), "tiny random LLaDA2, 2 layers"
        baseline_rps, cells = run(model_dir, args.requests, args.repeats, args.batch_size)
    section = markdown(label, args.requests, args.repeats, baseline_rps, cells)
    print(section)
    if args.write_results:
        write_section(section)
        print(f"results written to {RESULTS} (## {SECTION})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
