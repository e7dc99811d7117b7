"""A megadiff megatron-core checkpoint read as HF tensors of its model family, a few at a time.

Reads with torch DCP alone (megadiff.checkpoint.reader.DistCheckpointReader): no megatron-core, no
process group, plain single process. `inspect_mcore_input` checks a checkpoint against its recorded
config before anything is read; `plan_hf_output` lists every HF tensor as a box of a stored tensor,
in output order; `iter_hf_tensors` reads them in groups bounded by a byte budget. The sampler's
loader and the mcore -> HF converter both read checkpoints this way. The family comes from the
recorded HF config (megadiff.models.registry); its mapping table (megadiff.models.common.mapping)
names the tensors, their stored keys and shapes, and the transforms between the two.
"""

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from megadiff.errors import CheckpointError
from megadiff.models.common.mapping import Instance, Mapping
from megadiff.models.registry import family_for_config

from .format import DTYPES, read_meta, resolve_checkpoint_dir
from .reader import DistCheckpointReader

DEFAULT_BUDGET = 256 * 2**20
SPLIT, MERGED = "split", "merged"  # routed experts one tensor each, or dFactory's stacked layout (LLaDA2)


@dataclass(frozen=True)
class Unit:
    """One mapping instance of a config (its HF tensors) and the checkpoint key it is stored under."""

    mapping: Mapping
    layer: int | None
    expert: int | None
    hf: tuple[str, ...]
    hf_shapes: tuple[tuple[int, ...], ...]
    key: str
    full_shape: tuple[int, ...]  # the full megatron-core tensor (one expert's, for experts)


def units_for(family, model, spec: str) -> list[Unit]:
    """Every mapping instance of `model` (a family's validated config), in output order."""
    return [_unit(inst, spec) for inst in family.mapping.instances(model)]


def _unit(inst: Instance, spec: str) -> Unit:
    return Unit(
        inst.mapping, inst.layer, inst.expert, inst.hf, inst.hf_shapes, inst.checkpoint_key(spec), inst.full_shape
    )


def stored_shape(unit: Unit, model) -> tuple[int, ...]:
    """Global shape of the checkpoint tensor holding `unit` (experts stacked on a leading axis)."""
    return ((model.num_experts,) + unit.full_shape) if unit.expert is not None else unit.full_shape


def model_of(config: dict, source: str):
    """(family, validated config) of a recorded HF config."""
    family = family_for_config(config, source)
    return family, family.config_from_hf(config, source=source)


@dataclass
class McoreInput:
    ckpt_dir: str
    meta: dict
    config: dict
    model: object  # the family's validated config
    reader: DistCheckpointReader
    units: list[Unit]
    dtype: torch.dtype | None  # the checkpoint's parameter dtype (megadiff.json)
    spec: str = "local"  # whose tensor keys the checkpoint holds: "local" or "te"
    family: object = None  # megadiff.models.family.ModelFamily

    def hf_dtype(self, hf_name: str, stored: torch.dtype) -> torch.dtype:
        """HF tensors take the checkpoint's parameter dtype (megatron-core may keep norms in fp32
        inside a bf16 model; LLaDA2 HF checkpoints are uniformly bf16); the router bias stays as
        stored (fp32, as LLaDA2 and LLaDA-MoE ship it)."""
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
    family, model = model_of(config, f"{ckpt_dir}/megadiff.json:hf_config")
    reader = DistCheckpointReader(ckpt_dir, trust=trust_checkpoint, plain=plain)
    spec = check_stored_shapes(
        ckpt_dir, {k: reader.shape(k) for k in reader.keys()}, config, meta, "the recorded config"
    )
    dtype = DTYPES.get(meta.get("dtype"))
    return McoreInput(ckpt_dir, meta, config, model, reader, units_for(family, model, spec), dtype, spec, family)


