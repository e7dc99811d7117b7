"""megadiff's full adapter state <-> a Hugging Face PEFT LoRA adapter (HF module names).

The full adapter state (the contract between megadiff's LoRA modules): whole tensors
`"{P}.lora_A.weight"` [r, in] and `"{P}.lora_B.weight"` [out, r], `P` a global megatron-core module
path under the local spec, B's rows in megatron's row layout of the base weight. A PEFT adapter holds
`base_model.model.<hf module>.lora_{A,B}.weight` for the HF model, whose rows are HF's.

Each adapter is converted by the parameter table's row of its base weight (`hf_from_full_mcore`):
that transform only moves rows (QKV regrouped from per-KV-group to [all q | all k | all v]; fc1's
[gate; up] split in two), so it maps B like the base weight, and A (the input side) is unchanged;
fc1's gate_proj and up_proj share the one A. Hence hf(W + a/r B A) = hf(W) + a/r hf(B) A.

The other way, an adapter whose gate_proj and up_proj have different A is refused: it is not one
fused fc1 adapter of rank r (a rank-2r block adapter would represent it, but not at the configured
rank, and would no longer export back to the same file).

`to_peft` / `from_peft` work on dicts; `write_peft_adapter` / `read_peft_adapter` on a directory
(adapter_config.json + adapter_model.safetensors, as `PeftModel.from_pretrained` reads it).
"""

import json
import os
import re

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from megadiff.checkpoint.format import fsync_dir, remove_tree, rename_no_replace, staging_path
from megadiff.errors import UserError
from megadiff.files.disk_space import disk_full_error
from megadiff.models.llada2.config import LLaDA2ModelConfig
from megadiff.models.llada2.hf_mapping import full_mcore_from_hf, hf_from_full_mcore, hf_names, rule_for

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
BASE_METADATA_KEY = "megadiff_base"  # safetensors metadata: the base record of megadiff's exports (JSON)
HF_TARGETS = {  # megatron target module -> the HF leaf modules its base weight is made of
    "linear_qkv": ("query_key_value",),
    "linear_proj": ("dense",),
    "linear_fc1": ("gate_proj", "up_proj"),
    "linear_fc2": ("down_proj",),
}
ATTENTION_TARGETS = ("linear_qkv", "linear_proj")
# HF modules of routed experts: excluded from PEFT's leaf-name matching unless experts are adapted
# (gate_proj etc. also name the routed experts' linears).
ROUTED_EXPERTS_REGEX = r".*\.mlp\.experts\.\d+\..*"
# PEFT LoraConfig fields whose non-default values would change the math this module assumes
# (written as these defaults; on reading, an unset or empty value counts as the default).
_PEFT_DEFAULTS = {
    "bias": "none",
    "fan_in_fan_out": False,
    "use_rslora": False,
    "use_dora": False,
    "modules_to_save": None,
    "layers_to_transform": None,
    "rank_pattern": {},
    "alpha_pattern": {},
}
_PEFT_OFF = ("lora_bias", "target_parameters", "layer_replication", "trainable_token_indices")  # newer PEFT fields


class PeftAdapterError(UserError):
    """A PEFT adapter (dict or directory) that does not fit the model or megadiff's LoRA."""


def model_config(hf_config) -> LLaDA2ModelConfig:
    """The validated model config of an HF config.json dict (or an already validated config)."""
    if isinstance(hf_config, LLaDA2ModelConfig):
        return hf_config
    return LLaDA2ModelConfig.from_hf_dict(dict(hf_config))


