#!/usr/bin/env python3
"""Plan a diffusion SFT run: per-GPU memory and speed of every layout: the `megadiff-plan` console script (setup.py).
Command line and help: megadiff.cli.plan (`--help`)."""

import sys

from megadiff.cli.plan import main

if __name__ == "__main__":
    sys.exit(main())
