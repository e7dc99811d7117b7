"""megadiff megatron checkpoint (converted or trained, any layout) -> HF LLaDA2 tensors / directory.

Reads with torch DCP alone (megadiff.checkpoint.DistCheckpointReader): no megatron-core, no process
group, plain single process. An HF tensor whose bytes are stored rows in some order (the same dtype,
the last dim not split over TP: every tensor of a checkpoint saved at TP=1) is copied file to file
by megadiff.checkpoint.bytecopy without being read. Others are read a few at a time (a layer's
non-expert weights, a slab of experts bounded by `budget_bytes`) and written progressively, so
memory stays bounded by the largest tensor plus the budget whatever the model size. Optimizer state
and other keys in a training checkpoint are ignored. With `io_mode="plain"` every tensor is read
with torch DCP's public `load` and each shard written by safetensors' `save_file` (io_paths).

- `convert_mcore_to_hf`: a complete HF dir (shards + index, config.json, generation_config.json,
  tokenizer and remote code from a template, allow-listed files only: hf_template.py) that `AutoModelForCausalLM.from_pretrained(...,
  trust_remote_code=True)` loads as is; split experts, or dFactory's merged layout.
- `load_reference_from_mcore`: the plain-PyTorch reference model in memory (the sampler's loader).
"""

import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from megadiff.checkpoint.bytecopy.byte_spans import FileTable, Spans
from megadiff.checkpoint.format import DTYPES, read_meta, resolve_checkpoint_dir
from megadiff.checkpoint.reader import DistCheckpointReader
from megadiff.models.llada2.config import LLaDA2ModelConfig

from .dist_keys import Unit, checkpoint_spec, stored_shape, units_for
from .experts import MERGED, PROJS, SPLIT, merged_name
from .hf_io import CheckpointError
from .io_paths import resolve_io
from .llada2_mapping import hf_from_full_mcore
from .report import data_phase_line

DEFAULT_BUDGET = 256 * 2**20
_CONFIG_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


@dataclass
class McoreInput:
    ckpt_dir: str
    meta: dict
    config: dict
    model: LLaDA2ModelConfig
    reader: DistCheckpointReader
    units: list[Unit]
    dtype: torch.dtype | None  # the checkpoint's parameter dtype (megadiff.json)
    spec: str = "local"  # whose tensor keys the checkpoint holds: "local" or "te"

    def hf_dtype(self, hf_name: str, stored: torch.dtype) -> torch.dtype:
        """HF tensors take the checkpoint's parameter dtype (megatron-core may keep norms in fp32
        inside a bf16 model; LLaDA2 HF checkpoints are uniformly bf16); the router bias stays as
        stored (fp32, as LLaDA2 ships it)."""
        if self.dtype is None or hf_name.endswith("expert_bias"):
            return stored
        return self.dtype


def inspect_mcore_input(
    mcore_dir: str, iteration: int | None = None, trust_checkpoint: bool = False, plain: bool = False
) -> McoreInput:
    """Resolve the iteration dir and check that it holds every tensor the recorded config needs,
    with the right global shape, and that its data files are all there (nothing read yet).
    Checkpoints written with the local or the Transformer Engine spec are both read: the keys
    found decide which (TE's `_extra_state` objects are not tensors and are skipped).
    `trust_checkpoint`: unpickle its metadata without the allow-list (megadiff.checkpoint.untrusted).
    `plain`: the reader reads through torch DCP's public `load` only."""
    ckpt_dir = resolve_checkpoint_dir(mcore_dir, iteration)
    meta = read_meta(ckpt_dir)
    config = meta.get("hf_config")
    if not isinstance(config, dict):
        raise CheckpointError(f"{ckpt_dir}/megadiff.json: 'hf_config' missing")
    model = LLaDA2ModelConfig.from_hf_dict(config, source=f"{ckpt_dir}/megadiff.json:hf_config")
    reader = DistCheckpointReader(ckpt_dir, trust=trust_checkpoint, plain=plain)
    try:
        spec = checkpoint_spec(reader.keys(), config, meta.get("spec"))
    except KeyError as e:
        raise CheckpointError(
            f"{ckpt_dir}: tensor '{e.args[0]}' is not in the checkpoint (nor its name under the other "
            f"megatron-core spec); it does not hold a LLaDA2 model with the recorded config"
        ) from None
    units = units_for(config, spec)
    for unit in units:
        want = stored_shape(unit, config)
        if reader.shape(unit.key) != want:
            raise CheckpointError(
                f"{ckpt_dir}: tensor '{unit.key}' has global shape {list(reader.shape(unit.key))}, the "
                f"recorded config implies {list(want)}"
            )
    dtype = DTYPES.get(meta.get("dtype"))
    return McoreInput(ckpt_dir, meta, config, model, reader, units, dtype, spec)


