#!/usr/bin/env python
"""GSM8K exact-match accuracy of a dLLM of any family: the `megadiff-eval-gsm8k` console script (setup.py).
Command line and help: megadiff.cli.eval_gsm8k (`--help`)."""

import sys

from megadiff.cli.eval_gsm8k import main

if __name__ == "__main__":
    sys.exit(main())
