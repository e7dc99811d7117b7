"""Weight mapping and streaming I/O behind tools/convert_*.py and tools/moe_convertor.py."""
