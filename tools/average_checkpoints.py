#!/usr/bin/env python3
"""average the weights of checkpoints of one run into a new megatron checkpoint: the `megadiff-average-checkpoints` console script (setup.py).
Command line and help: checkpoint_converters.cli.average (`--help`)."""

import sys

from checkpoint_converters.cli import average as cli

parse_args = cli.parse_args


def main(argv=None) -> int:
    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main())
