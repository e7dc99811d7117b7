"""Start a LoRA run's adapters from an existing Hugging Face PEFT adapter dir (`lora.init_from_peft`).

The adapter must be one this run's adapters can hold: the same rank, alpha, target modules and
routed-expert choice as the `lora` section (each mismatch is an error naming the field), shapes that
fit the model, and the same base model. The base is checked by fingerprint
(megadiff.lora.base_record) when the adapter says what it was trained on: megadiff's exports record
the base in the safetensors metadata (`megadiff_base`); for another tool's adapter, a local
`base_model_name_or_path` HF dir is fingerprinted. Without either, only the shapes vouch for it.
"""

import json
import os

from safetensors import safe_open

from .base_record import BaseRecord, check_same_base, record_at
from .peft_format import (
    BASE_METADATA_KEY,
    CONFIG_NAME,
    WEIGHTS_NAME,
    PeftAdapterError,
    from_peft,
    lora_config_from_peft,
    read_peft_adapter,
)

FIELD = "lora.init_from_peft"
MATCHING = (("rank", "r"), ("alpha", "lora_alpha"), ("target_modules", "target_modules"), ("experts", None))


def recorded_base(adapter_dir: str) -> BaseRecord | None:
    """The base megadiff recorded when it exported this adapter (None for another tool's adapter)."""
    path = os.path.join(adapter_dir, WEIGHTS_NAME)
    with safe_open(path, "pt") as f:
        text = (f.metadata() or {}).get(BASE_METADATA_KEY)
    if text is None:
        return None
    try:
        value = json.loads(text)
    except ValueError:
        raise PeftAdapterError(f"{path}: metadata '{BASE_METADATA_KEY}' is not JSON; the file is damaged") from None
    return BaseRecord.from_dict(value, f"{path} metadata '{BASE_METADATA_KEY}'")


def adapter_for_run(adapter_dir: str, lora_cfg: dict, hf_config, run_base: BaseRecord | None) -> tuple[dict, str]:
    """(full adapter state, how the base was checked) of the PEFT adapter at `adapter_dir` for a run
    with the `lora` fields `lora_cfg` on the model `hf_config` whose base is `run_base`. Raises
    naming the field that does not match, before any weight is loaded into the model."""
    where = f"{FIELD}={adapter_dir}"
    state, adapter_config = read_peft_adapter(adapter_dir)
    saved = lora_config_from_peft(adapter_config, state, hf_config, os.path.join(adapter_dir, CONFIG_NAME))
    for key, peft_key in MATCHING:
        have, want = saved[key], lora_cfg[key]
        if key == "target_modules":
            have, want = sorted(have), sorted(want)
        if have != want:
            told = f"{peft_key}={adapter_config.get(peft_key)!r} in {CONFIG_NAME}" if peft_key else "adapters"
            if key == "experts":
                told = "routed-expert adapters" if have else "no routed-expert adapters"
            raise PeftAdapterError(
                f"{where}: the adapter has {told} (lora.{key}={saved[key]!r}), this run has lora.{key}="
                f"{lora_cfg[key]!r}; set lora.{key} to the adapter's, or start from another adapter"
            )
    full, _ = from_peft(state, adapter_config, hf_config, what=where)
    return full, _check_base(adapter_dir, adapter_config, run_base)


def _check_base(adapter_dir: str, adapter_config: dict, run_base: BaseRecord | None) -> str:
    if run_base is None:
        return "base not checked (the run's base is unknown)"
    fix = f"point {run_base.field} at the base the adapter was trained on, or start from another adapter"
    recorded = recorded_base(adapter_dir)
    if recorded is not None:
        if recorded.kind == run_base.kind:
            check_same_base(recorded, run_base, f"{FIELD}={adapter_dir}", fix)
            return f"base checked: the same as recorded ({recorded.describe()})"
        return f"base not checked: the adapter's is a {recorded.kind} base, this run's a {run_base.kind} base"
    named = adapter_config.get("base_model_name_or_path")
    if run_base.kind == "hf" and isinstance(named, str) and os.path.isfile(os.path.join(named, "config.json")):
        check_same_base(record_at("hf", named), run_base, f"{FIELD}={adapter_dir}", fix)
        return f"base checked: base_model_name_or_path {named} is the run's base"
    return f"base not checked (the adapter records none; base_model_name_or_path={named!r}); its shapes fit the model"
