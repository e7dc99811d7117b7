"""Plans as a table (one row per layout) or as JSON."""

import json

from .layouts import Plan

COLUMNS = ("weights", "grads", "optimizer_dense", "optimizer_expert", "activations", "buffers", "total")
HEADER = ("tp", "ep", "etp", "pp", "vpp", "cp", "dp", "distopt")


def table(plans: list[Plan], config: str, limit: int, memory_gib: float) -> str:
    feasible = [p for p in plans if p.reason is None]
    refused = [p for p in plans if p.reason is not None]
    lines = [
        f"{len(feasible)} of {len(plans)} layouts fit in {memory_gib:.1f} GiB per GPU; fastest first "
        "(GiB per GPU; step time from a first-order model: a ranking, not a promise)"
    ]
    searched = any(p.recompute is not None for p in plans)  # recompute="auto": a column says which
    head = (
        " ".join(f"{h:>4}" for h in HEADER[:-1])
        + f" {'dopt':>4} "
        + (f"{'recompute':>9} " if searched else "")
        + " ".join(f"{c.replace('optimizer_', 'opt_')[:10]:>10}" for c in COLUMNS)
        + f" {'step_s':>8}"
    )
    lines.append(head)
    for p in feasible[:limit]:
        lay, g = p.layout, p.memory.as_gib()
        cells = [lay.tp, lay.ep, lay.etp, lay.pp, lay.vpp or "-", lay.cp, p.dp]
        cells.append("yes" if p.use_distributed_optimizer else "no")
        lines.append(
            " ".join(f"{c!s:>4}" for c in cells)
            + " "
            + (f"{recompute_label(p):>9} " if searched else "")
            + " ".join(f"{g[c]:>10.2f}" for c in COLUMNS)
            + f" {p.step_seconds:>8.3f}"
        )
        lines.append(f"     {p.command(config)}")
    if len(feasible) > limit:
        lines.append(f"... {len(feasible) - limit} more feasible layouts (--top N, or --json for all)")
    if refused:
        lines.append(f"{len(refused)} layouts do not run or do not fit:")
        for p in refused[:limit]:
            dist = "distopt" if p.use_distributed_optimizer else "no distopt"
            lines.append(f"  {p.layout},dp={p.dp} {dist}: {p.reason}")
        if len(refused) > limit:
            lines.append(f"  ... {len(refused) - limit} more (--json lists all)")
    return "\n".join(lines)


def recompute_label(plan: Plan) -> str:
    """What the search chose to recompute: '-' (nothing), 'full', or the selective modules."""
    granularity, modules = plan.recompute or ("none", ())
    return {"none": "-", "full": "full"}.get(granularity) or ",".join(modules)


def as_json(plans: list[Plan], summary: dict, config: str) -> str:
    return json.dumps({**summary, "plans": [p.to_dict(config) for p in plans]}, indent=1)
