"""Build, load and save the plain-PyTorch reference model (HF names) of any model family: megadiff's
oracle, and the model the sampler runs.

The family comes from config.json's `model_type` (megadiff.models.registry); the model, its tensor
names and the layouts its HF dirs come in from the family object (`build_reference`, `mapping`,
`hf_format`). LLaDA2 dirs also carry megadiff's remote code (write_hf_config, copy_remote_code,
save_reference_model), whose classes are registered with transformers' Auto classes on import.
"""

import json
import os
import shutil

import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from megadiff.errors import CheckpointError
from megadiff.hf.checkpoint_reader import HFCheckpointReader, check_tensors_match, read_hf_config
from megadiff.hf.remote_code import AUTO_MAP, REMOTE_CODE_FILES, remote_code_source
from megadiff.models.registry import family, family_for_config


def register_with_transformers() -> None:
    """Let AutoConfig / AutoModel / AutoModelForCausalLM load llada2_moe dirs without remote code."""
    from megadiff.hf import LLaDA2MoeConfig, LLaDA2MoeModelLM  # LLaDA2's remote code (megadiff.hf.__getattr__)

    try:
        AutoConfig.register("llada2_moe", LLaDA2MoeConfig)
        AutoModel.register(LLaDA2MoeConfig, LLaDA2MoeModelLM)
        AutoModelForCausalLM.register(LLaDA2MoeConfig, LLaDA2MoeModelLM)
    except ValueError:  # already registered in this process
        pass


def family_of(cfg: dict, source: str = "config.json"):
    """The model family of HF config fields `cfg` (registry.family_for_config); fields without a
    `model_type` are LLaDA2's, as every config was before there were families."""
    return family_for_config(cfg, source) if "model_type" in cfg else family("llada2")


def build_reference_model(cfg: dict, seed: int | None = None, dtype=torch.float32):
    """The reference model of HF config fields `cfg`, of its family (eval mode). With `seed`, every
    weight is random and non-trivial (norms away from 1, expert biases non-zero), so a test that
    ignores one fails. `model.hf_config` is a copy of `cfg` (what the sampler's tools read the
    family and the special token ids from)."""
    model = family_of(cfg).build_reference(cfg, seed=seed).to(dtype).eval()
    model.hf_config = dict(cfg)
    return model


def materialize(model, state: dict, where: str):
    """Fill a reference model built on the meta device with `state` (HF name -> tensor); RoPE
    tables that are not stored (LLaDA2's inv_freq) are recomputed. Raise naming `where` when a
    tensor is not one of the model's or one of the model's is left unloaded."""
    result = model.load_state_dict(state, strict=False, assign=True)
    if result.unexpected_keys:
        raise CheckpointError(f"{where}: '{result.unexpected_keys[0]}' is not a reference model parameter")
    for module in model.modules():
        if hasattr(module, "inv_freq"):
            module.inv_freq = type(module)(model.config).inv_freq
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise CheckpointError(f"{where}: reference tensor '{left[0]}' was not loaded ({len(left)} in all)")
    return model


def load_reference_model(hf_dir: str, dtype=torch.float32):
    """The reference model of the HF dir `hf_dir` (eval mode), of the family its config.json names.
    Loaded strictly: a missing, extra or misshapen tensor is an error, found before any is read.
    The family's dir layouts are read through its hf_format (LLaDA2: routed experts split, as
    released, or merged, dFactory's training layout, read one expert slice at a time)."""
    source = os.path.join(hf_dir, "config.json")
    cfg = read_hf_config(hf_dir)
    model_family = family_of(cfg, source)
    model_cfg = model_family.config_from_hf(cfg, source)  # refuses what the family does not support
    reader = HFCheckpointReader(hf_dir)
    fmt = model_family.hf_format
    names = reader.names()
    expected = fmt.expected_shapes(model_family, cfg, names, hf_dir)
    check_tensors_match(reader, expected, ignore=fmt.unused_tensors(cfg, names))
    with torch.device("meta"):
        model = build_reference_model(cfg)
    get = fmt.tensor_getter(reader, hf_dir)
    # copies: a tensor read from a safetensors file may sit at any byte offset, and kernels on unaligned
    # memory can round differently (the loaded model must compute exactly what the saved one did)
    state = {name: get(name).to(dtype, copy=True) for name in model_family.mapping.expected_hf_shapes(model_cfg)}
    return materialize(model, state, hf_dir).to(dtype).eval()


def write_hf_config(cfg: dict, out_dir: str) -> None:
    """config.json with the remote-code `auto_map`, as real LLaDA2 downloads have it."""
    cfg = dict(cfg, auto_map=AUTO_MAP)
    cfg.setdefault("architectures", ["LLaDA2MoeModelLM"])
    cfg["model_type"] = "llada2_moe"
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)


def copy_remote_code(out_dir: str, source_dir: str | None = None) -> None:
    """Copy the remote-code files (REMOTE_CODE_FILES) next to the weights (from source_dir if it has them)."""
    for name in REMOTE_CODE_FILES:
        src = os.path.join(source_dir, name) if source_dir else None
        if not src or not os.path.isfile(src):
            src = remote_code_source(name)
        shutil.copyfile(src, os.path.join(out_dir, name))


def save_reference_model(model, out_dir: str, max_shard_size: str = "5GB") -> None:
    """save_pretrained (safetensors, sharded when large) + config.json with auto_map + remote code."""
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True, max_shard_size=max_shard_size)
    cfg = model.config.to_dict()
    for key in ("transformers_version", "_name_or_path", "auto_map"):
        cfg.pop(key, None)
    write_hf_config(cfg, out_dir)
    copy_remote_code(out_dir)


register_with_transformers()  # any code that builds the reference model can also load HF dirs by Auto class
