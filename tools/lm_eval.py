#!/usr/bin/env python
"""lm-evaluation-harness with megadiff's dLLM model: the `megadiff-lm-eval` console script (setup.py).
Command line and help: megadiff.cli.lm_eval (`--help`)."""

import os
import sys

# `python tools/lm_eval.py` puts tools/ first on sys.path, where this file would hide the lm_eval package
# that megadiff.cli.lm_eval imports: take tools/ off first (the one sys.path edit left here).
if sys.path and os.path.abspath(sys.path[0] or os.curdir) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)

from megadiff.cli.lm_eval import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
