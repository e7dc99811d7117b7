"""The oracle side of LoRA tests: a model family's plain-PyTorch reference model (HF names)
carrying adapters two independent ways, and random adapters to put on it.

- `merged_reference`: the reference with W + alpha/r * B @ A merged into its weights, computed in
  megatron's layout and mapped to HF by the family's mapping objects (no PEFT, no megadiff LoRA code).
- `peft_reference`: the reference with a PEFT adapter loaded by `peft` itself (its LoraModel).
"""

import torch

from megadiff.hf.reference import load_reference_model
from megadiff.lora.peft_format import adapted_modules, hf_modules, model_config
from megadiff.models.registry import family_for_config


def random_full_adapter(lora_cfg: dict, hf_config: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """A full adapter state (megatron names and row layout) with random, non-zero A and B."""
    cfg = model_config(hf_config)
    g = torch.Generator().manual_seed(seed)
    reference = load_shapes(hf_config)
    full = {}
    for path in adapted_modules(lora_cfg, cfg):
        out, inp = reference[path]
        full[path + ".lora_A.weight"] = torch.randn(lora_cfg["rank"], inp, generator=g) / inp**0.5
        full[path + ".lora_B.weight"] = torch.randn(out, lora_cfg["rank"], generator=g) * 0.3
    return full


def load_shapes(hf_config: dict) -> dict[str, tuple[int, int]]:
    """[out, in] of every adaptable megatron-core linear, from the reference model's own weights."""
    cfg = model_config(hf_config)
    with torch.device("meta"):
        model = family_for_config(hf_config).build_reference(hf_config)
    weights = dict(model.named_parameters())
    every = dict(target_modules=["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"], experts=True)
    shapes = {}
    for path in adapted_modules(every, cfg):
        mapping, names = hf_modules(path, cfg)
        full = mapping.to_mcore([weights[n + ".weight"] for n in names], cfg)
        shapes[path] = tuple(full.shape)
    return shapes


def load_reference(hf_dir: str):
    """The family's fp32 reference model with the weights of `hf_dir` (every tensor, strictly)."""
    return load_reference_model(hf_dir)


def merged_reference(hf_dir: str, full: dict[str, torch.Tensor], lora_cfg: dict, hf_config: dict):
    """The reference model from `hf_dir` with every adapter merged: W + alpha/r * B @ A."""
    cfg = model_config(hf_config)
    model = load_reference(hf_dir)
    params = dict(model.named_parameters())
    scale = lora_cfg["alpha"] / lora_cfg["rank"]
    with torch.no_grad():
        for path in adapted_modules(lora_cfg, cfg):
            mapping, names = hf_modules(path, cfg)
            w = mapping.to_mcore([params[n + ".weight"] for n in names], cfg)
            merged = w + scale * full[path + ".lora_B.weight"] @ full[path + ".lora_A.weight"]
            for name, tensor in zip(names, mapping.to_hf(merged, cfg), strict=True):
                params[name + ".weight"].copy_(tensor)
    return model


def peft_reference(hf_dir: str, adapter_dir: str):
    """The reference model from `hf_dir` with the PEFT adapter in `adapter_dir`, loaded by peft.
    The model is used as a user would (the remote code's default expert path). Checks that peft put an adapter on exactly the modules the
    adapter file has, so nothing is skipped or added silently. A family whose reference is a plain
    torch module (no HF generation API) gets a task-less PeftModel, the same LoRA layers."""
    from peft import PeftConfig, PeftModel
    from safetensors import safe_open

    model = load_reference(hf_dir)
    config = PeftConfig.from_pretrained(adapter_dir)
    if not hasattr(model, "prepare_inputs_for_generation"):
        config.task_type = None  # PeftModelForCausalLM needs HF's generation API
    peft_model = PeftModel.from_pretrained(model, adapter_dir, config=config).eval()
    with safe_open(f"{adapter_dir}/adapter_model.safetensors", "pt") as f:
        in_file = {k[len("base_model.model.") : -len(".lora_A.weight")] for k in f.keys() if ".lora_A." in k}
    adapted = {
        name[len("base_model.model.") :]
        for name, module in peft_model.named_modules()
        if hasattr(module, "lora_A") and "default" in module.lora_A
    }
    assert adapted == in_file, (sorted(adapted - in_file)[:4], sorted(in_file - adapted)[:4])
    return peft_model


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want|. Merged weights (x (W + s B A)) and peft's separate path
    (x W + s (x A) B) round differently in fp32; the gap scales with the logits (~1e-5 absolute on
    logits of magnitude ~2 with peft 0.21), so the bound is relative."""
    return float((got - want).abs().max() / want.abs().max())
