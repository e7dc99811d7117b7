"""megadiff megatron checkpoint (converted or trained, any layout) -> HF directory of its model family.

Reads with torch DCP alone (megadiff.checkpoint.hf_tensors): no megatron-core, no process group,
plain single process. An HF tensor whose bytes are stored rows in some order (the same dtype,
the last dim not split over TP: every tensor of a checkpoint saved at TP=1) is copied file to file
by megadiff.checkpoint.bytecopy without being read. Others are read a few at a time (a layer's
non-expert weights, a slab of experts bounded by `budget_bytes`) and written progressively, so
memory stays bounded by the largest tensor plus the budget whatever the model size. Optimizer state
and other keys in a training checkpoint are ignored. That is `io_mode="fast"`; with "plain" (the
default) every tensor is read with torch DCP's public `load` and its bytes appended to its shard
(safetensors_stream.PlainFiles): the same bounded memory, public APIs only (io_paths).

- `convert_mcore_to_hf`: a complete HF dir (shards + index, config.json, generation_config.json,
  tokenizer and remote code from a template, allow-listed files only: hf_template.py) that `AutoModelForCausalLM.from_pretrained(...,
  trust_remote_code=True)` loads as is; split experts, or dFactory's merged layout.
(The plain-PyTorch reference model in memory from such a checkpoint, for the sampler:
megadiff.inference.loading.load_reference_from_mcore.)
"""

import os
import time
from collections.abc import Callable, Container, Iterator, Sequence

import torch

from megadiff.checkpoint.bytecopy.byte_spans import FileTable, Spans
from megadiff.checkpoint.format import TRAINING_RECORD, training_record
from megadiff.checkpoint.hf_source import recorded_source_dir
from megadiff.checkpoint.hf_tensors import (
    DEFAULT_BUDGET,
    MERGED,
    SPLIT,
    HFItem,
    McoreInput,
    inspect_mcore_input,
    iter_hf_tensors,
    plan_hf_output,
    regrouped,
)
from megadiff.errors import CheckpointError
from megadiff.hf.remote_code import REMOTE_CODE_FILES, remote_code_source
from megadiff.lora.merge import add_delta

from .hf_template import copy_template_files
from .io_paths import resolve_io
from .output_dir import check_output_dir, foreign_code_note, staged_output, write_json, write_output_config
from .report import data_phase_line
from .safetensors_stream import parse_size, write_sharded_safetensors

_CONFIG_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


def item_spans(src: McoreInput, files: FileTable, item: HFItem) -> Spans | None:
    """Where an output tensor's bytes already are, when they are whole stored rows of its dtype
    (the QKV regroup applied to the row addresses); None when it must be read and computed."""
    if item.dtype != src.reader.dtype(item.key):
        return None
    found = src.reader.box_row_addresses(files, item.key, item.offsets, item.sizes)
    if found is None:
        return None
    addresses, row_bytes = found
    if item.regroup is not None:
        addresses = regrouped(item, addresses, src.model)
    return files.spans(addresses, row_bytes, item.shape, item.dtype)


def iter_hf_tensors_or_spans(
    src: McoreInput, items: Sequence[HFItem], budget_bytes: int = DEFAULT_BUDGET, read: Container[str] = ()
) -> Iterator[tuple[str, "torch.Tensor | Spans"]]:
    """`iter_hf_tensors`, with `Spans` for the items whose bytes can be copied as stored (except
    the names in `read`, always read)."""
    src.reader.read_ahead_record_metadata()  # item_spans parses every record's headers
    files = FileTable()
    return iter_hf_tensors(
        src, items, budget_bytes, stored_bytes=lambda item: None if item.name in read else item_spans(src, files, item)
    )


def with_deltas(values, deltas: dict[str, torch.Tensor]):
    """(name, value) pairs with `deltas[name]` added to those tensors (megadiff.lora.merge.add_delta)."""
    for name, value in values:
        yield name, add_delta(value, deltas[name], name) if name in deltas else value


# ---- HF directory ----------------------------------------------------------------------------------


def _output_config(src: McoreInput, dtype: torch.dtype) -> dict:
    """config.json: the recorded HF config, its dtype field updated when the weights changed dtype."""
    config = dict(src.config)
    name = _CONFIG_DTYPE_NAMES.get(dtype)
    for field in ("torch_dtype", "dtype"):
        if field in config and name and config[field] != name:
            config[field] = name
    return config


def _generation_config(config: dict) -> dict:
    out = {"_from_model_config": True}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if config.get(key) is not None:
            out[key] = config[key]
    return out


def _same_as_megadiff_code(path: str) -> bool:
    """True when a remote-code file equals megadiff's own file of that name."""
    name = os.path.basename(path)
    if name not in REMOTE_CODE_FILES:
        return False
    with open(path, "rb") as a, open(remote_code_source(name), "rb") as b:
        return a.read() == b.read()