def adapted_modules(lora_cfg: dict, hf_config) -> list[str]:
    """The global megatron-core module paths (local spec) that carry an adapter under `lora_cfg`:
    attention targets on every layer; fc1/fc2 on the dense layers' MLP, the shared experts and,
    with `experts`, every routed expert."""
    cfg = model_config(hf_config)
    targets = list(lora_cfg["target_modules"])
    unknown = sorted(set(targets) - set(HF_TARGETS))
    if unknown:
        raise PeftAdapterError(f"lora.target_modules: unknown module(s) {unknown}; choose from {list(HF_TARGETS)}")
    paths = []
    for layer in range(cfg.num_hidden_layers):
        prefix = f"decoder.layers.{layer}."
        for target in targets:
            if target in ATTENTION_TARGETS:
                paths.append(prefix + "self_attention." + target)
            elif layer < cfg.first_k_dense_replace:
                paths.append(prefix + "mlp." + target)
            else:
                if cfg.num_shared_experts:
                    paths.append(prefix + "mlp.shared_experts." + target)
                if lora_cfg.get("experts"):
                    paths += [prefix + f"mlp.experts.local_experts.{e}.{target}" for e in range(cfg.num_experts)]
    return paths


def hf_modules(path: str) -> tuple:
    """(table row, HF module names) of a megatron-core module path: fc1 gives [gate_proj, up_proj]."""
    rule, index = rule_for(path + ".weight")
    return rule, [name[: -len(".weight")] for name in hf_names(rule, index)]


def peft_target_modules(lora_cfg: dict) -> list[str]:
    return sorted({hf for target in lora_cfg["target_modules"] for hf in HF_TARGETS[target]})


def _check_keys(found, expected, what: str) -> None:
    missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    if missing or extra:
        raise PeftAdapterError(
            f"{what}: "
            + "; ".join(
                part
                for part in (
                    f"missing {missing[:4]}{' ...' if len(missing) > 4 else ''}" if missing else "",
                    f"unexpected {extra[:4]}{' ...' if len(extra) > 4 else ''}" if extra else "",
                )
                if part
            )
            + " (the adapter's target_modules / experts / model config do not match)"
        )


def _check_pair(name: str, a: torch.Tensor, b: torch.Tensor, rank: int, shape, what: str) -> None:
    """A [r, in] and B [out, r] against the base weight's [out, in]."""
    out, inp = shape
    if a.dim() != 2 or tuple(a.shape) != (rank, inp):
        raise PeftAdapterError(f"{what}: {name}.lora_A.weight has shape {list(a.shape)}, expected {[rank, inp]}")
    if b.dim() != 2 or tuple(b.shape) != (out, rank):
        raise PeftAdapterError(f"{what}: {name}.lora_B.weight has shape {list(b.shape)}, expected {[out, rank]}")


