"""HF directory of any model family -> megadiff megatron checkpoint (iteration 0).

The family comes from config.json's model_type (megadiff.models.registry); its mapping table
(megadiff.models.common.mapping) names the HF tensors and owns their transform and TP/EP split.
LLaDA2 dirs may hold their routed experts split or merged (dFactory), read through the family's
`hf_format.experts`.

Everything about the input is checked first (config fields, layout divisibility, index and shard
files, tensor names / shapes / dtypes) without megatron-core. Then the model is built on the meta
device (no memory), megatron-core's sharded state dict of it fixes the checkpoint keys and shards,
and each tensor is read from the safetensors, transformed by the parameter table and written when
the writer reaches it. A matrix kept in its dtype and split over TP by rows, if at all (every one
at TP=1), is not read at all: the table's transform runs on its row addresses and the writer
copies those rows file to file in the kernel (byte_spans).

Memory does not grow with the model: the interpreter with megatron-core, the meta model and
sharded state dict (benchmarks/RESULTS.md, "measured in passing"), and about two copies of the
largest tensor (the embedding: 0.64 GB for mini, 1.3 GB for flash, in bf16). Under torchrun every
rank reads whole HF tensors and keeps its shard, so each rank needs that much.

One process saves at layout (1,1,1), which megatron-core's dist_checkpointing reshards on load to
any layout; under torchrun every rank writes its own shards of the requested layout.

`spec` picks whose names the tensors are stored under: "local" (megatron-core's torch modules) or
"te" (Transformer Engine: the MoE layers' pre-MLP norm under its own key). The model is always built
with the local spec (no TE needed here); for "te" its keys are renamed through the parameter table.
The `_extra_state` objects only TE modules have are not written: megadiff's loaders give a TE
model its own (see megadiff.checkpoint.dist). The spec is recorded in megadiff.json.
"""

import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from megadiff.checkpoint.bytecopy.byte_spans import FileTable, RowAddresses
from megadiff.checkpoint.bytecopy.span_copy import SpanCopier
from megadiff.checkpoint.format import DTYPES, dtype_name, layout_dict, new_nonce, remove_tree
from megadiff.errors import CheckpointError, ConfigError
from megadiff.files.disk_space import disk_full_error
from megadiff.hf.checkpoint_reader import HFCheckpointReader, check_tensors_match, read_hf_config
from megadiff.hf.ling import mtp_tensor_names
from megadiff.models.registry import family_for_config
from megadiff.platform.parallel_layout import ParallelLayout

from .hf_direct import DirectHFReader
from .io_paths import resolve_io
from .output_dir import check_output_dir, publish
from .report import data_phase_line

WEIGHT_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
_CONFIG_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class HFInput:
    hf_dir: str
    config: dict
    model: object  # the family's validated config
    reader: HFCheckpointReader  # DirectHFReader for the byte-copy engine
    expert_format: str | None  # "split", "merged" (LLaDA2) or None (no routed experts, or one layout)
    dtype: torch.dtype  # the dtype of the weight matrices
    family: object = None  # megadiff.models.family.ModelFamily (default: from `config`)

    def __post_init__(self):
        if self.family is None:
            self.family = family_for_config(self.config, os.path.join(self.hf_dir, "config.json"))

    def get_hf(self) -> Callable[[str], torch.Tensor]:
        """get(HF name of the mapping table) -> tensor, whatever expert layout the dir has."""
        experts = self.family.hf_format.experts
        return experts.split_tensor_getter(self.reader, self.expert_format) if experts else self.reader.get

    def stored_location(self, name: str) -> tuple[str, int | None]:
        """Where HF tensor `name` is stored: (stored name, index along its dim 0 or None)."""
        experts = self.family.hf_format.experts
        return experts.stored_location(name, self.expert_format) if experts else (name, None)


