"""megadiff's command-line tools. Each `tools/NAME.py` runs as a script (`python tools/NAME.py`); its
code lives in a package (megadiff.cli.NAME, checkpoint_converters.cli.NAME) and the installed console
scripts (`megadiff-...`, listed in setup.py) call the same `main()`."""