def _base_shapes(cfg: LLaDA2ModelConfig, paths) -> dict[str, tuple[int, int]]:
    """[out, in] of each adapted base weight, in megatron's (whole-tensor) layout."""
    qkv = (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * cfg.head_dim
    shapes = {}
    for path in paths:
        leaf = path.rsplit(".", 1)[-1]
        if leaf == "linear_qkv":
            shapes[path] = (qkv, cfg.hidden_size)
        elif leaf == "linear_proj":
            shapes[path] = (cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim)
        else:
            ffn = cfg.intermediate_size if ".mlp.linear_fc" in path else cfg.moe_intermediate_size
            if ".shared_experts." in path:
                ffn = cfg.moe_intermediate_size * cfg.num_shared_experts
            shapes[path] = (2 * ffn, cfg.hidden_size) if leaf == "linear_fc1" else (cfg.hidden_size, ffn)
    return shapes


def to_peft(
    full: dict[str, torch.Tensor], lora_cfg: dict, hf_config, base_model_name_or_path: str | None = None
) -> tuple[dict[str, torch.Tensor], dict]:
    """(PEFT state dict, adapter_config dict) of a full adapter state. Every module `lora_cfg`
    adapts must be in `full`, and nothing else; shapes are checked against the model config."""
    cfg = model_config(hf_config)
    rank = lora_cfg["rank"]
    paths = adapted_modules(lora_cfg, cfg)
    _check_keys(full, [f"{p}.lora_{ab}.weight" for p in paths for ab in "AB"], "full adapter state")
    shapes = _base_shapes(cfg, paths)
    state = {}
    for path in paths:
        a, b = full[path + ".lora_A.weight"], full[path + ".lora_B.weight"]
        _check_pair(path, a, b, rank, shapes[path], "full adapter state")
        rule, names = hf_modules(path)
        for name, b_hf in zip(names, hf_from_full_mcore(rule, b, cfg), strict=True):
            # own storage per tensor: safetensors refuses shared tensors, fc1's A goes to two modules
            state[f"{PEFT_PREFIX}{name}.lora_A.weight"] = a.detach().clone().contiguous()
            state[f"{PEFT_PREFIX}{name}.lora_B.weight"] = b_hf.detach().clone().contiguous()
    adapter_config = dict(
        _PEFT_DEFAULTS,
        peft_type="LORA",
        # CAUSAL_LM: PeftModel.from_pretrained returns a PeftModelForCausalLM, whose generate() is
        # the model's (block decoding, in megadiff's remote code and the released one alike).
        task_type="CAUSAL_LM",
        r=rank,
        lora_alpha=lora_cfg["alpha"],
        lora_dropout=lora_cfg.get("dropout", 0.0),
        target_modules=peft_target_modules(lora_cfg),
        exclude_modules=None if lora_cfg.get("experts") else ROUTED_EXPERTS_REGEX,
        init_lora_weights=True,
        inference_mode=True,
        base_model_name_or_path=base_model_name_or_path,
    )
    return state, adapter_config


def lora_config_from_peft(adapter_config: dict, state_keys, what: str = CONFIG_NAME) -> dict:
    """megadiff's lora fields (rank, alpha, dropout, target_modules, experts) of a PEFT adapter_config.
    `init` and `seed` (how fresh adapters start) have no PEFT counterpart and are left out."""

    def fail(field, why):
        raise PeftAdapterError(f"{what}: {field}: {why}")

    if adapter_config.get("peft_type") != "LORA":
        fail("peft_type", f"is {adapter_config.get('peft_type')!r}; only LORA adapters are supported")
    for field, default in [*_PEFT_DEFAULTS.items(), *((f, None) for f in _PEFT_OFF)]:
        value = adapter_config.get(field)
        if value != default and value not in (None, False, {}, []):
            fail(field, f"is {value!r}; megadiff's LoRA supports only {default!r}")
    rank, alpha = adapter_config.get("r"), adapter_config.get("lora_alpha")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        fail("r", f"must be a positive integer, got {rank!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        fail("lora_alpha", f"must be a number, got {alpha!r}")
    hf_targets = adapter_config.get("target_modules")
    if isinstance(hf_targets, str):
        fail("target_modules", "a regex is not supported; list the HF module names (e.g. ['query_key_value'])")
    hf_targets = set(hf_targets or ())
    known = {hf for names in HF_TARGETS.values() for hf in names}
    if not hf_targets or hf_targets - known:
        fail("target_modules", f"{sorted(hf_targets)}: each must be one of {sorted(known)}")
    if ("gate_proj" in hf_targets) != ("up_proj" in hf_targets):
        fail("target_modules", "gate_proj and up_proj must be adapted together (megatron fuses them into linear_fc1)")
    targets = [t for t, names in HF_TARGETS.items() if names[0] in hf_targets]
    experts = any(re.fullmatch(ROUTED_EXPERTS_REGEX, k[len(PEFT_PREFIX) :]) for k in state_keys)
    return dict(
        rank=rank,
        alpha=alpha,
        dropout=adapter_config.get("lora_dropout", 0.0),
        target_modules=targets,
        experts=experts,
    )


def from_peft(
    state: dict[str, torch.Tensor], adapter_config: dict, hf_config, what: str = "PEFT adapter"
) -> tuple[dict[str, torch.Tensor], dict]:
    """(full adapter state, lora fields) of a PEFT adapter: the inverse of `to_peft`."""
    cfg = model_config(hf_config)
    lora_cfg = lora_config_from_peft(adapter_config, state, what)
    paths = adapted_modules(lora_cfg, cfg)
    modules = {path: hf_modules(path) for path in paths}
    expected = [f"{PEFT_PREFIX}{n}.lora_{ab}.weight" for _, names in modules.values() for n in names for ab in "AB"]
    _check_keys(state, expected, what)
    shapes = _base_shapes(cfg, paths)
    full = {}
    for path, (rule, names) in modules.items():
        a_list = [state[f"{PEFT_PREFIX}{n}.lora_A.weight"] for n in names]
        b_list = [state[f"{PEFT_PREFIX}{n}.lora_B.weight"] for n in names]
        out, inp = shapes[path]
        for name, a, b in zip(names, a_list, b_list, strict=True):  # fc1: each HF module has half the rows
            _check_pair(PEFT_PREFIX + name, a, b, lora_cfg["rank"], (out // len(names), inp), what)
        if any(not torch.equal(a, a_list[0]) for a in a_list[1:]):
            raise PeftAdapterError(
                f"{what}: {names[0]} and {names[1]} have different lora_A: megatron fuses them into one "
                f"linear_fc1 adapter, which needs one shared A (train them with a shared A, or leave them out)"
            )
        full[path + ".lora_A.weight"] = a_list[0].clone()
        full[path + ".lora_B.weight"] = full_mcore_from_hf(rule, b_list, cfg).clone()
    return full, lora_cfg


# ---- the adapter directory -------------------------------------------------------------------


def write_peft_adapter(
    out_dir: str, state: dict[str, torch.Tensor], adapter_config: dict, base: dict | None = None
) -> str:
    """Write adapter_config.json + adapter_model.safetensors into a new `out_dir`. Built in
    `out_dir.tmp-<nonce>` and renamed when complete, so a crash never leaves a valid-looking adapter.
    An existing `out_dir` is refused. `base`: the base model's record (megadiff.lora.base_record),
    kept in the safetensors metadata so that training from the adapter can check its base."""
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir):
        raise PeftAdapterError(f"{out_dir}: already exists; choose a new directory for the adapter")
    if not os.path.isdir(os.path.dirname(out_dir)):
        raise PeftAdapterError(f"{os.path.dirname(out_dir)}: parent directory of the adapter does not exist")
    staging = staging_path(out_dir)
    os.makedirs(staging)
    try:
        metadata = {"format": "pt", **({BASE_METADATA_KEY: json.dumps(base, sort_keys=True)} if base else {})}
        save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(staging, WEIGHTS_NAME), metadata)
        with open(os.path.join(staging, CONFIG_NAME), "w") as f:
            json.dump(adapter_config, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(staging)
        rename_no_replace(staging, out_dir)  # claims the name: a concurrent export to it fails here
    except FileExistsError:
        remove_tree(staging)
        raise PeftAdapterError(
            f"{out_dir}: another export wrote it while this one ran; this one's was discarded"
        ) from None
    except BaseException as e:
        remove_tree(staging)
        full = disk_full_error(out_dir, e)
        if full is not None:
            raise full from e
        raise
    return out_dir


def read_peft_adapter(adapter_dir: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict, adapter_config) of a PEFT adapter directory; errors name the file."""
    config_path = os.path.join(adapter_dir, CONFIG_NAME)
    weights_path = os.path.join(adapter_dir, WEIGHTS_NAME)
    for path in (config_path, weights_path):
        if not os.path.isfile(path):
            raise PeftAdapterError(f"{path}: not found; a PEFT adapter dir holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    try:
        with open(config_path) as f:
            adapter_config = json.load(f)
    except (OSError, ValueError) as e:
        raise PeftAdapterError(f"{config_path}: not valid JSON ({e})") from None
    if not isinstance(adapter_config, dict):
        raise PeftAdapterError(f"{config_path}: must hold a JSON object")
    try:
        state = load_file(weights_path)
    except (OSError, SafetensorError, ValueError) as e:
        raise PeftAdapterError(f"{weights_path}: not a readable safetensors file ({e})") from None
    bad = [k for k in state if not (k.startswith(PEFT_PREFIX) and k.endswith((".lora_A.weight", ".lora_B.weight")))]
    if bad:
        raise PeftAdapterError(
            f"{weights_path}: key {bad[0]!r} is not a LoRA weight (expected {PEFT_PREFIX}<module>.lora_{{A,B}}.weight)"
        )
    return state, adapter_config
