"""megadiff's command-line tools. Each `tools/NAME.py` runs as a script (`python tools/NAME.py`) and
is also installed as a console script (`megadiff-...`, listed in setup.py) that calls its `main()`."""