# ---- the output plan: every HF tensor as a box of a stored tensor, in output order ---------------


@dataclass(frozen=True)
class HFItem:
    """One output tensor: its HF name / shape / dtype and the box of a stored tensor it comes from
    (`regroup` for the fused QKV, whose HF row order differs from megatron-core's)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    key: str
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    regroup: Unit | None = None

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.sizes:
            n *= s
        return n * torch.empty((), dtype=self.dtype).element_size()


def _unit_items(src: McoreInput, unit: Unit) -> list[HFItem]:
    """A unit's HF tensors as boxes: 'copy' = the whole tensor, 'concat' (gated fc1) = consecutive
    row blocks [gate; up], 'qkv' = the whole tensor, regrouped after reading. Routed experts add
    their index on the stored tensor's leading axis."""
    lead, lead_size = ((unit.expert,), (1,)) if unit.expert is not None else ((), ())
    if unit.rule.transform == "qkv":
        zeros = (0,) * len(unit.full_shape)
        return [
            HFItem(
                unit.hf[0],
                unit.hf_shapes[0],
                src.hf_dtype(unit.hf[0], src.reader.dtype(unit.key)),
                unit.key,
                lead + zeros,
                lead_size + unit.full_shape,
                regroup=unit,
            )
        ]
    items, row = [], 0
    for name, shape in zip(unit.hf, unit.hf_shapes, strict=True):
        offsets = lead + (row,) + (0,) * (len(shape) - 1)
        items.append(
            HFItem(
                name,
                tuple(shape),
                src.hf_dtype(name, src.reader.dtype(unit.key)),
                unit.key,
                offsets,
                lead_size + tuple(shape),
            )
        )
        row += shape[0]
    return items


def _merged_items(src: McoreInput, layer: int, units: list[Unit]) -> list[HFItem]:
    """dFactory's [E, Fm, H] gate / up (row blocks of every expert's fc1) and [E, H, Fm] down."""
    fc1 = next(u for u in units if u.rule.transform == "concat" and u.expert == 0)
    fc2 = next(u for u in units if u.rule.transform != "concat" and u.expert == 0)
    experts, (two_f, hidden) = src.config["num_experts"], fc1.full_shape
    f = two_f // 2
    boxes = {
        "gate_proj": (fc1.key, (0, 0, 0), (experts, f, hidden)),
        "up_proj": (fc1.key, (0, f, 0), (experts, f, hidden)),
        "down_proj": (fc2.key, (0, 0, 0), (experts,) + fc2.full_shape),
    }
    items = []
    for proj in PROJS:
        key, offsets, sizes = boxes[proj]
        name = merged_name(layer, proj)
        items.append(HFItem(name, sizes, src.hf_dtype(name, src.reader.dtype(key)), key, offsets, sizes))
    return items


def plan_hf_output(src: McoreInput, expert_format: str = SPLIT) -> list[HFItem]:
    """Output order: embedding, each layer's tensors (routed experts in order, or stacked when
    `expert_format` is merged), final norm, lm_head. Known before anything is read."""
    items: list[HFItem] = []
    merged_done = set()
    for unit in src.units:
        if unit.expert is not None and expert_format == MERGED:
            if unit.layer not in merged_done:
                merged_done.add(unit.layer)
                items += _merged_items(src, unit.layer, [u for u in src.units if u.layer == unit.layer])
            continue
        items += _unit_items(src, unit)
    return items


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
        addresses = hf_from_full_mcore(item.regroup.rule, addresses.reshape(-1, 1), src.model)[0]
    return files.spans(addresses, row_bytes, item.shape, item.dtype)


