"""megadiff megatron checkpoint (converted or trained, any layout) -> HF LLaDA2 tensors / directory.

Reads with torch DCP alone (megadiff.checkpoint.DistCheckpointReader): no megatron-core, no process
group, plain single process. Tensors are read a few at a time (a layer's non-expert weights, a slab
of experts bounded by `budget_bytes`) and written progressively, so memory stays bounded by the
largest tensor plus the budget whatever the model size. Optimizer state and other keys in a training
checkpoint are ignored.

- `convert_mcore_to_hf`: a complete HF dir (shards + index, config.json, generation_config.json,
  tokenizer and remote code from a template) that `AutoModelForCausalLM.from_pretrained(...,
  trust_remote_code=True)` loads as is; split experts, or dFactory's merged layout.
- `load_reference_from_mcore`: the plain-PyTorch reference model in memory (the sampler's loader).
"""

import os
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from megadiff.checkpoint.format import read_meta, resolve_checkpoint_dir
from megadiff.checkpoint.reader import DistCheckpointReader
from megadiff.models.llada2.config import LLaDA2ModelConfig

from .dist_keys import Unit, stored_shape, units_for
from .experts import MERGED, PROJS, SPLIT, merged_name
from .hf_io import CheckpointError
from .llada2_mapping import hf_from_full_mcore

DEFAULT_BUDGET = 256 * 2**20
_CONFIG_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


@dataclass
class McoreInput:
    ckpt_dir: str
    meta: Dict
    config: Dict
    model: LLaDA2ModelConfig
    reader: DistCheckpointReader
    units: List[Unit]


def inspect_mcore_input(mcore_dir: str, iteration: Optional[int] = None) -> McoreInput:
    """Resolve the iteration dir and check that it holds every tensor the recorded config needs,
    with the right global shape, and that its data files are all there (nothing read yet)."""
    ckpt_dir = resolve_checkpoint_dir(mcore_dir, iteration)
    meta = read_meta(ckpt_dir)
    config = meta.get("hf_config")
    if not isinstance(config, dict):
        raise CheckpointError(f"{ckpt_dir}/megadiff.json: 'hf_config' missing")
    model = LLaDA2ModelConfig.from_hf_dict(config, source=f"{ckpt_dir}/megadiff.json:hf_config")
    reader = DistCheckpointReader(ckpt_dir)
    units = units_for(config)
    for unit in units:
        if unit.key not in reader:
            raise CheckpointError(
                f"{ckpt_dir}: tensor '{unit.key}' (for {unit.hf[0]}) is not in the checkpoint; "
                f"it does not hold a LLaDA2 model with the recorded config"
            )
        want = stored_shape(unit, config)
        if reader.shape(unit.key) != want:
            raise CheckpointError(
                f"{ckpt_dir}: tensor '{unit.key}' has global shape {list(reader.shape(unit.key))}, the "
                f"recorded config implies {list(want)}"
            )
    return McoreInput(ckpt_dir, meta, config, model, reader, units)


# ---- the output plan: HF names, shapes, dtypes in order, and how to produce them ------------------

@dataclass
class _Step:
    entries: List[Tuple[str, Tuple[int, ...], torch.dtype]]
    run: Callable[[], Iterator[Tuple[str, torch.Tensor]]]


def _nbytes(shape, dtype) -> int:
    n = 1
    for s in shape:
        n *= s
    return n * torch.empty((), dtype=dtype).element_size()


def _plain_steps(src: McoreInput, units: List[Unit], budget: int) -> List[_Step]:
    """Non-expert units, read a group at a time (one pass over the files per group)."""
    groups: List[List[Unit]] = [[]]
    size = 0
    for unit in units:
        n = _nbytes(unit.full_shape, src.reader.dtype(unit.key))
        if groups[-1] and size + n > budget:
            groups.append([])
            size = 0
        groups[-1].append(unit)
        size += n
    steps = []
    for group in filter(None, groups):
        def run(group=group):
            tensors = src.reader.read_many([(u.key, None, None) for u in group])
            for unit, full in zip(group, tensors):
                yield from zip(unit.hf, hf_from_full_mcore(unit.rule, full, src.model))
        entries = [(n, s, src.reader.dtype(u.key)) for u in group for n, s in zip(u.hf, u.hf_shapes)]
        steps.append(_Step(entries, run))
    return steps