def convert_mcore_to_hf(
    mcore_dir: str,
    output: str,
    iteration: int | None = None,
    hf_template: str | None = None,
    merged_experts: bool = False,
    max_shard_size="5GB",
    overwrite: bool = False,
    progress: bool = True,
    budget_bytes: int = DEFAULT_BUDGET,
    log: Callable[[str], None] = print,
    io_mode: str = "plain",
    trust_checkpoint: bool = False,
    deltas: dict | None = None,
) -> str:
    """Write an HF LLaDA2 dir from a checkpoint ROOT (latest complete iteration, or `iteration`) or
    an iteration dir. Tokenizer, generation config, chat template and remote code come from
    `hf_template` (default: the checkpoint's recorded hf_source_dir when its config.json matches
    the checkpoint's; else megadiff's own remote code), allow-listed files only (hf_template.py).
    `io_mode`: 'plain' (default), 'fast', 'direct', 'page-cache' or 'auto' (io_paths). `deltas`: {HF name: tensor}
    added to those weights (a LoRA checkpoint's merged adapters: megadiff.lora.merge.hf_deltas).
    Returns OUTPUT."""
    io_mode = resolve_io(io_mode, log)
    plain = io_mode == "plain"
    src = inspect_mcore_input(mcore_dir, iteration, trust_checkpoint, plain)
    max_shard_size = parse_size(max_shard_size)
    if hf_template and not os.path.isdir(hf_template):
        raise CheckpointError(f"{hf_template}: --hf-template directory not found")
    template, why = (hf_template, "--hf-template") if hf_template else recorded_source_dir(src.meta)
    if template is None:
        log(f"note: {why}; using megadiff's remote code and no tokenizer (--hf-template DIR takes them from DIR)")
    inputs = [src.ckpt_dir] + ([template] if template else [])
    output = check_output_dir(output, overwrite, inputs=inputs, kind="hf")
    items = plan_hf_output(src, MERGED if merged_experts else SPLIT)
    unknown = sorted(set(deltas or ()) - {i.name for i in items})
    if unknown:
        raise CheckpointError(f"{src.ckpt_dir}: has no weight '{unknown[0]}' that the LoRA adapters change")
    entries = [(i.name, i.shape, i.dtype) for i in items]
    weights_dtype = entries[0][2]
    log(
        f"exporting {src.ckpt_dir} (iteration {src.meta['iteration']}, {src.spec} spec, {len(entries)} tensors, "
        f"{'merged' if merged_experts else 'split'} experts) -> {output}, --io {io_mode}"
    )

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(
            total=sum(i.nbytes for i in items),
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc="mcore->hf",
            dynamic_ncols=True,
        )
    started = time.perf_counter()
    try:
        with staged_output(output, overwrite=overwrite) as staging:
            on_value = bar.update if bar else None
            deltas = deltas or {}
            if plain:
                values = with_deltas(iter_hf_tensors(src, items, budget_bytes), deltas)
            else:
                values = with_deltas(iter_hf_tensors_or_spans(src, items, budget_bytes, read=deltas), deltas)
            writer = write_sharded_safetensors(staging, entries, max_shard_size, values, on_value, io_mode)
            config = _output_config(src, weights_dtype)
            copied, left_out = copy_template_files(template, staging, config) if template else ([], [])
            dropped, megadiff_code = write_output_config(staging, config)
            if training_record(src.meta):  # how megadiff trained it (read by generate's editing check)
                write_json(os.path.join(staging, TRAINING_RECORD), training_record(src.meta))
            if "generation_config.json" not in copied:
                write_json(os.path.join(staging, "generation_config.json"), _generation_config(config))
    finally:
        if bar is not None:
            bar.close()
    if template:
        log(f"files from {template} ({why}): {', '.join(copied) or 'none'}")
    if left_out:
        log(
            f"not copied from {template} (not tokenizer, generation config, chat template or remote code "
            f"named in auto_map): {', '.join(left_out)}"
        )
    template_code = [
        name for name in copied if name.endswith(".py") and not _same_as_megadiff_code(os.path.join(output, name))
    ]
    if template_code:
        log(
            f"remote code from {template}, not megadiff's own: {', '.join(template_code)}; "
            f"trust_remote_code=True runs it, so check it before loading the model"
        )
    if megadiff_code:
        log(f"remote code: megadiff's own {', '.join(megadiff_code)}")
    if dropped:
        log(foreign_code_note(dropped))
    copier = None if plain else writer.copier
    log(data_phase_line(writer.total_size, time.perf_counter() - started, copier=copier))
    return output
