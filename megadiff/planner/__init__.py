"""Plan a run before renting the cluster: per-GPU memory and a step-time ranking of layouts.

Pure arithmetic over the model config (no torch, no process groups): `forecast` gives one
layout's per-GPU memory, `plan_layouts` every layout of a cluster ranked by estimated step time.
"""

from .layouts import Plan, candidate_layouts, model_summary, plan_layouts, step_time
from .memory import GiB, Hardware, MemorySplit, RunShape, forecast, state_bytes
from .params import ParamTensor, active_params, rank_parameters, total_params

__all__ = [
    "GiB",
    "Hardware",
    "MemorySplit",
    "ParamTensor",
    "Plan",
    "RunShape",
    "active_params",
    "candidate_layouts",
    "forecast",
    "model_summary",
    "plan_layouts",
    "rank_parameters",
    "state_bytes",
    "step_time",
    "total_params",
]
