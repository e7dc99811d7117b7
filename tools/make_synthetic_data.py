#!/usr/bin/env python3
"""Write a synthetic GSM8K-format task, text corpus or DPO preference pairs: the `megadiff-make-synthetic-data` console script (setup.py).
Command line and help: megadiff.cli.make_synthetic_data (`--help`)."""

import sys

from megadiff.cli.make_synthetic_data import main

if __name__ == "__main__":
    sys.exit(main())
