#!/usr/bin/env python3
"""Diffusion SFT of a dLLM of any model family on megatron-core, under torchrun: the `megadiff-train` console script (setup.py).
Command line and help: megadiff.cli.train (`--help`)."""

import sys

from megadiff.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
