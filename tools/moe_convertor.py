#!/usr/bin/env python3
"""merge or split the routed experts of an HF LLaDA2 checkpoint (dFactory's layout): the `megadiff-moe-convert` console script (setup.py).
Command line and help: checkpoint_converters.cli.moe (`--help`)."""

import sys

from checkpoint_converters.cli import moe as cli

parse_args = cli.parse_args


def main(argv=None) -> int:
    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main())
