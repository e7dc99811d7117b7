"""A megadiff megatron-core checkpoint read as HF LLaDA2 tensors, a few at a time.

Reads with torch DCP alone (megadiff.checkpoint.reader.DistCheckpointReader): no megatron-core, no
process group, plain single process. `inspect_mcore_input` checks a checkpoint against its recorded
config before anything is read; `plan_hf_output` lists every HF tensor as a box of a stored tensor,
in output order; `iter_hf_tensors` reads them in groups bounded by a byte budget. The sampler's
loader and the mcore -> HF converter both read checkpoints this way.
"""

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from megadiff.errors import CheckpointError
from megadiff.models.llada2.checkpoint_keys import Unit, checkpoint_spec, stored_shape, units_for
from megadiff.models.llada2.config import LLaDA2ModelConfig
from megadiff.models.llada2.hf_experts import MERGED, PROJS, SPLIT, merged_name
from megadiff.models.llada2.hf_mapping import hf_from_full_mcore

from .format import DTYPES, read_meta, resolve_checkpoint_dir
from .reader import DistCheckpointReader

DEFAULT_BUDGET = 256 * 2**20


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
        raise CheckpointError(f"{ckpt_dir}/megadiff.json: 'hf_config' missing or not a JSON object")
    model = LLaDA2ModelConfig.from_hf_dict(config, source=f"{ckpt_dir}/megadiff.json:hf_config")
    reader = DistCheckpointReader(ckpt_dir, trust=trust_checkpoint, plain=plain)
    spec = check_stored_shapes(
        ckpt_dir, {k: reader.shape(k) for k in reader.keys()}, config, meta, "the recorded config"
    )
    dtype = DTYPES.get(meta.get("dtype"))
    return McoreInput(ckpt_dir, meta, config, model, reader, units_for(config, spec), dtype, spec)


def check_stored_shapes(ckpt_dir: str, stored: dict, config: dict, meta: dict, config_name: str) -> str:
    """Raise CheckpointError unless the checkpoint's tensors (`stored`: key -> global shape, from
    its metadata: nothing read) hold every tensor a LLaDA2 model of `config` has, with the shapes it
    implies; `config_name` says whose config that is. Returns the spec ("local" / "te") they are
    stored under."""
    try:
        spec = checkpoint_spec(stored.keys(), config, meta.get("spec"))
    except KeyError as e:
        raise CheckpointError(
            f"{ckpt_dir}: tensor '{e.args[0]}' is not in the checkpoint (nor its name under the other "
            f"megatron-core spec); it does not hold a LLaDA2 model with {config_name}"
        ) from None
    for unit in units_for(config, spec):
        want = stored_shape(unit, config)
        if tuple(stored[unit.key]) != tuple(want):
            raise CheckpointError(
                f"{ckpt_dir}: tensor '{unit.key}' has global shape {list(stored[unit.key])}, "
                f"{config_name} implies {list(want)}"
            )
    return spec


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


def iter_hf_tensors(
    src: McoreInput,
    items: Sequence[HFItem],
    budget_bytes: int = DEFAULT_BUDGET,
    stored_bytes: Callable[[HFItem], object | None] | None = None,
) -> Iterator[tuple[str, object]]:
    """(name, value) for every item, in order: a tensor, read in groups of up to `budget_bytes` (a
    larger item alone), so memory holds one group; or, where `stored_bytes(item)` returns one, that
    value instead (a converter's description of bytes it copies as stored)."""
    group: list[HFItem] = []
    size = 0
    for item in list(items) + [None]:
        spans = stored_bytes(item) if stored_bytes is not None and item is not None else None
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
