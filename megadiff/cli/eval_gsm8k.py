"""Evaluate a diffusion LLM (LLaDA2, LLaDA, LLaDA-MoE) on GSM8K-format rows with its family's sampler.

  .venv/bin/python tools/eval_gsm8k.py --model DIR --data test.jsonl --output-dir eval/ [--limit 100]

Rows need `question` and `answer` (ending in `#### <number>`); .jsonl or .parquet. Each question is
sent as one user turn in the chat template. The prediction is the number after the last `####` in the
output, else its last number; a missing number counts as wrong. Writes samples.jsonl (one line per
question) and summary.json to --output-dir and prints the accuracy.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

from megadiff.inference.cli import (
    add_decoding_arguments,
    add_model_arguments,
    apply_family_defaults,
    command_line,
    decoding_options,
    load_decoding_model,
    prepare_decoding,
    untrained_editing_warning,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--data", required=True, nargs="+", help=".jsonl / .parquet file(s) or a directory")
    parser.add_argument("--output-dir", required=True, help="where samples.jsonl and summary.json go")
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N rows")
    add_decoding_arguments(parser, batch_size=8)
    return parser


def main(argv=None) -> int:
    from megadiff.platform import install_import_hook

    install_import_hook()  # first, before anything imports megatron-core
    parser = build_parser()
    args = parser.parse_args(argv)
    apply_family_defaults(args)  # sampler flags left unset: the model family's (echoed below)
    print(command_line("tools/eval_gsm8k.py", parser, args), flush=True)
    from megadiff.files.outputs import check_output_directory, check_output_file, open_output, refuse_overlaps
    from megadiff.inference import decode_tokens, encode_prompt, generate
    from megadiff.inference.gsm8k import answers_match, extract_answer, gold_answer, read_gsm8k_rows

    samples_path = os.path.join(args.output_dir, "samples.jsonl")
    summary_path = os.path.join(args.output_dir, "summary.json")
    try:
        if args.limit is not None and args.limit <= 0:
            raise ValueError(f"--limit must be a positive integer, got {args.limit}")
        options = decoding_options(args)
        warning = untrained_editing_warning(args, options)  # editing asked of a model not trained for it
        if warning:
            print(warning, file=sys.stderr, flush=True)
        rows = read_gsm8k_rows(args.data)[: args.limit]
        golds = []
        for row in rows:
            try:
                golds.append(gold_answer(row["answer"]))
            except ValueError as e:
                raise ValueError(f"{row['source']}: {e}") from None
        # Everything that can be wrong with the inputs and the outputs is found before the weights load.
        inputs = prepare_decoding(args)
        named_inputs = [("--model", args.model)] + [("--data", d) for d in args.data]
        named_inputs += [("--tokenizer", path) for path in inputs.paths]
        check_output_directory(args.output_dir, "--output-dir")
        refuse_overlaps([("--output-dir", args.output_dir)], named_inputs, contains_ok=True)
        refuse_overlaps([("--output-dir", samples_path), ("--output-dir", summary_path)], named_inputs)
        if os.path.isdir(args.output_dir):
            for path in (samples_path, summary_path):
                check_output_file(path, "--output-dir")
        tokenizer, mask_id, eos_id = inputs.tokenizer, inputs.mask_id, inputs.eos_id
        prompts = [encode_prompt(row["question"], tokenizer) for row in rows]
        inputs.check_prompts(prompts, options, "questions")
        model = load_decoding_model(args)
    except (OSError, ValueError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    # Similar lengths start in the same block and decode together; row ids keep sampling order-free.
    order = sorted(range(len(rows)), key=lambda i: len(prompts[i]))
    os.makedirs(args.output_dir, exist_ok=True)
    samples = [None] * len(rows)
    num_tokens = forwards = edits = 0
    start = time.perf_counter()
    for first in range(0, len(order), args.batch_size):
        batch = order[first : first + args.batch_size]
        result = generate(model, [prompts[i] for i in batch], options, mask_id, eos_id, row_ids=batch)
        num_tokens += result.num_tokens
        forwards += sum(result.forward_passes)
        edits += result.num_edits
        for i, tokens in zip(batch, result.tokens, strict=True):
            text = decode_tokens(tokens, tokenizer)
            prediction = extract_answer(text)
            samples[i] = {
                "index": i,
                "source": rows[i]["source"],
                "question": rows[i]["question"],
                "gold": golds[i],
                "prediction": prediction,
                "correct": answers_match(prediction, golds[i]),
                "output": text,
                "generated_tokens": len(tokens),
            }
        done = min(first + args.batch_size, len(order))
        correct = sum(s["correct"] for s in samples if s)
        print(f"[{done}/{len(rows)}] accuracy so far {correct / done:.4f}", flush=True)
    seconds = time.perf_counter() - start

    with open_output(samples_path, label="--output-dir") as f:
        for sample in samples:
            f.write(json.dumps(sample) + "\n")
    correct = sum(s["correct"] for s in samples)
    summary = {
        "accuracy": correct / len(rows),
        "correct": correct,
        "total": len(rows),
        "model": args.model,
        "data": args.data,
        "decoding": dataclasses.asdict(options),
        "mask_id": mask_id,
        "eos_id": eos_id,
        "generated_tokens": num_tokens,
        "forward_passes": forwards,
        "tokens_per_forward": num_tokens / max(1, forwards),
        "edits": edits,
        "tokens_per_second": num_tokens / max(seconds, 1e-9),
        "seconds": seconds,
        "command": command_line("tools/eval_gsm8k.py", parser, args),
    }
    with open_output(summary_path, label="--output-dir") as f:
        json.dump(summary, f, indent=2)
    print(
        f"tokens per forward pass: {summary['tokens_per_forward']:.2f}, edits: {edits}, tokens/s: {summary['tokens_per_second']:.1f}"
    )
    print(f"accuracy: {summary['accuracy']:.4f} ({correct}/{len(rows)}); results in {summary_path} and {samples_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
