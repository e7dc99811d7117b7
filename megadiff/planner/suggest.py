"""When no layout fits: the nearest single changes that make one fit, so a plan never ends at
"0 of 111 layouts fit" without saying what would.

Tried in this order, each on its own: more nodes (doubling, up to 16x), activation recompute
(selective, then full; with the dense attention backend, since flex attention cannot be recomputed)
and a micro-batch of 1. Each change is given as the tools/plan.py flags that make it, with the
fastest layout that then fits.
"""

from dataclasses import dataclass, replace

from .layouts import Plan, plan_layouts
from .memory import Hardware, RunShape

MAX_NODES_FACTOR = 16


@dataclass
class Change:
    flags: str  # the tools/plan.py flags that make the change, e.g. "--nodes 4"
    hardware: Hardware
    shape: RunShape
    fits: list[Plan]  # the layouts that fit with the change, fastest first


def _fitting(model, hw, shape) -> list[Plan]:
    return [p for p in plan_layouts(model, hw, shape) if p.reason is None]


def nearest_fitting_changes(model, hw: Hardware, shape: RunShape) -> list[Change]:
    """The single changes (module docstring) with which at least one layout fits; [] when none does."""
    changes = []
    nodes = hw.nodes * 2
    while nodes <= hw.nodes * MAX_NODES_FACTOR:
        more = replace(hw, nodes=nodes)
        fits = _fitting(model, more, shape)
        if fits:
            changes.append(Change(f"--nodes {nodes}", more, shape, fits))
            break
        nodes *= 2
    for recompute in ("selective", "full"):
        if recompute == shape.recompute or shape.recompute == "full":
            continue
        flags = f"--recompute {recompute}"
        alt = replace(shape, recompute=recompute)
        if shape.attention_backend == "flex":
            alt, flags = replace(alt, attention_backend="dense"), flags + " --attention-backend dense"
        fits = _fitting(model, hw, alt)
        if fits:
            changes.append(Change(flags, hw, alt, fits))
            break
    if shape.micro_batch_size > 1:
        alt = replace(shape, micro_batch_size=1)
        fits = _fitting(model, hw, alt)
        if fits:
            changes.append(Change("--micro-batch-size 1", hw, alt, fits))
    return changes


def describe_changes(changes: list[Change], hw: Hardware, config_layout=None) -> str:
    """Lines for tools/plan.py's output after a table in which nothing fits (saying, with a
    training config, whether the config's own layout fits with the change)."""
    where = f"{hw.world} GPUs ({hw.nodes} x {hw.gpus_per_node}) of {hw.memory_bytes / 2**30:.1f} GiB"
    if not changes:
        return (
            f"nothing fits {where}, and no single change fits either (up to {MAX_NODES_FACTOR}x the nodes, "
            "recompute, micro-batch 1): a shorter --seq-len, fp8 or a combination of changes may"
        )
    lines = [f"nothing fits {where}; the nearest changes that fit (each alone):"]
    for change in changes:
        best = change.fits[0]
        lines.append(
            f"  {change.flags}: {len(change.fits)} layouts fit on {change.hardware.world} GPUs, fastest "
            f"{best.layout},dp={best.dp} at {best.memory.as_gib()['total']:.1f} GiB per GPU"
        )
        mine = [p for p in change.fits if p.layout == config_layout]
        if mine:
            lines[-1] += f"; this config's layout fits too ({mine[0].memory.as_gib()['total']:.1f} GiB per GPU)"
    return "\n".join(lines)
