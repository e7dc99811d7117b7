#!/usr/bin/env python
"""Generate text with a dLLM of any family (HF dir or megatron checkpoint): the `megadiff-generate` console script (setup.py).
Command line and help: megadiff.cli.generate (`--help`)."""

import sys

from megadiff.cli.generate import main

if __name__ == "__main__":
    sys.exit(main())
