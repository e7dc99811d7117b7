"""Load what decoding needs from a model directory: the reference model, its tokenizer, the special ids.

A directory is either a Hugging Face LLaDA2 dir (config.json + safetensors) or a megadiff
megatron-core checkpoint (it has `latest_checkpointed_iteration.txt` or `megadiff.json`); both load
into the plain-PyTorch reference model, which is what the sampler runs (the reference model needs
transformers, so this module imports it).
"""

from __future__ import annotations

import os

import torch

from megadiff.checkpoint.format import read_meta, resolve_checkpoint_dir
from megadiff.checkpoint.hf_source import recorded_source_dir
from megadiff.checkpoint.hf_tensors import inspect_mcore_input, iter_hf_tensors, plan_hf_output
from megadiff.errors import CheckpointError
from megadiff.hf.checkpoint_reader import read_hf_config
from megadiff.hf.reference import build_reference_model, family_of, load_reference_model, materialize
from megadiff.hf.tokenizer import TOKENIZER_FILES, load_local_tokenizer
from megadiff.platform.device import run_device
from megadiff.platform.kernels import grouped_mm_supported

MCORE_MARKERS = ("latest_checkpointed_iteration.txt", "megadiff.json")
MOE_EXPERTS = ("auto", "te", "grouped", "sequential")  # the trainer's perf.moe_experts choices


def is_mcore_checkpoint(path: str) -> bool:
    """True when `path` is a megadiff megatron-core checkpoint directory."""
    return any(os.path.isfile(os.path.join(path, name)) for name in MCORE_MARKERS)


def check_model_dir(path: str) -> None:
    """Raise FileNotFoundError naming `path` when it is not a directory."""
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"{path}: model directory not found (expected a Hugging Face model dir with config.json "
            f"or a megadiff megatron-core checkpoint dir)"
        )


def model_config(path: str, iteration: int | None = None) -> dict:
    """The HF config of the model in `path` (config.json of an HF dir, the config recorded in a
    megadiff checkpoint), read without loading any weight: what the prompts are checked against."""
    check_model_dir(path)
    if not is_mcore_checkpoint(path):
        return read_hf_config(path)
    ckpt_dir = resolve_checkpoint_dir(path, iteration)
    config = read_meta(ckpt_dir).get("hf_config")
    if not isinstance(config, dict):
        raise CheckpointError(f"{ckpt_dir}/megadiff.json: 'hf_config' missing")
    return config


def load_model(
    path: str,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    iteration: int | None = None,
    trust_checkpoint: bool = False,
    moe_experts: str = "auto",
):
    """The reference model (eval mode) of the model family that config.json names, from an HF dir or
    an mcore checkpoint dir; `model.hf_config` is that config (build_reference_model). An mcore checkpoint is read without
    running code from its pickles unless `trust_checkpoint` (megadiff.checkpoint.untrusted).
    `moe_experts`: how LLaDA2's routed experts run (`batched_experts`)."""
    check_model_dir(path)
    batched = batched_experts(moe_experts, device, dtype)  # before any weight is read
    if is_mcore_checkpoint(path):
        model = load_reference_from_mcore(path, iteration=iteration, dtype=dtype, trust_checkpoint=trust_checkpoint)
    else:
        model = load_reference_model(path, dtype=dtype)
    for _, block in model.moe_blocks() if hasattr(model, "moe_blocks") else ():
        if hasattr(block, "batched_experts"):  # LLaDA2's reference; the others have one expert loop
            block.batched_experts = batched
    return model.to(device).eval()


def batched_experts(moe_experts: str, device: str, dtype: torch.dtype) -> bool:
    """The reference model's `batched_experts` for the trainer-style choice `moe_experts` (decoding runs
    without gradients): grouped = batched on torch._grouped_mm, refused where it does not run;
    auto = batched (torch._grouped_mm, or a gathered bmm where it does not run; no host sync either
    way); sequential = one expert at a time; te does not exist outside megatron-core."""
    flag = "--moe-experts"
    if moe_experts not in MOE_EXPERTS:
        raise ValueError(f"{flag} {moe_experts}: choose one of {', '.join(MOE_EXPERTS)}")
    if moe_experts == "te":
        raise ValueError(
            f"{flag} te: decoding runs the plain-PyTorch reference model, which has no Transformer Engine "
            f"experts; use auto, grouped or sequential"
        )
    if moe_experts == "grouped" and not grouped_mm_supported(dtype, torch.device(device)):
        raise ValueError(
            f"{flag} grouped: torch._grouped_mm (torch {torch.__version__}) does not run on {device} in "
            f"{str(dtype).removeprefix('torch.')}; use auto or sequential"
        )
    return moe_experts != "sequential"


