#!/usr/bin/env python3
"""Compare megadiff's model of any family and layout with its plain-PyTorch reference: the `megadiff-compare-logits` console script (setup.py).
Command line and help: megadiff.cli.compare_logits (`--help`)."""

import sys

from megadiff.cli.compare_logits import main

if __name__ == "__main__":
    sys.exit(main())
