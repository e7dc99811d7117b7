"""megadiff's remote-code files of an HF LLaDA2 directory and the `auto_map` that names them.

Kept free of the reference model (and so of transformers' imports: benchmarks/RESULTS.md) so that tools which
only move bytes start fast.
"""

import os

REMOTE_CODE_FILES = ("configuration_llada2_moe.py", "modeling_llada2_moe.py")
AUTO_MAP = {
    "AutoConfig": "configuration_llada2_moe.LLaDA2MoeConfig",
    "AutoModel": "modeling_llada2_moe.LLaDA2MoeModelLM",
    "AutoModelForCausalLM": "modeling_llada2_moe.LLaDA2MoeModelLM",
}


def remote_code_dir() -> str:
    """megadiff/hf, where the remote-code files live."""
    return os.path.dirname(os.path.abspath(__file__))
