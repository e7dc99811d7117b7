"""Tokenize raw text into Megatron indexed datasets (PREFIX.bin + PREFIX.idx) for continued pretraining,
with the model's Hugging Face tokenizer. Arguments are named as in Megatron-LM's tools/preprocess_data.py.

  .venv/bin/python tools/preprocess_data.py --input corpus.jsonl --output-prefix data/corpus \\
      --tokenizer HF_DIR [--json-keys text] [--workers 4]

--input: .jsonl files (one JSON object per line) or .parquet files, or directories of them; each row's
--json-keys field is one document. Every document is stored as its text's token ids plus the
tokenizer's EOS as end-of-document token (--append-eod, on by default): training splits samples into
documents at those EODs. One json key writes PREFIX.bin/.idx; several write PREFIX_{key}_document.bin/.idx
each, as Megatron-LM names them. Use the files with `data.blend: [PREFIX]` in a training config.
Existing outputs are not replaced without --overwrite; an interrupted run leaves none behind.
"""

import argparse
import os
import shlex
import sys


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, nargs="+", help=".jsonl / .parquet files or directories of them")
    p.add_argument("--output-prefix", required=True, help="PREFIX of the PREFIX.bin / PREFIX.idx to write")
    p.add_argument(
        "--tokenizer", "--tokenizer-model", dest="tokenizer", required=True, help="HF tokenizer dir (the model's)"
    )
    p.add_argument("--json-keys", nargs="+", default=["text"], help="row fields to tokenize (default: text)")
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes (default 1)")
    p.add_argument(
        "--append-eod",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="end every document with the tokenizer's EOS (default: on; training needs it to find documents)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace existing PREFIX.bin / PREFIX.idx")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> int:
    from megadiff.platform import install_import_hook

    install_import_hook()  # first, before anything imports megatron-core
    args = parse_args(argv)
    from megadiff.data.preprocess import output_prefixes, preprocess
    from megadiff.errors import UserError, user_error_exit

    command = ["--input", *map(os.path.abspath, args.input), "--output-prefix", os.path.abspath(args.output_prefix)]
    command += ["--tokenizer", os.path.abspath(args.tokenizer), "--json-keys", *args.json_keys]
    command += ["--workers", str(args.workers), "--append-eod" if args.append_eod else "--no-append-eod"]
    command += ["--overwrite"] if args.overwrite else []
    print("preprocess_data.py " + shlex.join(command), flush=True)
    if args.workers < 1:
        return user_error_exit("--workers must be >= 1")
    try:
        stats = preprocess(
            args.input,
            args.output_prefix,
            args.tokenizer,
            json_keys=args.json_keys,
            workers=args.workers,
            append_eod=args.append_eod,
            overwrite=args.overwrite,
            progress=not args.no_progress,
        )
    except UserError as e:
        return user_error_exit(e)
    rate = stats.tokens / stats.seconds if stats.seconds else 0.0
    print(
        f"{stats.rows} rows from {stats.files} file(s): {stats.documents} documents, {stats.tokens} tokens "
        f"(EOD included), {stats.empty} empty texts skipped; {stats.bytes_written / 2**20:.2f} MiB written in "
        f"{stats.seconds:.1f} s ({rate:,.0f} tokens/s, {args.workers} worker(s))"
    )
    written = ", ".join(sorted(set(output_prefixes(args.output_prefix, args.json_keys).values())))
    print(f"indexed dataset written: {written} (.bin + .idx); train on it with data.blend: [{written}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