def inspect_hf_input(hf_dir: str, log: Callable[[str], None] = print, plain: bool = False) -> HFInput:
    """Validate an HF dir of any family without loading any tensor; every error names the file /
    tensor / field (CheckpointError or ConfigError). `plain`: the reader reads with safe_open."""
    hf_dir = os.path.abspath(hf_dir)
    config = read_hf_config(hf_dir)
    source = os.path.join(hf_dir, "config.json")
    family = family_for_config(config, source)
    model = family.config_from_hf(config, source=source)
    # both validate index, missing shards, unreadable / truncated files
    reader = HFCheckpointReader(hf_dir) if plain else DirectHFReader(hf_dir)
    experts = family.hf_format.experts
    if experts is not None:
        fmt = experts.detect_expert_format(reader.names(), hf_dir)
        expected = experts.expected_shapes(config, fmt or experts.SPLIT)
    else:
        fmt, expected = None, family.mapping.expected_hf_shapes(model)
    unused = mtp_tensor_names(config, reader.names())  # an autoregressive Ling-2.0's MTP layers
    check_tensors_match(reader, expected, ignore=unused)
    if unused:
        log(f"note: {len(unused)} multi-token-prediction tensors of {hf_dir} are left out (num_nextn_predict_layers)")
    weight_dtype = None
    for name in reader.names():
        code = reader.dtype_str(name)
        if code not in WEIGHT_DTYPES:
            raise CheckpointError(
                f"{os.path.join(hf_dir, reader.file_of(name))}: tensor '{name}' has dtype {code}; "
                f"{family.name} weights are {'/'.join(WEIGHT_DTYPES)}"
            )
        if name.endswith("expert_bias"):
            continue  # the router bias is kept in fp32 whatever the weights are
        if weight_dtype is None:
            weight_dtype, first = code, name
        elif code != weight_dtype:
            raise CheckpointError(
                f"{os.path.join(hf_dir, reader.file_of(name))}: tensor '{name}' is {code} but "
                f"'{first}' is {weight_dtype}; the weights of one checkpoint must share a dtype"
            )
    dtype = WEIGHT_DTYPES[weight_dtype]
    declared = _CONFIG_DTYPES.get(str(config.get("torch_dtype") or config.get("dtype") or ""))
    if declared is not None and declared != dtype:
        log(f"note: {hf_dir}/config.json declares {declared} but the weights are {dtype}; using the weights' dtype")
    return HFInput(hf_dir, config, model, reader, fmt, dtype, family)


