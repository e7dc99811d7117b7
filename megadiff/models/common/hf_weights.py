"""HF-named tensors into, and out of, a megatron-core model at any TP / EP / PP / VPP layout.

Family-agnostic: the family's MappingTable says how each parameter is made of HF tensors and how it
is split. Per-rank parameter names use local layer indices (within a pipeline chunk) and local
expert indices (within an EP rank); `global_name` turns them into the global names the table uses.
"""

import re
from collections.abc import Callable, Iterator

import torch

from .mapping import MappingTable
from .mcore_params import REPLICATED

_LOCAL_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")
_LOCAL_EXPERT = re.compile(r"(local_experts\.|linear_fc[12]\.weight)(\d+)")


def global_name(chunk, local_name: str, ep_rank: int, experts_per_rank: int) -> str:
    """Rename a chunk's parameter from local layer / expert indices to global ones."""
    m = _LOCAL_LAYER.match(local_name)
    if not m:
        return local_name
    layer = chunk.decoder.layers[int(m.group(1))].layer_number - 1  # layer_number is 1-based
    name = f"decoder.layers.{layer}." + local_name[m.end() :]
    if ".mlp.experts." in name:
        name = _LOCAL_EXPERT.sub(lambda e: f"{e.group(1)}{ep_rank * experts_per_rank + int(e.group(2))}", name)
    return name


def _unwrap(chunk):
    module = getattr(chunk, "module", chunk)  # DDP / Float16Module
    while hasattr(module, "module") and not hasattr(module, "decoder"):
        module = module.module
    return module


def local_params(chunks, ep_rank: int, experts_per_rank: int) -> Iterator[tuple[str, torch.Tensor]]:
    """(global name, tensor) of every parameter and router expert-bias buffer on this rank."""
    for chunk in chunks:
        module = _unwrap(chunk)
        items = list(module.named_parameters()) + [
            (n, b) for n, b in module.named_buffers() if n.endswith("router.expert_bias")
        ]
        for name, tensor in items:
            yield global_name(module, name, ep_rank, experts_per_rank), tensor


def _ranks():
    from megatron.core import parallel_state as ps  # only with a model (about 1 s to import)

    return dict(
        tp=(ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()),
        etp=(ps.get_expert_tensor_parallel_rank(), ps.get_expert_tensor_parallel_world_size()),
        ep=(ps.get_expert_model_parallel_rank(), ps.get_expert_model_parallel_world_size()),
    )


def load_hf_into_model(chunks, get_hf: Callable[[str], torch.Tensor], table: MappingTable, cfg) -> int:
    """Copy HF tensors (fetched one at a time by name) into this rank's parameters. Returns the
    number of parameters loaded; every parameter must be covered by the table."""
    r = _ranks()
    experts_per_rank = cfg.num_experts // r["ep"][1]
    count = 0
    with torch.no_grad():
        for name, param in local_params(chunks, r["ep"][0], experts_per_rank):
            mapping, index = table.for_mcore_name(name)
            names = mapping.hf_names(index)
            full = mapping.to_mcore([get_hf(n) for n in names], cfg)
            rank, size = r["etp"] if mapping.expert else r["tp"]
            piece = mapping.shard(full, rank, size)
            if piece.shape != param.shape:
                raise ValueError(
                    f"{name}: HF tensors {names} give shape {list(piece.shape)} on this rank, the "
                    f"model expects {list(param.shape)}"
                )
            param.copy_(piece.to(param.dtype))
            count += 1
    return count


def gather_hf_state(
    chunks, table: MappingTable, cfg, value: Callable[[torch.Tensor], torch.Tensor] = lambda p: p.detach()
) -> dict[str, torch.Tensor]:
    """Full HF-named tensors of the whole model, on every rank, from all TP/ETP/EP/PP shards.

    `value(param)` picks what to gather (the weight by default; e.g. `lambda p: p.main_grad`).
    For tests and small models: every tensor moves through all_gather_object."""
    from megatron.core import parallel_state as ps

    r = _ranks()
    experts_per_rank = cfg.num_experts // r["ep"][1]
    mine: dict[str, torch.Tensor] = {}
    for name, param in local_params(chunks, r["ep"][0], experts_per_rank):
        mapping, index = table.for_mcore_name(name)
        group = ps.get_expert_tensor_parallel_group() if mapping.expert else ps.get_tensor_model_parallel_group()
        rank, size = r["etp"] if mapping.expert else r["tp"]
        local = value(param).detach().float().contiguous()
        if size > 1 and mapping.param.split is not REPLICATED:
            pieces = [torch.empty_like(local) for _ in range(size)]
            torch.distributed.all_gather(pieces, local, group=group)
            full = mapping.unshard(pieces)
        else:
            full = local
        if rank == 0:
            for hf_name, tensor in zip(mapping.hf_names(index), mapping.to_hf(full, cfg), strict=True):
                mine[hf_name] = tensor.clone()
    everyone: list[dict[str, torch.Tensor]] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(everyone, mine)
    merged: dict[str, torch.Tensor] = {}
    for part in everyone:
        merged.update(part)
    return merged
