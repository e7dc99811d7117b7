"""Weight mapping and streaming I/O behind tools/convert_*.py and tools/moe_convertor.py."""

import megadiff  # noqa: F401  (installs megadiff's megatron-core import hook before any converter imports it)
