"""Whole adapter tensors under global names, at any layout: the exchange format of issue 16.

`full_adapter_state(chunks)` returns {"{P}.lora_A.weight": [r, in], "{P}.lora_B.weight": [out, r]}
for every adapter of the model, gathered over TP / expert-TP, EP and PP, identical on every rank
(CPU tensors, the parameters' dtype). `P` is the global megatron-core module path under the local
spec, e.g. `decoder.layers.1.mlp.experts.local_experts.5.linear_fc1`; lora_B rows are in
megatron's row layout of the base weight (linear_qkv per query group, linear_fc1 [gate; up]).
`load_full_adapter_state(chunks, full)` is its inverse: each rank copies in its own pieces.
Both are collective (every rank of the world must call them).
"""

import torch

from megadiff.errors import UserError

from .adapters import unshard
from .apply import adapted_modules, shard

WHICH = ("lora_A", "lora_B")


class AdapterStateError(UserError):
    """A full adapter state that does not fit the model's adapters."""


def full_adapter_state(chunks, value=lambda p: p.detach()) -> dict[str, torch.Tensor]:
    """Every adapter tensor of the model, whole, on every rank (see the module docstring).
    `value(param)` picks what to gather (the weight by default; e.g. `lambda p: p.main_grad`)."""
    mine: dict[str, torch.Tensor] = {}
    for name, module in adapted_modules(chunks):
        group = module.tp_group
        for which in WHICH:
            split = module.split_of(which)
            local = value(getattr(module, which).weight).detach().contiguous()
            if group.size() > 1 and split != "replicated":
                pieces = [torch.empty_like(local) for _ in range(group.size())]
                torch.distributed.all_gather(pieces, local, group=group)
                full = unshard(pieces, split)
            else:
                full = local
            if group.rank() == 0:
                mine[f"{name}.{which}.weight"] = full.cpu().clone()
    everyone: list[dict] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(everyone, mine)
    merged: dict[str, torch.Tensor] = {}
    for part in everyone:
        merged.update(part)
    return dict(sorted(merged.items()))


def adapter_shapes(chunks) -> dict[str, tuple[int, int]]:
    """Key -> whole shape of every tensor a full adapter state of this model has (collective)."""
    mine = {}
    for name, module in adapted_modules(chunks):
        rank = module.lora_A.weight.shape[0]
        mine[f"{name}.lora_A.weight"] = (rank, module.input_size)
        mine[f"{name}.lora_B.weight"] = (module.output_size, rank)
    everyone: list[dict] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(everyone, mine)
    return {k: v for part in everyone for k, v in part.items()}


def load_full_adapter_state(chunks, full: dict[str, torch.Tensor]) -> None:
    """Copy this rank's pieces of the whole adapter tensors `full` into the model's adapters.
    Raises AdapterStateError naming a missing, extra or mis-shaped key (the same on every rank,
    before anything is copied)."""
    shapes = adapter_shapes(chunks)
    missing, extra = sorted(shapes.keys() - full.keys()), sorted(full.keys() - shapes.keys())
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} key(s), e.g. {missing[0]!r}")
        if extra:
            parts.append(f"{len(extra)} key(s) the model has no adapter for, e.g. {extra[0]!r}")
        raise AdapterStateError(
            "adapter state does not match the model's adapters: "
            + "; ".join(parts)
            + " (check lora.target_modules, lora.experts and the model)"
        )
    for key, want in sorted(shapes.items()):
        if tuple(full[key].shape) != want:
            raise AdapterStateError(
                f"adapter state {key!r} has shape {list(full[key].shape)}, the model expects {list(want)} "
                f"(lora.rank and the model's sizes must match)"
            )
    with torch.no_grad():
        for name, module in adapted_modules(chunks):
            group = module.tp_group
            for which in WHICH:
                param = getattr(module, which).weight
                piece = shard(full[f"{name}.{which}.weight"], module.split_of(which), group.rank(), group.size())
                param.copy_(piece.to(dtype=param.dtype, device=param.device))
