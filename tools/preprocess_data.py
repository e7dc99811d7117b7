#!/usr/bin/env python3
"""Tokenize raw text into Megatron indexed datasets (PREFIX.bin + PREFIX.idx): the `megadiff-preprocess-data` console script (setup.py).
Command line and help: megadiff.cli.preprocess_data (`--help`)."""

import sys

from megadiff.cli.preprocess_data import main

if __name__ == "__main__":
    sys.exit(main())
