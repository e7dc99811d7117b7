"""The trainer's memory forecast: what a training config asks of one GPU, checked before any weight
is read (megadiff.planner does the arithmetic).

At start-up the trainer prints the forecast for its own layout; on a CUDA device whose memory is
smaller than the forecast it stops with a MemoryForecastError naming the layout keys to change
(`train.skip_memory_check: true` overrides). On the CPU it only prints.
"""

import os

import torch

from megadiff.errors import UserError
from megadiff.planner import GiB, Hardware, RunShape, forecast
from megadiff.planner.memory import data_parallel_size
from megadiff.platform.device import run_device
from megadiff.training.config import TrainingConfig
from megadiff.training.phases import uses_block_diffusion


class MemoryForecastError(UserError):
    """The forecast of a layout exceeds the memory of the device it would run on."""


def perf_setting(cfg: TrainingConfig, key: str, default):
    """A `perf.<key>` setting when the config has a perf section (read defensively: it is optional)."""
    return getattr(getattr(cfg, "perf", None), key, default)


def run_shape(cfg: TrainingConfig, dtype: torch.dtype | str | None = None) -> RunShape:
    """The RunShape of a training config; `dtype`: the parameter dtype the run resolved (auto -> bf16
    on a GPU, fp32 on the CPU); None = as the config says, with auto read as bf16 (a GPU run)."""
    if isinstance(dtype, torch.dtype):
        dtype = "fp32" if dtype == torch.float32 else "bf16"
    dtype = dtype or ("fp32" if cfg.model.dtype == "fp32" else "bf16")
    recompute = perf_setting(cfg, "recompute_granularity", None) or "none"
    return RunShape(
        seq_len=cfg.data.max_seq_len,
        micro_batch_size=cfg.train.micro_batch_size,
        global_batch_size=cfg.train.global_batch_size,
        mode="bd" if uses_block_diffusion(cfg) else "full",  # a block schedule: its widest phase
        dtype=dtype,
        attention_backend=cfg.model.attention_backend,
        recompute=recompute if recompute in ("none", "selective", "full") else "none",
        recompute_modules=tuple(perf_setting(cfg, "recompute_modules", None) or ("core_attn",)),
        fp8=bool(perf_setting(cfg, "fp8", False)),
        lora_rank=cfg.lora.rank if cfg.lora.enabled else None,  # the section's rank has a default: not LoRA
        lora_targets=tuple(cfg.lora.target_modules),
        lora_experts=cfg.lora.experts,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
    )


def device_memory_bytes() -> int | None:
    """Total memory of this process's CUDA device, or None on the CPU."""
    device = run_device()
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).total_memory


def check_memory_forecast(cfg: TrainingConfig, model_cfg, layout, dtype, log) -> None:
    """Print the per-GPU forecast of this run; raise MemoryForecastError when it exceeds the device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world % (layout.tp * layout.cp * layout.pp) or (world // layout.pp) % (layout.ep * layout.etp):
        return  # initialize_parallel names the mismatch of layout and world size
    memory = device_memory_bytes()
    hw = Hardware(gpus_per_node=world, nodes=1, gpu_memory_gb=(memory or 0) / 1e9)
    if memory is None:  # a CPU run has neither a CUDA context nor NCCL buffers
        hw = Hardware(gpus_per_node=world, context_gib=0.0)
    split = forecast(model_cfg, layout, hw, run_shape(cfg, dtype))
    g = split.as_gib()
    log(
        f"memory forecast per GPU at {layout} (dp={data_parallel_size(layout, world)}): {g['total']:.2f} GiB = weights "
        f"{g['weights']:.2f} + grads {g['grads']:.2f} + optimizer {g['optimizer_dense']:.2f} dense / "
        f"{g['optimizer_expert']:.2f} expert + activations {g['activations']:.2f} + buffers {g['buffers']:.2f}"
        + ("" if memory is None else f"; device {memory / GiB:.2f} GiB")
    )
    if memory is None or split.total <= memory:
        return
    if cfg.train.skip_memory_check:
        log("warning: the forecast exceeds the device memory; going on because train.skip_memory_check is true")
        return
    raise MemoryForecastError(
        f"memory forecast {split.total / GiB:.1f} GiB per GPU (pipeline rank {split.detail['pp_rank']}) exceeds "
        f"the device's {memory / GiB:.1f} GiB at parallel.tp={layout.tp} parallel.ep={layout.ep} "
        f"parallel.pp={layout.pp} parallel.cp={layout.cp}; run tools/plan.py with this config for layouts that fit, or set "
        f"train.skip_memory_check=true to try anyway"
    )
