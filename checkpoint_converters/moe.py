"""Merge or split the routed experts of an HF LLaDA2 checkpoint (dFactory's moe_convertor, streaming).

merge: model.layers.i.mlp.experts.e.{gate,up,down}_proj.weight (one tensor per expert)
       -> model.layers.i.mlp.experts.{gate,up,down}_proj (experts stacked on dim 0)
split: the reverse. Every other tensor is copied unchanged (name, dtype, bytes), and so are the
non-weight files (config, tokenizer, remote code, generation config). Every output tensor is input
bytes in another order: with `--io plain` (the default) each is read with safe_open (a merged
tensor stacked from its experts: memory one merged tensor) and written with ordinary writes; with
`--io fast` nothing is read into memory: each is described as byte ranges of the input files and
copied file to file in the kernel (byte_spans), at the speed of a file copy. LLaDA2 only (the
family's `hf_format.experts`); other families' checkpoints have one expert layout.
"""

import os
import time
from collections.abc import Callable, Iterator

import torch

from megadiff.checkpoint.bytecopy.byte_spans import Spans, concat_spans
from megadiff.errors import CheckpointError
from megadiff.hf.checkpoint_reader import SAFETENSORS_DTYPES, HFCheckpointReader, check_tensors_match, read_hf_config
from megadiff.models.registry import family_for_config

from .hf_direct import DirectHFReader
from .output_dir import (
    check_output_dir,
    copy_non_weight_files,
    drop_foreign_code_files,
    foreign_code_note,
    staged_output,
)
from .report import data_phase_line
from .safetensors_stream import parse_size, write_sharded_safetensors

SPLIT, MERGED = "split", "merged"
MODES = {"merge": (SPLIT, MERGED), "split": (MERGED, SPLIT)}


def _dtype(reader: HFCheckpointReader, name: str) -> torch.dtype:
    code = reader.dtype_str(name)
    if code not in SAFETENSORS_DTYPES:
        raise CheckpointError(
            f"{os.path.join(reader.hf_dir, reader.file_of(name))}: tensor '{name}' has unsupported dtype {code}"
        )
    return SAFETENSORS_DTYPES[code]


def convert_expert_layout(
    input_path: str,
    output_path: str,
    mode: str,
    max_shard_size="5GB",
    overwrite: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
    io_mode: str = "plain",
) -> str:
    """Write OUTPUT with the experts of INPUT merged (mode='merge') or split (mode='split');
    `io_mode`: 'plain' (tensors read with safe_open, a merged tensor stacked in memory, written
    with ordinary writes) or how the byte-copy engine copies ('fast' = 'direct', or 'page-cache',
    see span_copy)."""
    io_mode = "direct" if io_mode == "fast" else io_mode
    if mode not in MODES:
        raise ValueError(f"--mode {mode!r}: choose merge or split")
    want_in, want_out = MODES[mode]
    input_path = os.path.abspath(input_path)
    config = read_hf_config(input_path)
    source = os.path.join(input_path, "config.json")
    family = family_for_config(config, source)
    model = family.config_from_hf(config, source=source)
    layouts = family.hf_format.experts  # the expert-layout functions (LLaDA2: hf_experts)
    if layouts is None:
        raise CheckpointError(f"{input_path}: {family.name} checkpoints have one expert layout; nothing to {mode}")
    plain = io_mode == "plain"
    reader = HFCheckpointReader(input_path) if plain else DirectHFReader(input_path)
    fmt = layouts.detect_expert_format(reader.names(), input_path)
    if fmt is None:
        raise CheckpointError(f"{input_path}: no routed-expert tensors; nothing to {mode}")
    if fmt != want_in:
        raise CheckpointError(f"{input_path}: experts are already {fmt}; --mode {mode} needs {want_in} input")
    check_tensors_match(reader, layouts.expected_shapes(config, fmt))
    max_shard_size = parse_size(max_shard_size)
    output_path = check_output_dir(output_path, overwrite, inputs=[input_path], kind="hf")
    experts = model.num_experts

    def source_dtype(name: str) -> torch.dtype:
        parsed = layouts.parse_merged_name(name) if want_out == MERGED else layouts.parse_split_name(name)
        if parsed is None:
            return _dtype(reader, name)
        if want_out == SPLIT:
            return _dtype(reader, layouts.merged_name(parsed[0], parsed[2]))
        layer, proj = parsed
        dtypes = {_dtype(reader, layouts.split_name(layer, e, proj)) for e in range(experts)}
        if len(dtypes) > 1:
            raise CheckpointError(f"{input_path}: experts of layer {layer} {proj} have different dtypes {dtypes}")
        return dtypes.pop()

    entries = [(n, tuple(s), source_dtype(n)) for n, s in layouts.expected_shapes(config, want_out).items()]

    def plain_tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for name, _, _ in entries:
            if want_out == MERGED and layouts.parse_merged_name(name):
                layer, proj = layouts.parse_merged_name(name)
                yield name, torch.stack([reader.get(layouts.split_name(layer, e, proj)) for e in range(experts)])
            elif want_out == SPLIT and layouts.parse_split_name(name):
                layer, e, proj = layouts.parse_split_name(name)
                yield name, reader.get_index(layouts.merged_name(layer, proj), e)
            else:
                yield name, reader.get(name)

    def tensors() -> Iterator[tuple[str, Spans]]:
        for name, shape, dtype in entries:
            if want_out == MERGED and layouts.parse_merged_name(name):
                layer, proj = layouts.parse_merged_name(name)
                yield (
                    name,
                    concat_spans(
                        [reader.spans(layouts.split_name(layer, e, proj)) for e in range(experts)], shape, dtype
                    ),
                )
            elif want_out == SPLIT and layouts.parse_split_name(name):
                layer, e, proj = layouts.parse_split_name(name)
                yield name, reader.spans(layouts.merged_name(layer, proj), e)
            else:
                yield name, reader.spans(name)

    log(f"{mode}: {input_path} ({fmt} experts) -> {output_path} ({len(entries)} tensors)")
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(
            total=sum(reader.nbytes(n) for n in reader.names()),
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=f"moe {mode}",
            dynamic_ncols=True,
        )
    started = time.perf_counter()
    try:
        with staged_output(output_path, overwrite=overwrite) as staging:
            writer = write_sharded_safetensors(
                staging,
                entries,
                max_shard_size,
                plain_tensors() if plain else tensors(),
                bar.update if bar else None,
                io_mode,
            )
            copied = copy_non_weight_files(input_path, staging)
            dropped, _ = drop_foreign_code_files(staging)
    finally:
        if bar is not None:
            bar.close()
    log(f"copied {', '.join(copied) or 'no other files'}")
    if dropped:
        log(foreign_code_note(dropped))
    log(data_phase_line(writer.total_size, time.perf_counter() - started, copier=None if plain else writer.copier))
    return output_path


__all__ = ["MODES", "convert_expert_layout"]