def check_stored_shapes(ckpt_dir: str, stored: dict, config: dict, meta: dict, config_name: str) -> str:
    """Raise CheckpointError unless the checkpoint's tensors (`stored`: key -> global shape, from
    its metadata: nothing read) hold every tensor a model of `config` (an HF config dict; its family
    from model_type) has, with the shapes it implies; `config_name` says whose config that is.
    Returns the spec ("local" / "te") they are stored under."""
    family, model = model_of(config, f"{ckpt_dir}: {config_name}")
    try:
        spec = family.mapping.checkpoint_spec(stored.keys(), model, meta.get("spec"))
    except KeyError as e:
        raise CheckpointError(
            f"{ckpt_dir}: tensor '{e.args[0]}' is not in the checkpoint (nor its name under the other "
            f"megatron-core spec); it does not hold a {family.name} model with {config_name}"
        ) from None
    for unit in units_for(family, model, spec):
        want = stored_shape(unit, model)
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
    (`regroup` for QKV, whose HF row order differs from megatron-core's: the item is part `part` of
    `regroup.mapping.to_hf` of the whole stored tensor)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    key: str
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    regroup: Unit | None = None
    part: int = 0

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.sizes:
            n *= s
        return n * torch.empty((), dtype=self.dtype).element_size()


def regrouped(item: HFItem, stored, model):
    """The HF tensor of a `regroup` item from its whole stored tensor (or from that tensor's row
    addresses shaped [rows, 1]: megadiff.checkpoint.bytecopy)."""
    rows = stored.reshape(item.regroup.full_shape[0], -1)
    return item.regroup.mapping.to_hf(rows, model)[item.part]


def _unit_items(src: McoreInput, unit: Unit) -> list[HFItem]:
    """A unit's HF tensors as boxes: 'copy' = the whole tensor, 'concat' (gated fc1) = consecutive
    row blocks [gate; up], 'qkv' / 'qkv_split' = the whole tensor, regrouped after reading (one item
    per HF tensor). Routed experts add their index on the stored tensor's leading axis."""
    lead, lead_size = ((unit.expert,), (1,)) if unit.expert is not None else ((), ())
    if unit.mapping.transform in ("qkv", "qkv_split"):
        zeros = (0,) * len(unit.full_shape)
        stored_dtype = src.reader.dtype(unit.key)
        return [
            HFItem(
                name,
                shape,
                src.hf_dtype(name, stored_dtype),
                unit.key,
                lead + zeros,
                lead_size + unit.full_shape,
                regroup=unit,
                part=part,
            )
            for part, (name, shape) in enumerate(zip(unit.hf, unit.hf_shapes, strict=True))
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
    fc1 = next(u for u in units if u.mapping.transform == "concat" and u.expert == 0)
    fc2 = next(u for u in units if u.mapping.transform != "concat" and u.expert == 0)
    experts, (two_f, hidden) = src.config["num_experts"], fc1.full_shape
    f = two_f // 2
    boxes = {
        "gate_proj": (fc1.key, (0, 0, 0), (experts, f, hidden)),
        "up_proj": (fc1.key, (0, f, 0), (experts, f, hidden)),
        "down_proj": (fc2.key, (0, 0, 0), (experts,) + fc2.full_shape),
    }
    items = []
    experts_layout = src.family.hf_format.experts
    for proj in experts_layout.PROJS:
        key, offsets, sizes = boxes[proj]
        name = experts_layout.merged_name(layer, proj)
        items.append(HFItem(name, sizes, src.hf_dtype(name, src.reader.dtype(key)), key, offsets, sizes))
    return items


def plan_hf_output(src: McoreInput, expert_format: str = SPLIT) -> list[HFItem]:
    """Output order: embedding, each layer's tensors (routed experts in order, or stacked when
    `expert_format` is merged: LLaDA2 only), final norm, lm_head. Known before anything is read."""
    if expert_format == MERGED and src.family.hf_format.experts is None:
        raise CheckpointError(f"{src.ckpt_dir}: {src.family.name} HF checkpoints have no merged-expert layout")
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
        boxes = list(dict.fromkeys((i.key, i.offsets, i.sizes) for i in group))  # q, k, v share one box
        read = dict(zip(boxes, src.reader.read_many(boxes), strict=True)) if boxes else {}
        tensors = [read[(i.key, i.offsets, i.sizes)] for i in group]
        read = None
        for i, tensor in zip(group, tensors, strict=True):
            if i.regroup is not None:
                tensor = regrouped(i, tensor, src.model)
            yield i.name, tensor.reshape(i.shape).to(i.dtype)
        tensors = None
        group, size = [], 0
        if spans is not None:
            yield item.name, spans
        elif item is not None:
            group, size = [item], item.nbytes
