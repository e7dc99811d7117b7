"""megadiff's remote-code files of an HF LLaDA2 directory and the `auto_map` that names them.

Kept free of the reference model (and so of transformers' imports: benchmarks/RESULTS.md) so that tools which
only move bytes start fast.
"""

import os

# The model's config and modeling files, and the decoding modules its `generate()` imports from
# beside it (megadiff.inference's sampler and rules, which import nothing of megadiff).
REMOTE_CODE_FILES = ("configuration_llada2_moe.py", "modeling_llada2_moe.py", "sampler.py", "editing.py")
_SOURCE_PACKAGE = {
    "configuration_llada2_moe.py": "models/llada2",
    "modeling_llada2_moe.py": "models/llada2",
    "sampler.py": "inference",
    "editing.py": "inference",
}
AUTO_MAP = {
    "AutoConfig": "configuration_llada2_moe.LLaDA2MoeConfig",
    "AutoModel": "modeling_llada2_moe.LLaDA2MoeModelLM",
    "AutoModelForCausalLM": "modeling_llada2_moe.LLaDA2MoeModelLM",
}


def remote_code_source(name: str) -> str:
    """The path of megadiff's own file for remote-code file `name` (one of REMOTE_CODE_FILES)."""
    megadiff_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.path.join(megadiff_dir, _SOURCE_PACKAGE[name], name)
