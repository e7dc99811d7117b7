"""Exports of an adapter-only LoRA checkpoint: merged HF weights, or a Hugging Face PEFT adapter.

A LoRA checkpoint holds the adapters and records its base (an HF model dir or a megatron
checkpoint; megadiff.lora.adapter_checkpoint). `export_lora_checkpoint` writes either

- the merged model, W + alpha/r * B @ A, as a normal HF dir: an mcore base goes through
  `convert_mcore_to_hf` with the adapters' deltas added to the tensors they change (megadiff.lora.merge);
  an HF base is copied tensor by tensor with those deltas added, in its own expert layout (its
  tokenizer, generation config, chat template and remote code copied as from a template), or
- the PEFT adapter (adapter_config.json + adapter_model.safetensors, megadiff.lora.peft_format), which
  `peft.PeftModel.from_pretrained` loads onto the base model in HF form.
"""

import os
from collections.abc import Callable

import torch

from megadiff.checkpoint import format as fmt
from megadiff.errors import CheckpointError
from megadiff.files.outputs import overlap
from megadiff.hf.checkpoint_reader import HFCheckpointReader, read_hf_config
from megadiff.lora.adapter_checkpoint import read_lora_checkpoint
from megadiff.lora.base_record import record_at
from megadiff.lora.merge import hf_deltas
from megadiff.lora.peft_format import to_peft, write_peft_adapter
from megadiff.models.registry import family_for_config

from .hf_template import copy_template_files
from .mcore_to_hf import convert_mcore_to_hf, with_deltas
from .output_dir import check_output_dir, foreign_code_note, staged_output, write_output_config
from .safetensors_stream import DTYPE_CODES, parse_size, write_sharded_safetensors_plain

_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}


def base_hf_config(base_dir: str, base_kind: str) -> dict:
    """The HF config of the base model (config.json of an HF base; the recorded one of an mcore base)."""
    if base_kind == "hf":
        return read_hf_config(base_dir)
    config = fmt.read_meta(base_dir).get("hf_config")
    if not isinstance(config, dict):
        raise CheckpointError(f"{base_dir}/{fmt.META_NAME}: 'hf_config' missing")
    return config


def merge_into_hf_dir(
    base_dir: str,
    output: str,
    deltas: dict[str, torch.Tensor],
    max_shard_size="5GB",
    overwrite: bool = False,
    log: Callable[[str], None] = print,
    hf_template: str | None = None,
) -> str:
    """A copy of the HF dir `base_dir` at `output` with `deltas` added to their tensors (fp64 sum,
    the tensor's dtype kept); tokenizer, generation config, chat template and remote code copied
    from `hf_template` (default `base_dir`), allow-listed files only (hf_template.py)."""
    reader = HFCheckpointReader(base_dir)
    names = reader.names()
    missing = sorted(set(deltas) - set(names))
    if missing:
        raise CheckpointError(
            f"{base_dir}: has no tensor '{missing[0]}' that the LoRA adapters change (an expert layout or "
            f"a model other than the adapters' base?)"
        )
    template = hf_template or base_dir
    if not os.path.isdir(template):
        raise CheckpointError(f"{template}: --hf-template directory not found")
    output = check_output_dir(output, overwrite, inputs=[base_dir, template], log=log, kind="hf")
    entries = [(n, reader.shape(n), _DTYPES[reader.dtype_str(n)]) for n in names]
    values = with_deltas(((name, reader.get(name)) for name in names), deltas)
    with staged_output(output, overwrite=overwrite) as staging:
        write_sharded_safetensors_plain(staging, entries, parse_size(max_shard_size), values)
        config = read_hf_config(base_dir)
        copied, _ = copy_template_files(template, staging, config)
        dropped, _ = write_output_config(staging, config)
    if dropped:
        log(foreign_code_note(dropped))
    log(
        f"merged {len(deltas)} adapted tensors into a copy of {base_dir}; from {template}: {', '.join(copied) or 'none'}"
    )
    return output


def export_lora_checkpoint(
    ckpt: str,
    output: str | None = None,
    peft_adapter: str | None = None,
    iteration: int | None = None,
    base_dir: str | None = None,
    merged_experts: bool = False,
    log: Callable[[str], None] = print,
    trust_checkpoint: bool = False,
    **convert_kwargs,
) -> str:
    """Write the merged HF model at `output`, or (with `peft_adapter`) the PEFT adapter there, from
    the adapter-only checkpoint `ckpt` (root or iteration dir). `base_dir`: the base's new place when
    it moved (its fingerprint must still match). Returns the directory written."""
    lora = read_lora_checkpoint(fmt.resolve_checkpoint_dir(ckpt, iteration), base_dir, trust=trust_checkpoint)
    hf_config = base_hf_config(lora.base_dir, lora.base_kind)
    log(
        f"LoRA checkpoint {ckpt}: rank {lora.lora_config['rank']}, alpha {lora.lora_config['alpha']}, "
        f"targets {lora.lora_config['target_modules']}, experts {bool(lora.lora_config.get('experts'))}; "
        f"base {lora.base_dir} ({lora.base_kind})"
    )
    if peft_adapter:
        for source in (fmt.resolve_checkpoint_dir(ckpt, iteration), lora.base_dir):
            if overlap(peft_adapter, source):
                raise CheckpointError(
                    f"{os.path.abspath(peft_adapter)}: --peft-adapter {overlap(peft_adapter, source)} the input "
                    f"{source}; an export never writes over or into its inputs, so choose another directory"
                )
        state, adapter_config = to_peft(lora.adapters, lora.lora_config, hf_config, lora.base_dir)
        base = record_at(lora.base_kind, lora.base_dir)  # checked against the recorded one by the reader
        out = write_peft_adapter(peft_adapter, state, adapter_config, base=base.to_dict())
        log(f"PEFT adapter for the base {lora.base_dir} written to {out} ({len(state)} tensors)")
        return out
    if output is None:
        raise CheckpointError("--output OUT (the merged model) or --peft-adapter DIR is required")
    if lora.base_kind == "mcore":
        deltas = hf_deltas(lora.adapters, lora.lora_config, hf_config, merged_experts=merged_experts)
        return convert_mcore_to_hf(
            lora.base_dir,
            output,
            merged_experts=merged_experts,
            log=log,
            trust_checkpoint=trust_checkpoint,
            deltas=deltas,
            **convert_kwargs,
        )
    if merged_experts:
        raise CheckpointError(f"{lora.base_dir}: --merged-experts is for megatron bases; an HF base keeps its layout")
    experts = family_for_config(hf_config, lora.base_dir).hf_format.experts
    names = HFCheckpointReader(lora.base_dir).names()
    base_merged = experts is not None and experts.detect_expert_format(names, lora.base_dir) == experts.MERGED
    deltas = hf_deltas(lora.adapters, lora.lora_config, hf_config, merged_experts=base_merged)
    keep = {k: v for k, v in convert_kwargs.items() if k in ("max_shard_size", "overwrite", "hf_template")}
    return merge_into_hf_dir(lora.base_dir, output, deltas, log=log, **keep)
