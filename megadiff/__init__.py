"""megadiff: a Megatron-Core trainer for diffusion language models (LLaDA2).

Importing megadiff changes nothing in torch or megatron-core; entry points call
`megadiff.platform.install_import_hook()` first (see there).
"""