def iter_hf_tensors(
    src: McoreInput, items: Sequence[HFItem], budget_bytes: int = DEFAULT_BUDGET, allow_spans: bool = False
) -> Iterator[tuple[str, "torch.Tensor | Spans"]]:
    """(name, value) for every item, in order: `Spans` where the bytes can be copied as stored
    (if `allow_spans`), else a tensor, read in groups of up to `budget_bytes` (a larger item
    alone): memory holds one group."""
    if allow_spans:
        src.reader.read_ahead_record_metadata()  # item_spans parses every record's headers
    files = FileTable()
    group: list[HFItem] = []
    size = 0
    for item in list(items) + [None]:
        spans = item_spans(src, files, item) if allow_spans and item is not None else None
        if item is not None and spans is None and (not group or size + item.nbytes <= budget_bytes):
            group.append(item)
            size += item.nbytes
            continue
        tensors = src.reader.read_many([(i.key, i.offsets, i.sizes) for i in group]) if group else []
        for i, tensor in zip(group, tensors, strict=True):
            if i.regroup is not None:
                tensor = hf_from_full_mcore(i.regroup.rule, tensor.reshape(i.regroup.full_shape), src.model)[0]
            yield i.name, tensor.reshape(i.shape).to(i.dtype)
        tensors = None
        group, size = [], 0
        if spans is not None:
            yield item.name, spans
        elif item is not None:
            group, size = [item], item.nbytes


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
    from .hf_layout import REMOTE_CODE_FILES, remote_code_dir

    name = os.path.basename(path)
    if name not in REMOTE_CODE_FILES:
        return False
    with open(path, "rb") as a, open(os.path.join(remote_code_dir(), name), "rb") as b:
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
    io_mode: str = "auto",
    trust_checkpoint: bool = False,
) -> str:
    """Write an HF LLaDA2 dir from a checkpoint ROOT (latest complete iteration, or `iteration`) or
    an iteration dir. Tokenizer, generation config, chat template and remote code come from
    `hf_template` (default: the checkpoint's recorded hf_source_dir when its config.json matches
    the checkpoint's; else megadiff's own remote code), allow-listed files only (hf_template.py).
    `io_mode`: 'auto', 'plain', 'direct' or 'page-cache' (io_paths). Returns OUTPUT."""
    from .hf_template import copy_template_files, recorded_source_dir
    from .output_dir import check_output_dir, ensure_remote_code, staged_output, write_json
    from .safetensors_stream import parse_size, write_sharded_safetensors, write_sharded_safetensors_plain

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
    output = check_output_dir(output, overwrite, inputs=inputs)
    items = plan_hf_output(src, MERGED if merged_experts else SPLIT)
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
        with staged_output(output) as staging:
            values = iter_hf_tensors(src, items, budget_bytes, allow_spans=not plain)
            on_value = bar.update if bar else None
            if plain:
                writer = write_sharded_safetensors_plain(staging, entries, max_shard_size, values, on_value)
            else:
                writer = write_sharded_safetensors(staging, entries, max_shard_size, values, on_value, io_mode)
            config = _output_config(src, weights_dtype)
            copied, left_out = copy_template_files(template, staging, config) if template else ([], [])
            megadiff_code = ensure_remote_code(staging, config)
            write_json(os.path.join(staging, "config.json"), config)
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
    log(data_phase_line(writer.total_size, time.perf_counter() - started, copier=writer.copier))
    return output


# ---- in memory ------------------------------------------------------------------------------------


def load_reference_from_mcore(
    ckpt_dir: str, iteration: int | None = None, dtype: torch.dtype = torch.float32, trust_checkpoint: bool = False
):
    """The plain-PyTorch reference model (LLaDA2MoeModelLM, eval mode) from a megadiff checkpoint
    ROOT (latest complete iteration, or `iteration`) or iteration dir, in this process: no torchrun,
    no process group. Same dtype handling as `megadiff.hf.reference.load_reference_model`."""
    from megadiff.hf.reference import build_reference_model

    src = inspect_mcore_input(ckpt_dir, iteration, trust_checkpoint)
    with torch.device("meta"):
        model = build_reference_model(src.config)
    state = {name: tensor.to(dtype) for name, tensor in iter_hf_tensors(src, plan_hf_output(src, SPLIT))}
    result = model.load_state_dict(state, strict=False, assign=True)
    if result.unexpected_keys:
        raise CheckpointError(f"{src.ckpt_dir}: '{result.unexpected_keys[0]}' is not a reference model parameter")
    for module in model.modules():
        if hasattr(module, "inv_freq"):
            module.inv_freq = type(module)(model.config).inv_freq
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise CheckpointError(f"{src.ckpt_dir}: reference tensor '{left[0]}' was not loaded ({len(left)} in all)")
    return model.to(dtype).eval()
