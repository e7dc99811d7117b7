"""A family's model as an HF directory: config.json and model.safetensors, laid out as released.

`write_reference_dir` is the tiny-model builder of every family (tools/make_tiny_model.py --family
in issue 28 phase 2, which also writes the family's tokenizer): the reference model of a preset
with random, non-trivial weights, saved under the released checkpoint's tensor names, which any
HF-format reader (megadiff.hf.checkpoint_reader, the converters) then reads like a download.
"""

import json
import os

from safetensors.torch import save_file


def write_reference_dir(family, out_dir: str, preset: str = "tiny", seed: int = 0, **overrides) -> dict:
    """Write `family`'s preset (with overrides) as an HF dir; returns the config.json dict."""
    cfg = family.preset(preset, **overrides)
    family.config_from_hf(cfg, source=os.path.join(out_dir, "config.json"))  # refuse before writing
    model = family.build_reference(cfg, seed=seed)
    state = {name: t.detach().contiguous() for name, t in model.state_dict().items()}
    expected = family.mapping.expected_hf_shapes(family.config_from_hf(cfg))
    if {n: tuple(t.shape) for n, t in state.items()} != expected:
        raise RuntimeError(f"{family.name}: the reference's tensors differ from its mapping table's")
    os.makedirs(out_dir, exist_ok=True)
    save_file(state, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(dict(cfg, torch_dtype="float32"), f, indent=2, sort_keys=True)
    return cfg
