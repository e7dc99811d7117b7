"""Write a synthetic GSM8K-format task (short arithmetic word problems ending in '#### <answer>')
as jsonl rows with `question` and `answer`; tools/build_gsm8k_dataset.py turns it into SFT data.
With --text, rows are `{"text": question + answer}` documents instead: a tiny pretraining corpus for
tools/preprocess_data.py. With --preference: DPO pairs in TRL's format instead, the same problems
answered in two styles (chosen "The answer is 7.", rejected "7"; megadiff.data.synthetic_preference),
for examples/configs/tiny_dpo.yaml.

  .venv/bin/python tools/make_synthetic_data.py --output demo_out/data/gsm8k_synthetic.jsonl --rows 600
  .venv/bin/python tools/make_synthetic_data.py --output cpt_out/corpus.jsonl --rows 2000 --text
  .venv/bin/python tools/make_synthetic_data.py --preference --output demo_out/data/pairs.jsonl --rows 256
"""

import argparse
import json
import os
import sys


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", required=True, help="jsonl file to write")
    p.add_argument("--rows", type=int, default=600)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--text", action="store_true", help='write {"text": ...} documents (a pretraining corpus)')
    p.add_argument("--preference", action="store_true", help="write DPO preference pairs (prompt/chosen/rejected)")
    args = p.parse_args(argv)
    if args.rows < 1:
        from megadiff.errors import user_error_exit

        return user_error_exit("--rows must be >= 1")
    if args.text and args.preference:
        from megadiff.errors import user_error_exit

        return user_error_exit("--text and --preference are exclusive: one kind of rows per file")
    from megadiff.data.synthetic import arithmetic_problems
    from megadiff.data.synthetic_preference import style_pairs

    rows = style_pairs(args.rows, seed=args.seed) if args.preference else arithmetic_problems(args.rows, seed=args.seed)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        for row in rows:
            if args.text:
                row = {"text": row["question"] + "\n" + row["answer"]}
            f.write(json.dumps(row) + "\n")
    kind = (
        "text documents" if args.text else "preference pairs (TRL format)" if args.preference else "GSM8K-format rows"
    )
    print(f"{args.rows} synthetic {kind} written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
