"""megadiff's full adapter state <-> a Hugging Face PEFT LoRA adapter (HF module names).

The full adapter state (the contract between megadiff's LoRA modules): whole tensors
`"{P}.lora_A.weight"` [r, in] and `"{P}.lora_B.weight"` [out, r], `P` a global megatron-core module
path under the local spec, B's rows in megatron's row layout of the base weight. A PEFT adapter holds
`base_model.model.<hf module>.lora_{A,B}.weight` for the HF model, whose rows are HF's.

Any model family: the family (from the HF config) gives the mapping object of each base weight
(megadiff.models.common.mapping), and the HF modules a megatron target is made of are the ones its
mapping objects name (LLaDA2: query_key_value, dense, gate_proj/up_proj, down_proj; LLaDA: q_proj,
k_proj, v_proj, attn_out, ff_proj/up_proj, ff_out; LLaDA-MoE: q/k/v_proj, o_proj, gate/up_proj,
down_proj). Each adapter is converted by its base weight's mapping object (`to_hf`): that transform
only moves rows (QKV regrouped from per-KV-group to [all q | all k | all v], or to separate q, k and
v; fc1's [gate; up] split in two), so it maps B like the base weight, and A (the input side) is
unchanged; the HF modules of one megatron linear (q/k/v, gate/up) share the one A. Hence
hf(W + a/r B A) = hf(W) + a/r hf(B) A.

The other way, an adapter whose q/k/v (or gate_proj and up_proj) have different A is refused: it is
not one fused adapter of rank r (a block adapter of a higher rank would represent it, but not at the
configured rank, and would no longer export back to the same file).

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
from megadiff.models.common import mcore_params as P
from megadiff.models.registry import family_for_config, family_of

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
BASE_METADATA_KEY = "megadiff_base"  # safetensors metadata: the base record of megadiff's exports (JSON)
TARGET_PARAMS = {  # megatron target module -> its base weights (attention; dense MLP, shared, routed experts)
    "linear_qkv": (P.LINEAR_QKV,),
    "linear_proj": (P.LINEAR_PROJ,),
    "linear_fc1": (P.DENSE_FC1, P.SHARED_FC1, P.EXPERT_FC1),
    "linear_fc2": (P.DENSE_FC2, P.SHARED_FC2, P.EXPERT_FC2),
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


def model_config(hf_config):
    """The validated model config of an HF config.json dict (or an already validated config), of
    the family its model_type names."""
    if isinstance(hf_config, dict):
        return family_for_config(hf_config).config_from_hf(dict(hf_config))
    return hf_config


def hf_targets(family) -> dict[str, tuple[str, ...]]:
    """megatron target module -> the HF leaf module names its base weights are made of, in the
    family's mapping table (e.g. LLaDA's linear_qkv -> q_proj, k_proj, v_proj)."""
    out = {}
    for target, params in TARGET_PARAMS.items():
        leaves = [name.rsplit(".", 2)[-2] for m in family.mapping if m.param in params for name in m.hf]
        out[target] = tuple(dict.fromkeys(leaves))
    return out


def adapted_modules(lora_cfg: dict, hf_config) -> list[str]:
    """The global megatron-core module paths (local spec) that carry an adapter under `lora_cfg`:
    attention targets on every layer; fc1/fc2 on the dense layers' MLP, the shared experts and,
    with `experts`, every routed expert."""
    cfg = model_config(hf_config)
    targets = list(lora_cfg["target_modules"])
    unknown = sorted(set(targets) - set(TARGET_PARAMS))
    if unknown:
        raise PeftAdapterError(f"lora.target_modules: unknown module(s) {unknown}; choose from {list(TARGET_PARAMS)}")
    shared = {i.layer for i in family_of(cfg).mapping.instances(cfg) if i.mapping.param is P.SHARED_FC1}
    paths = []
    for layer in range(cfg.num_hidden_layers):
        prefix = f"decoder.layers.{layer}."
        for target in targets:
            if target in ATTENTION_TARGETS:
                paths.append(prefix + "self_attention." + target)
            elif not cfg.moe_layer_pattern[layer]:
                paths.append(prefix + "mlp." + target)
            else:
                if layer in shared:
                    paths.append(prefix + "mlp.shared_experts." + target)
                if lora_cfg.get("experts"):
                    paths += [prefix + f"mlp.experts.local_experts.{e}.{target}" for e in range(cfg.num_experts)]
    return paths


def hf_modules(path: str, hf_config) -> tuple:
    """(mapping object, HF module names) of a megatron-core module path: fc1 gives [gate, up]
    (LLaDA2: gate_proj, up_proj), a separate-QKV family's linear_qkv gives [q, k, v]."""
    mapping, index = family_of(model_config(hf_config)).mapping.for_mcore_name(path + ".weight")
    return mapping, [name[: -len(".weight")] for name in mapping.hf_names(index)]


