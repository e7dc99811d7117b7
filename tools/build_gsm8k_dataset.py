#!/usr/bin/env python
"""Turn GSM8K-format rows into megadiff SFT chat rows, split into train/test: the `megadiff-build-gsm8k-dataset` console script (setup.py).
Command line and help: megadiff.cli.build_gsm8k_dataset (`--help`)."""

import sys

from megadiff.cli.build_gsm8k_dataset import main

if __name__ == "__main__":
    sys.exit(main())
