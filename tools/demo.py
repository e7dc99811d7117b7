#!/usr/bin/env python3
"""The end-to-end demo on a tiny model (make demo): the `megadiff-demo` console script (setup.py).
Command line and help: megadiff.cli.demo (`--help`)."""

import sys

# without_warnings: re-exported for tests/training/test_log_output.py, which imports it from here
from megadiff.cli.demo import main, without_warnings  # noqa: F401

if __name__ == "__main__":
    sys.exit(main())