def _materializer(source: HFInput, chunks, params_dtype: torch.dtype, plain: bool = False):
    """(materialize, peek): path in the sharded state dict -> this rank's value of that tensor,
    `RowAddresses` where its rows can be copied as they are in the HF files (never if `plain`),
    else the tensor, read and transformed; and -> those `RowAddresses` or None, reading nothing
    (for read-ahead)."""
    from megatron.core import parallel_state as ps

    from megadiff.checkpoint.dist import model_state_keys, unwrap_model
    from megadiff.models.common.hf_weights import global_name
    from megadiff.models.common.mcore_params import COLS

    table = source.family.mapping
    get_hf = source.get_hf()
    files = FileTable()

    def hf_rows(name: str):
        return source.reader.row_addresses(files, *source.stored_location(name))

    def as_rows(mapping, names, rank, size) -> "RowAddresses | None":
        if plain:
            return None  # every tensor read (safe_open) and written as a tensor
        if mapping.param.split == COLS and size > 1:
            return None  # a column split cuts every row
        parts = [hf_rows(n) for n in names]
        if any(p is None for p in parts):
            return None  # a vector (norm, router bias): small, read it
        if any(p[1] != parts[0][1] or p[2] != params_dtype for p in parts):
            return None  # mixed row widths or a dtype change: compute on the data
        addresses = mapping.shard(mapping.to_mcore([p[0] for p in parts], source.model), rank, size)
        columns = parts[0][1] // torch.empty((), dtype=params_dtype).element_size()
        return RowAddresses(addresses.reshape(-1), parts[0][1], (addresses.shape[0], columns), params_dtype, files)

    modules = dict(zip(model_state_keys(len(chunks)), (unwrap_model(c) for c in chunks), strict=True))
    ep_rank, ep = ps.get_expert_model_parallel_rank(), ps.get_expert_model_parallel_world_size()
    ranks = {
        False: (ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()),
        True: (ps.get_expert_tensor_parallel_rank(), ps.get_expert_tensor_parallel_world_size()),
    }

    def locate(path: str):
        state_key, local_name = path.split(".", 1)
        name = global_name(modules[state_key], local_name, ep_rank, source.model.num_experts // ep)
        mapping, index = table.for_mcore_name(name)
        return mapping, mapping.hf_names(index), ranks[mapping.expert]

    def peek(path: str) -> "RowAddresses | None":
        """The rows of the entry at `path` when they can be copied as they are; reads nothing."""
        mapping, names, (rank, size) = locate(path)
        return as_rows(mapping, names, rank, size)

    def materialize(path: str) -> "torch.Tensor | RowAddresses":
        mapping, names, (rank, size) = locate(path)
        rows = as_rows(mapping, names, rank, size)
        if rows is not None:
            return rows
        full = mapping.to_mcore([get_hf(n) for n in names], source.model)
        return mapping.shard(full, rank, size)

    return materialize, peek


def convert_hf_to_mcore(
    hf_dir: str,
    output: str,
    layout: ParallelLayout | None = None,
    dtype: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
    io_mode: str = "plain",
    spec: str = "local",
) -> str:
    """Write OUTPUT/iter_0000000 (+ tracker) from an HF dir; returns the iteration dir.

    Single process, or collective under torchrun (world size fitting `layout`). `dtype` is
    'bf16' / 'fp16' / 'fp32' (default: the HF weights' dtype); `io_mode`: 'plain' (default), 'fast', 'auto',
    'direct' or 'page-cache' (io_paths); `spec`: 'local' or 'te' names (see the module
    docstring). Runs on CPU (set CUDA_VISIBLE_DEVICES= ; the CLI does)."""
    layout = layout or ParallelLayout()
    io_mode = resolve_io(io_mode, log)
    plain = io_mode == "plain"
    if spec not in ("local", "te"):
        raise ConfigError(f"spec {spec!r}: expected 'local' or 'te' (megatron-core layer spec whose names to write)")
    source = inspect_hf_input(hf_dir, log, plain)
    source.model.validate_layout(layout)
    output = check_output_dir(output, overwrite, inputs=[source.hf_dir], kind="mcore")
    params_dtype = DTYPES[dtype_name(dtype)] if dtype else source.dtype
    extra = {"converted_from": "hf", "hf_expert_format": source.expert_format, "requested_layout": layout_dict(layout)}
    return write_mcore_checkpoint(
        source, output, layout, params_dtype, extra, progress, log, io_mode, spec, overwrite=overwrite
    )


def write_mcore_checkpoint(
    source: HFInput,
    output: str,
    layout: ParallelLayout,
    params_dtype: torch.dtype,
    extra: dict,
    progress: bool = True,
    log: Callable[[str], None] = print,
    io_mode: str = "plain",
    spec: str = "local",
    label: str | None = None,
    overwrite: bool = False,
) -> str:
    """Write OUTPUT/iter_0000000 (+ tracker) from the HF tensors `source` gives (an HF dir, or
    anything with its reader's `get(name)`: checkpoint averaging); `extra` goes to megadiff.json.
    `io_mode` is resolved already; OUTPUT was checked (check_output_dir); `label` names the source
    in the log (default: source.hf_dir); `overwrite`: an existing OUTPUT is replaced (else the name is
    claimed atomically: output_dir.publish). Returns the iteration dir."""
    plain = io_mode == "plain"
    if torch.cuda.is_available():
        raise RuntimeError("convert_hf_to_mcore runs on CPU: start it with CUDA_VISIBLE_DEVICES= (the CLI does)")

    from megadiff.checkpoint.dist import (
        _broadcast,
        model_sharded_state_dict,
        rename_sharded_keys,
        save_checkpoint_lazily,
    )
    from megadiff.platform import init_distributed, initialize_parallel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        init_distributed()
    world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    save_layout = layout if world > 1 else ParallelLayout()
    if world > 1 and (world % (layout.tp * layout.pp) or (world // layout.pp) % (layout.ep * layout.etp)):
        raise ConfigError(
            f"{world} processes do not fit layout {layout}: need tp*pp and ep*etp*pp to divide "
            f"the world size; run {layout.tp * layout.pp * max(1, layout.ep * layout.etp // layout.tp)} "
            f"processes, or 1 to convert at (1,1,1)"
        )
    initialize_parallel(save_layout)
    if rank == 0:
        log(
            f"converting {label or source.hf_dir} ({source.expert_format or 'no'} experts, "
            f"{source.dtype}) -> "
            f"{output} as {dtype_name(params_dtype)}, {spec} spec names, at layout {save_layout} on {world} "
            f"process(es), --io {io_mode}"
        )
    with torch.device("meta"):
        chunks = source.family.build_model(
            source.model,
            save_layout,
            params_dtype=params_dtype,
            use_te=False,
            perform_initialization=False,
            use_cpu_initialization=True,
        )
    sharded = model_sharded_state_dict(chunks)
    if spec == "te":
        rename_sharded_keys(sharded, source.family.mapping.other_spec_keys(source.model))
    meta = {
        "hf_config": source.config,
        "hf_source_dir": source.hf_dir,
        "layout": save_layout,
        "dtype": params_dtype,
        "spec": spec,
        "extra": extra,
    }
    bar = None
    if progress and rank == 0:
        from tqdm import tqdm

        bar = tqdm(unit="B", unit_scale=True, unit_divisor=1024, desc="hf->mcore", dynamic_ncols=True)
    written = [0]

    def on_tensor(nbytes: int, total: int) -> None:
        written[0] += nbytes
        if bar is not None:
            bar.total = total
            bar.update(nbytes)

    staging_root = f"{output}.tmp-{_broadcast(new_nonce() if rank == 0 else None)}"
    started = time.perf_counter()
    copier = None if plain else SpanCopier(io_mode)
    try:
        materialize, peek = _materializer(source, chunks, params_dtype, plain)
        final = save_checkpoint_lazily(staging_root, 0, sharded, meta, materialize, on_tensor, copier, peek, plain)
        if rank == 0:
            publish(staging_root, output, overwrite)
    except BaseException as e:
        if rank == 0:
            remove_tree(staging_root)
        full = disk_full_error(output, e)  # the file, the disk and its free space, not a traceback
        if full is not None:
            raise full from e
        raise
    finally:
        if bar is not None:
            bar.close()
    torch.distributed.barrier()
    if rank == 0:
        log(
            data_phase_line(
                written[0], time.perf_counter() - started, "wrote" if world == 1 else "rank 0 wrote", copier
            )
        )
    return os.path.join(output, os.path.basename(final))
