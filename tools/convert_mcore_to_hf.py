#!/usr/bin/env python3
"""megadiff megatron checkpoint -> Hugging Face dir (or a LoRA checkpoint -> merged model / PEFT adapter): the `megadiff-convert-mcore-to-hf` console script (setup.py).
Command line and help: checkpoint_converters.cli.mcore_to_hf (`--help`)."""

import sys

from checkpoint_converters.cli import mcore_to_hf as cli

parse_args = cli.parse_args


def main(argv=None) -> int:
    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main())
