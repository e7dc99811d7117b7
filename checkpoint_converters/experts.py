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

from .hf_io import CheckpointError, HFCheckpointReader
from .hf_layout import expected_hf_shapes

SPLIT, MERGED = "split", "merged"
PROJS = ("gate_proj", "up_proj", "down_proj")
_SPLIT_NAME = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_MERGED_NAME = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(gate_proj|up_proj|down_proj)$")


def split_name(layer: int, expert: int, proj: str) -> str:
    return f"model.layers.{layer}.mlp.experts.{expert}.{proj}.weight"


def merged_name(layer: int, proj: str) -> str:
    return f"model.layers.{layer}.mlp.experts.{proj}"


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


def split_tensor_getter(reader: HFCheckpointReader, fmt: str | None) -> Callable[[str], torch.Tensor]:
    """get(split-format name) -> tensor, whichever format `reader` holds; a merged expert tensor is
    sliced so only that expert's bytes are read."""
    if fmt != MERGED:
        return reader.get

    def get(name: str) -> torch.Tensor:
        stored, index = stored_location(name, fmt)
        return reader.get(stored) if index is None else reader.get_index(stored, index)

    return get
