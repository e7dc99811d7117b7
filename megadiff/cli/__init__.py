"""The command-line tools' code: argument parsing and `main(argv=None) -> int` of each tool.

setup.py's console scripts (`megadiff-...`) call these `main()`s; `tools/NAME.py` in a checkout is a
thin script over the same `main()`. The top layer of megadiff: nothing in megadiff imports it."""
