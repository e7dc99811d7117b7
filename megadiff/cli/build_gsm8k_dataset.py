"""Turn GSM8K-format rows (`question`, `answer`) into megadiff SFT chat rows, split into train/test.

  .venv/bin/python tools/build_gsm8k_dataset.py --input gsm8k_train.jsonl --output-dir data/gsm8k

Writes train.jsonl ({"messages": [user question, assistant answer]}) and test.jsonl (the same, plus
the original `question` and `answer`, so tools/eval_gsm8k.py can read it). Inputs are .jsonl or
.parquet files you already have; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, nargs="+", help=".jsonl / .parquet file(s) or a directory")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument(
        "--test-fraction", type=float, default=0.1, help="share of rows held out (default: %(default)s)"
    )
    parser.add_argument("--seed", type=int, default=0, help="shuffle seed of the split (default: %(default)s)")
    return parser


def write_jsonl(path: str, rows: list[dict]) -> None:
    from megadiff.files.outputs import open_output

    with open_output(path, label="--output-dir") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from megadiff.inference.cli import command_line
    from megadiff.inference.gsm8k import read_gsm8k_rows, sft_row, split_rows

    print(command_line("tools/build_gsm8k_dataset.py", parser, args), flush=True)

    from megadiff.files.outputs import check_output_directory, refuse_overlaps

    outputs = [("--output-dir", os.path.join(args.output_dir, name)) for name in ("train.jsonl", "test.jsonl")]
    try:
        inputs = [("--input", path) for path in args.input]
        check_output_directory(args.output_dir, "--output-dir")
        refuse_overlaps([("--output-dir", args.output_dir)], inputs, contains_ok=True)
        refuse_overlaps(outputs, inputs)  # never over (or into) the rows it reads
        rows = read_gsm8k_rows(args.input)
        train, test = split_rows(rows, args.test_fraction, args.seed)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    os.makedirs(args.output_dir, exist_ok=True)
    write_jsonl(os.path.join(args.output_dir, "train.jsonl"), [sft_row(r) for r in train])
    write_jsonl(
        os.path.join(args.output_dir, "test.jsonl"),
        [dict(sft_row(r), question=r["question"], answer=r["answer"]) for r in test],
    )
    print(
        f"{len(rows)} rows -> {len(train)} train, {len(test)} test; written to "
        f"{os.path.join(args.output_dir, 'train.jsonl')} and {os.path.join(args.output_dir, 'test.jsonl')}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