def _expert_steps_split(src: McoreInput, units: List[Unit], budget: int) -> List[_Step]:
    """One layer's routed experts, per expert gate/up/down, read in slabs of experts."""
    by_expert: Dict[int, List[Unit]] = {}
    for unit in units:
        by_expert.setdefault(unit.expert, []).append(unit)
    experts = sorted(by_expert)
    per_expert = sum(_nbytes(u.full_shape, src.reader.dtype(u.key)) for u in by_expert[experts[0]])
    slab = max(1, budget // max(per_expert, 1))
    steps = []
    for start in range(0, len(experts), slab):
        chosen = experts[start : start + slab]

        def run(chosen=chosen):
            group = by_expert[chosen[0]]
            boxes = []
            for unit in group:  # one box per stored key covering the slab
                shape = src.reader.shape(unit.key)
                boxes.append((unit.key, (chosen[0],) + (0,) * (len(shape) - 1), (len(chosen),) + shape[1:]))
            slabs = dict(zip([u.key for u in group], src.reader.read_many(boxes)))
            for i, expert in enumerate(chosen):
                for unit in by_expert[expert]:
                    yield from zip(unit.hf, hf_from_full_mcore(unit.rule, slabs[unit.key][i], src.model))

        entries = [(n, s, src.reader.dtype(u.key)) for e in chosen for u in by_expert[e] for n, s in zip(u.hf, u.hf_shapes)]
        steps.append(_Step(entries, run))
    return steps


def _expert_steps_merged(src: McoreInput, layer: int, units: List[Unit]) -> List[_Step]:
    """dFactory's [E, Fm, H] gate/up and [E, H, Fm] down of one layer, one stacked tensor per read."""
    fc1 = next(u for u in units if u.rule.transform == "concat")
    fc2 = next(u for u in units if u.rule.transform != "concat")
    experts, (two_f, hidden) = src.config["num_experts"], fc1.full_shape
    dtype1, dtype2 = src.reader.dtype(fc1.key), src.reader.dtype(fc2.key)
    f = two_f // 2
    boxes = {  # gate rows [0, F) and up rows [F, 2F) of every expert's fc1; fc2 whole
        "gate_proj": (fc1.key, (0, 0, 0), (experts, f, hidden), dtype1),
        "up_proj": (fc1.key, (0, f, 0), (experts, f, hidden), dtype1),
        "down_proj": (fc2.key, None, None, dtype2),
    }
    steps = []
    for proj in PROJS:
        key, offsets, sizes, dtype = boxes[proj]
        name = merged_name(layer, proj)
        shape = (experts,) + (fc2.full_shape if proj == "down_proj" else (f, hidden))

        def run(name=name, key=key, offsets=offsets, sizes=sizes):
            yield name, src.reader.read(key, offsets, sizes)

        steps.append(_Step([(name, shape, dtype)], run))
    return steps


def plan_hf_output(src: McoreInput, expert_format: str = SPLIT, budget_bytes: int = DEFAULT_BUDGET) -> List[_Step]:
    """Steps in output order: embedding, each layer (non-expert tensors, then routed experts),
    final norm and lm_head. Each step knows its HF entries before reading anything."""
    steps: List[_Step] = []
    layers: Dict[Optional[int], List[Unit]] = {}
    for unit in src.units:
        layers.setdefault(unit.layer, []).append(unit)
    globals_ = layers.pop(None)
    steps += _plain_steps(src, globals_[:1], budget_bytes)  # embedding
    for layer in sorted(layers):
        units = layers[layer]
        steps += _plain_steps(src, [u for u in units if u.expert is None], budget_bytes)
        experts = [u for u in units if u.expert is not None]
        if experts and expert_format == MERGED:
            steps += _expert_steps_merged(src, layer, [u for u in experts if u.expert == 0])
        elif experts:
            steps += _expert_steps_split(src, experts, budget_bytes)
    steps += _plain_steps(src, globals_[1:], budget_bytes)  # final norm, lm_head
    return steps


def iter_hf_tensors(steps: Sequence[_Step]) -> Iterator[Tuple[str, torch.Tensor]]:
    for step in steps:
        for (want, shape, dtype), (name, tensor) in zip(step.entries, step.run()):
            if name != want or tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
                raise CheckpointError(f"internal: produced {name} {tensor.dtype} {list(tensor.shape)}, "
                                      f"planned {want} {dtype} {list(shape)}")
            yield name, tensor


# ---- HF directory ----------------------------------------------------------------------------------

def _output_config(src: McoreInput, dtype: torch.dtype) -> Dict:
    """config.json: the recorded HF config, its dtype field updated when the weights changed dtype."""
    config = dict(src.config)
    name = _CONFIG_DTYPE_NAMES.get(dtype)
    for field in ("torch_dtype", "dtype"):
        if field in config and name and config[field] != name:
            config[field] = name
    return config


def _generation_config(config: Dict) -> Dict:
    out = {"_from_model_config": True}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if config.get(key) is not None:
            out[key] = config[key]
    return out


def convert_mcore_to_hf(
    mcore_dir: str,
    output: str,
    iteration: Optional[int] = None,
    hf_template: Optional[str] = None,
    merged_experts: bool = False,
    max_shard_size="5GB",
    overwrite: bool = False,
    progress: bool = True,
    budget_bytes: int = DEFAULT_BUDGET,
    log: Callable[[str], None] = print,
) -> str:
    """Write an HF LLaDA2 dir from a checkpoint ROOT (latest complete iteration, or `iteration`) or
    an iteration dir. Tokenizer, generation config and remote code come from `hf_template` (default:
    the checkpoint's recorded hf_source_dir; else megadiff's own remote code). Returns OUTPUT."""
    from .output_dir import check_output_dir, copy_non_weight_files, ensure_remote_code, staged_output, write_json
    from .safetensors_stream import ShardedSafetensorsWriter, parse_size

    src = inspect_mcore_input(mcore_dir, iteration)
    max_shard_size = parse_size(max_shard_size)
    template = hf_template or src.meta.get("hf_source_dir")
    if hf_template and not os.path.isdir(hf_template):
        raise CheckpointError(f"{hf_template}: --hf-template directory not found")
    if template and not os.path.isdir(template):
        log(f"note: recorded hf_source_dir {template} no longer exists; using megadiff's remote code, no tokenizer")
        template = None
    inputs = [src.ckpt_dir] + ([template] if template else [])
    output = check_output_dir(output, overwrite, inputs=inputs)
    steps = plan_hf_output(src, MERGED if merged_experts else SPLIT, budget_bytes)
    entries = [e for step in steps for e in step.entries]
    weights_dtype = entries[0][2]
    log(f"exporting {src.ckpt_dir} (iteration {src.meta['iteration']}, {len(entries)} tensors, "
        f"{'merged' if merged_experts else 'split'} experts) -> {output}")

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=sum(_nbytes(s, d) for _, s, d in entries), unit="B", unit_scale=True,
                   unit_divisor=1024, desc="mcore->hf", dynamic_ncols=True)
    try:
        with staged_output(output) as staging:
            writer = ShardedSafetensorsWriter(staging, entries, max_shard_size)
            try:
                for name, tensor in iter_hf_tensors(steps):
                    writer.write(name, tensor)
                    if bar is not None:
                        bar.update(tensor.nbytes)
                writer.close()
            except BaseException:
                writer.abort()
                raise
            copied = copy_non_weight_files(template, staging, skip=("config.json",)) if template else []
            config = _output_config(src, weights_dtype)
            copied += ensure_remote_code(staging, config)
            write_json(os.path.join(staging, "config.json"), config)
            if "generation_config.json" not in copied:
                write_json(os.path.join(staging, "generation_config.json"), _generation_config(config))
    finally:
        if bar is not None:
            bar.close()
    log(f"files from {template or 'megadiff'}: {', '.join(copied) or 'none'}")
    return output


# ---- in memory ------------------------------------------------------------------------------------

def load_reference_from_mcore(ckpt_dir: str, iteration: Optional[int] = None, dtype: torch.dtype = torch.float32):
    """The plain-PyTorch reference model (LLaDA2MoeModelLM, eval mode) from a megadiff checkpoint
    ROOT (latest complete iteration, or `iteration`) or iteration dir, in this process: no torchrun,
    no process group. Same dtype handling as `megadiff.hf.reference.load_reference_model`."""
    from megadiff.hf.reference import build_reference_model

    src = inspect_mcore_input(ckpt_dir, iteration)
    with torch.device("meta"):
        model = build_reference_model(src.config)
    state = {name: tensor.to(dtype) for name, tensor in iter_hf_tensors(plan_hf_output(src, SPLIT))}
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
