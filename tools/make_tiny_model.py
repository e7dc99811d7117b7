#!/usr/bin/env python3
"""Write a tiny random-init HF directory of a model family: the `megadiff-make-tiny-model` console script (setup.py).
Command line and help: megadiff.cli.make_tiny_model (`--help`)."""

import sys

from megadiff.cli.make_tiny_model import main

if __name__ == "__main__":
    sys.exit(main())
