"""When a checkpoint's recorded `hf_source_dir` (megadiff.json) may be used as its HF directory.

The trainer and the converter record the HF dir a checkpoint was made from; the sampler takes its
tokenizer from there and an export its tokenizer and remote code. A received checkpoint controls
that record, so the directory is used only when its config.json equals the model config recorded
in the checkpoint (it is then the model's own HF dir, or one just like it).
"""

import json
import os


def read_json_or_none(path: str):
    """The parsed JSON file, or None when it is missing or unreadable."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def recorded_source_dir(meta: dict) -> tuple[str | None, str]:
    """(the checkpoint's recorded hf_source_dir if it may be used, why or why not)."""
    source = meta.get("hf_source_dir")
    if not source:
        return None, "the checkpoint records no hf_source_dir"
    if not os.path.isdir(source):
        return None, f"recorded hf_source_dir {source} no longer exists"
    config = read_json_or_none(os.path.join(source, "config.json"))
    if config is None or config != meta.get("hf_config"):
        return None, (
            f"recorded hf_source_dir {source} is not used: its config.json "
            f"{'is missing or unreadable' if config is None else 'differs from the config recorded in the checkpoint'}"
            f", so it need not be the directory this checkpoint was made from"
        )
    return source, f"recorded hf_source_dir {source} (its config.json matches the checkpoint's)"
