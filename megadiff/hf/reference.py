"""Build, load and save the plain-PyTorch reference model (HF names) used as megadiff's oracle."""

import json
import os
import shutil

import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from megadiff.hf.checkpoint_reader import HFCheckpointReader, check_tensors_match, read_hf_config
from megadiff.hf.remote_code import AUTO_MAP, REMOTE_CODE_FILES, remote_code_source
from megadiff.models.llada2.config import LLaDA2ModelConfig
from megadiff.models.llada2.configuration_llada2_moe import LLaDA2MoeConfig
from megadiff.models.llada2.hf_experts import SPLIT, detect_expert_format, expected_shapes, split_tensor_getter
from megadiff.models.llada2.hf_mapping import expected_hf_shapes
from megadiff.models.llada2.modeling_llada2_moe import LLaDA2MoeModelLM
from megadiff.models.llada2.reference import build_reference_model


def register_with_transformers() -> None:
    """Let AutoConfig / AutoModel / AutoModelForCausalLM load llada2_moe dirs without remote code."""
    try:
        AutoConfig.register("llada2_moe", LLaDA2MoeConfig)
        AutoModel.register(LLaDA2MoeConfig, LLaDA2MoeModelLM)
        AutoModelForCausalLM.register(LLaDA2MoeConfig, LLaDA2MoeModelLM)
    except ValueError:  # already registered in this process
        pass


def load_reference_model(hf_dir: str, dtype=torch.float32) -> LLaDA2MoeModelLM:
    """Load config.json + safetensors strictly: a missing, extra or misshapen tensor is an error.
    Routed experts may be split (released checkpoints) or merged (dFactory's training layout, what
    `moe_convertor --mode merge` writes): a merged tensor is read one expert slice at a time."""
    cfg = read_hf_config(hf_dir)
    LLaDA2ModelConfig.from_hf_dict(cfg, source=os.path.join(hf_dir, "config.json"))
    reader = HFCheckpointReader(hf_dir)
    expert_format = detect_expert_format(reader.names(), hf_dir)
    check_tensors_match(reader, expected_shapes(cfg, expert_format or SPLIT))
    with torch.device("meta"):
        model = build_reference_model(cfg)
    model = model.to_empty(device="cpu")
    get = split_tensor_getter(reader, expert_format)
    state = {name: get(name).to(dtype) for name in expected_hf_shapes(cfg)}
    for name, buf in model.named_buffers():
        if name.endswith("inv_freq"):
            state[name] = buf  # recomputed below
    model.load_state_dict(state, strict=False)
    for module in model.modules():
        if hasattr(module, "inv_freq"):
            module.inv_freq.copy_(type(module)(model.config).inv_freq)
    for _, block in model.moe_blocks():  # the router bias always stays fp32
        block.gate.expert_bias.data = block.gate.expert_bias.data.float()
    return model.to(dtype).eval() if dtype != torch.float32 else model.eval()


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


def save_reference_model(model: LLaDA2MoeModelLM, out_dir: str, max_shard_size: str = "5GB") -> None:
    """save_pretrained (safetensors, sharded when large) + config.json with auto_map + remote code."""
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True, max_shard_size=max_shard_size)
    cfg = model.config.to_dict()
    for key in ("transformers_version", "_name_or_path", "auto_map"):
        cfg.pop(key, None)
    write_hf_config(cfg, out_dir)
    copy_remote_code(out_dir)


register_with_transformers()  # any code that builds the reference model can also load HF dirs by Auto class