def load_reference_from_mcore(
    ckpt_dir: str, iteration: int | None = None, dtype: torch.dtype = torch.float32, trust_checkpoint: bool = False
):
    """The plain-PyTorch reference model of the checkpoint's family (eval mode) from a megadiff
    checkpoint ROOT (latest complete iteration, or `iteration`) or iteration dir, in this process: no
    torchrun, no process group. Same dtype handling as `megadiff.hf.reference.load_reference_model`."""
    src = inspect_mcore_input(ckpt_dir, iteration, trust_checkpoint)
    with torch.device("meta"):
        model = build_reference_model(src.config)
    state = {name: tensor.to(dtype) for name, tensor in iter_hf_tensors(src, plan_hf_output(src))}
    return materialize(model, state, src.ckpt_dir).to(dtype).eval()


def load_tokenizer(model_path: str, tokenizer_path: str | None = None, iteration: int | None = None):
    """The tokenizer in `tokenizer_path`, else the one stored next to the model; an mcore checkpoint
    holds none, so there it is the one of the HF dir the checkpoint was converted from (recorded as
    `hf_source_dir` in its megadiff.json), if that dir's config.json still matches the checkpoint's
    (a received checkpoint could name any directory)."""
    note = ""
    if tokenizer_path:
        candidates = [tokenizer_path]
    else:
        candidates = [model_path]
        if is_mcore_checkpoint(model_path):
            source, why = recorded_source_dir(read_meta(resolve_checkpoint_dir(model_path, iteration)))
            candidates += [source] if source else []
            note = "" if source else f" ({why})"
    for path in candidates:
        if os.path.isdir(path) and any(os.path.isfile(os.path.join(path, f)) for f in TOKENIZER_FILES):
            return load_local_tokenizer(path)  # never runs code from the dir
    hint = "" if tokenizer_path else "; pass --tokenizer DIR"
    raise FileNotFoundError(f"{' or '.join(candidates)}: no tokenizer files ({', '.join(TOKENIZER_FILES)}){note}{hint}")


def special_token_ids(model, tokenizer, mask_id: int | None = None, eos_id: int | None = None) -> tuple[int, int]:
    """(mask_id, eos_id): overrides first, else the mask token of the model family's tokenizer facts
    (LLaDA2 `<|mask|>`, LLaDA `<|mdm_mask|>`) from the tokenizer, else config.json's mask_token_id,
    else the family's released id; eos from the config, else the tokenizer's. `model`: the model
    (`load_model`'s), or its HF config dict (`model_config`: the ids are known before the weights are
    loaded)."""
    config = model if isinstance(model, dict) else hf_config_of(model)
    facts = family_of(config).tokenizer
    if mask_id is None:
        mask_id = config.get("mask_token_id")  # recorded where the tokenizer has none (Ling-2.0 start)
        vocab = tokenizer.get_vocab() if tokenizer is not None else {}
        if facts.mask_token in vocab:
            mask_id = vocab[facts.mask_token]
        if mask_id is None:
            mask_id = facts.mask_token_id
        if mask_id is None:
            where = f"tokenizer {getattr(tokenizer, 'name_or_path', '')}" if tokenizer is not None else "no tokenizer"
            raise ValueError(
                f"{where}: no {facts.mask_token!r} token, and config.json has no mask_token_id; "
                f"pass the mask token id explicitly"
            )
    if eos_id is None:
        eos_id = config.get("eos_token_id")
        if isinstance(eos_id, (list, tuple)):
            eos_id = eos_id[0] if eos_id else None
        if eos_id is None and tokenizer is not None:
            eos_id = tokenizer.eos_token_id
        if eos_id is None:
            raise ValueError("neither config.json nor the tokenizer names an eos token; pass the eos id explicitly")
    return int(mask_id), int(eos_id)


def hf_config_of(model) -> dict:
    """The HF config dict of a reference model: what `load_model` recorded, else the config's own
    (LLaDA2's transformers config; the families' `to_hf_dict`)."""
    recorded = getattr(model, "hf_config", None)
    if isinstance(recorded, dict):
        return recorded
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        return config.to_dict()
    return model.cfg.to_hf_dict()


def check_device(device: str) -> None:
    """Raise ValueError, in one line, when `device` cannot be used here (before anything is loaded)."""
    try:
        torch_device = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device}: not a device; use cpu or cuda[:i]") from None
    if torch_device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"--device {device}: CUDA is not available on this machine "
                f"(torch {torch.__version__}); use --device cpu"
            )
        if torch_device.index is not None and torch_device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")


def default_device() -> str:
    """The run device (megadiff.platform.device): cuda:LOCAL_RANK on a GPU, else cpu."""
    return str(run_device())


def parse_dtype(name: str, device: str) -> torch.dtype:
    """'auto' is bfloat16 on GPU (as LLaDA2 ships) and float32 on CPU."""
    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in dtypes:
        raise ValueError(f"dtype {name!r} is not one of auto, {', '.join(dtypes)}")
    return dtypes[name]