def peft_target_modules(lora_cfg: dict, hf_config) -> list[str]:
    targets = hf_targets(family_of(model_config(hf_config)))
    return sorted({hf for target in lora_cfg["target_modules"] for hf in targets[target]})


def peft_exclude_modules(lora_cfg: dict, cfg) -> str | None:
    """PEFT's exclude_modules (a regex): the routed experts unless they are adapted, and any other
    module whose leaf name is a target's but that megadiff does not adapt (LLaDA's output layer
    `model.transformer.ff_out` shares its name with the MLP's ff_out)."""
    family = family_of(cfg)
    leaves = set(peft_target_modules(lora_cfg, cfg))
    adapted = {n for path in adapted_modules(lora_cfg, cfg) for n in hf_modules(path, cfg)[1]}
    others = sorted(
        {
            module
            for inst in family.mapping.instances(cfg)
            if inst.expert is None
            for module in (n[: -len(".weight")] for n in inst.hf)
            if module.rsplit(".", 1)[-1] in leaves and module not in adapted
        }
    )
    routed = [] if lora_cfg.get("experts") or not cfg.num_experts else [ROUTED_EXPERTS_REGEX]
    parts = routed + [re.escape(m) for m in others]
    return None if not parts else parts[0] if len(parts) == 1 else "|".join(f"(?:{p})" for p in parts)


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


def _hf_shapes(cfg, path: str) -> list[tuple[int, ...]]:
    """[out, in] of each HF weight an adapted megatron-core linear is made of."""
    family = family_of(cfg)
    mapping, _ = family.mapping.for_mcore_name(path + ".weight")
    dims = family.mapping.dims(cfg)
    return [tuple(dims[d] for d in shape) for shape in mapping.shapes]


def _base_shapes(cfg, paths) -> dict[str, tuple[int, int]]:
    """[out, in] of each adapted base weight, in megatron's (whole-tensor) layout."""
    family = family_of(cfg)
    return {
        path: family.mapping.for_mcore_name(path + ".weight")[0].full_shape(_hf_shapes(cfg, path)) for path in paths
    }


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
        mapping, names = hf_modules(path, cfg)
        for name, b_hf in zip(names, mapping.to_hf(b, cfg), strict=True):
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
        target_modules=peft_target_modules(lora_cfg, cfg),
        exclude_modules=peft_exclude_modules(lora_cfg, cfg),
        init_lora_weights=True,
        inference_mode=True,
        base_model_name_or_path=base_model_name_or_path,
    )
    return state, adapter_config


def lora_config_from_peft(adapter_config: dict, state_keys, hf_config, what: str = CONFIG_NAME) -> dict:
    """megadiff's lora fields (rank, alpha, dropout, target_modules, experts) of a PEFT adapter_config
    for the model `hf_config` (HF config dict or validated config: its family names the HF modules).
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
    by_target = hf_targets(family_of(model_config(hf_config)))
    wanted = adapter_config.get("target_modules")
    if isinstance(wanted, str):
        fail(
            "target_modules",
            f"a regex is not supported; list the HF module names (e.g. {list(by_target['linear_qkv'])})",
        )
    wanted = set(wanted or ())
    known = {hf for names in by_target.values() for hf in names}
    if not wanted or wanted - known:
        fail("target_modules", f"{sorted(wanted)}: each must be one of {sorted(known)}")
    for target, names in by_target.items():
        if len(names) > 1 and 0 < len(wanted & set(names)) < len(names):
            fail(
                "target_modules",
                f"{' and '.join(names)} must be adapted together (megatron fuses them into {target})",
            )
    targets = [t for t, names in by_target.items() if names[0] in wanted]
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
    lora_cfg = lora_config_from_peft(adapter_config, state, cfg, what)
    paths = adapted_modules(lora_cfg, cfg)
    modules = {path: hf_modules(path, cfg) for path in paths}
    expected = [f"{PEFT_PREFIX}{n}.lora_{ab}.weight" for _, names in modules.values() for n in names for ab in "AB"]
    _check_keys(state, expected, what)
    full = {}
    for path, (mapping, names) in modules.items():
        a_list = [state[f"{PEFT_PREFIX}{n}.lora_A.weight"] for n in names]
        b_list = [state[f"{PEFT_PREFIX}{n}.lora_B.weight"] for n in names]
        for name, a, b, shape in zip(names, a_list, b_list, _hf_shapes(cfg, path), strict=True):
            _check_pair(PEFT_PREFIX + name, a, b, lora_cfg["rank"], shape, what)  # each HF module's rows
        if any(not torch.equal(a, a_list[0]) for a in a_list[1:]):
            target = path.rsplit(".", 1)[-1]
            raise PeftAdapterError(
                f"{what}: {' and '.join(names)} have different lora_A: megatron fuses them into one "
                f"{target} adapter, which needs one shared A (train them with a shared A, or leave them out)"
            )
        full[path + ".lora_A.weight"] = a_list[0].clone()
        full[path + ".lora_B.weight"] = mapping.to_mcore(b_list, cfg).clone()
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
