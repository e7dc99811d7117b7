"""Routed-expert tensor layouts of LLaDA2 HF checkpoints: released checkpoints split them, dFactory merges them.

split  (released checkpoints): model.layers.i.mlp.experts.e.{gate,up}_proj.weight [Fm, H],
                               down_proj.weight [H, Fm], one tensor per expert
merged (dFactory training):    model.layers.i.mlp.experts.{gate_proj,up_proj} [E, Fm, H],
                               down_proj [E, H, Fm], experts stacked on dim 0, no `.weight` suffix
Every other tensor is named and shaped the same in both.
"""

import re
from collections import OrderedDict
from collections.abc import Callable, Iterable

import torch

from megadiff.errors import CheckpointError

from .hf_mapping import TABLE, expected_hf_shapes

SPLIT, MERGED = "split", "merged"
# The split names are the parameter table's routed-expert rows ("...experts.{expert}.gate_proj.weight");
# a merged name drops the expert index and the `.weight` suffix.
_SPLIT_PATTERNS = {name.split(".")[-2]: name for rule in TABLE if rule.expert for name in rule.hf}
PROJS = tuple(_SPLIT_PATTERNS)  # gate_proj, up_proj, down_proj
_EXPERTS_PREFIX = next(iter(_SPLIT_PATTERNS.values())).split("{expert}")[0]  # "model.layers.{layer}.mlp.experts."
_PROJ_GROUP = "(" + "|".join(PROJS) + ")"
_SPLIT_NAME = re.compile(
    "^" + re.escape(_EXPERTS_PREFIX).replace(r"\{layer\}", r"(\d+)") + r"(\d+)\." + _PROJ_GROUP + r"\.weight$"
)
_MERGED_NAME = re.compile("^" + re.escape(_EXPERTS_PREFIX).replace(r"\{layer\}", r"(\d+)") + _PROJ_GROUP + "$")


def split_name(layer: int, expert: int, proj: str) -> str:
    return _SPLIT_PATTERNS[proj].format(layer=layer, expert=expert)


def merged_name(layer: int, proj: str) -> str:
    return _EXPERTS_PREFIX.format(layer=layer) + proj


def parse_split_name(name: str) -> tuple[int, int, str] | None:
    m = _SPLIT_NAME.match(name)
    return (int(m.group(1)), int(m.group(2)), m.group(3)) if m else None


def parse_merged_name(name: str) -> tuple[int, str] | None:
    m = _MERGED_NAME.match(name)
    return (int(m.group(1)), m.group(2)) if m else None


def detect_expert_format(names: Iterable[str], where: str = "checkpoint") -> str | None:
    """SPLIT or MERGED from tensor names; None when there are no routed experts at all."""
    names = list(names)
    has_split = any(_SPLIT_NAME.match(n) for n in names)
    has_merged = any(_MERGED_NAME.match(n) for n in names)
    if has_split and has_merged:
        example = next(n for n in names if _MERGED_NAME.match(n))
        raise CheckpointError(f"{where}: mixes split-expert and merged-expert tensors (e.g. '{example}')")
    return MERGED if has_merged else SPLIT if has_split else None


def expected_shapes(hf_config: dict, fmt: str) -> "OrderedDict[str, tuple[int, ...]]":
    """Every tensor name and shape of a checkpoint in format `fmt`, in a stable order (layer by
    layer; a layer's merged expert tensors where its first split expert would be)."""
    split = expected_hf_shapes(hf_config)
    if fmt == SPLIT:
        return OrderedDict(split)
    experts = hf_config["num_experts"]
    out: OrderedDict[str, tuple[int, ...]] = OrderedDict()
    for name, shape in split.items():
        parsed = parse_split_name(name)
        if parsed is None:
            out[name] = tuple(shape)
        elif parsed[1] == 0:
            out[merged_name(parsed[0], parsed[2])] = (experts,) + tuple(shape)
    return out


def stored_location(name: str, fmt: str | None) -> tuple[str, int | None]:
    """Where split-format tensor `name` is stored in a checkpoint of format `fmt`: (stored tensor
    name, index along its dim 0, or None for the whole tensor)."""
    parsed = parse_split_name(name) if fmt == MERGED else None
    if parsed is None:
        return name, None
    layer, expert, proj = parsed
    return merged_name(layer, proj), expert


def split_tensor_getter(reader, fmt: str | None) -> Callable[[str], torch.Tensor]:
    """get(split-format name) -> tensor, whichever format `reader` (a megadiff.hf.checkpoint_reader.
    HFCheckpointReader) holds; a merged expert tensor is sliced so only that expert's bytes are read."""
    if fmt != MERGED:
        return reader.get

    def get(name: str) -> torch.Tensor:
        stored, index = stored_location(name, fmt)
        return reader.get(stored) if index is None else reader.get_index(stored, index)

    return get
