"""What a training step reports, kept on the run device until the log interval asks for it.

A GPU runs ahead of the host only while the host does not read a value the GPU computes: every
read waits for all the work queued before it (megadiff.platform.host_reads counts them). So a
step's loss, token count and FLOPs stay on the device as 0-dim tensors (`PendingStep`), and
`read_steps` reads the pending steps of a whole log interval with one copy. Phase timers
(`PhaseTimer`) synchronise only when logging.timers asks for the data / forward-backward /
optimizer split.
"""

import time
from dataclasses import dataclass, field

import torch
from megatron.core import parallel_state as ps

from megadiff.platform.device import run_device, synchronize


@dataclass
class StepResult:
    step: int
    loss: float
    lr: float
    grad_norm: float | None
    tokens: int
    skipped: bool
    metrics: dict = field(default_factory=dict)  # objective-specific (DPO: ELBOs, margin, accuracy)
    flops: float = 0.0  # model FLOPs of the global batch (megadiff.training.throughput)
    data_s: float | None = None  # time split of the step (logging.timers): batches, forward-backward, optimizer
    fwd_bwd_s: float | None = None
    optimizer_s: float | None = None
    phase: str | None = None  # the block-schedule phase of the step ("bd4", "full"; megadiff.training.phases)


@dataclass
class PendingStep:
    """A step whose values are still on the device: `values` holds 0-dim tensors (loss, tokens,
    flops and the objective's metrics, named in `metric_names`)."""

    step: int
    lr: float
    grad_norm: float | None  # megatron-core's optimizer reads it to clip
    skipped: bool
    values: dict[str, torch.Tensor]
    metric_names: tuple[str, ...] = ()
    times: dict[str, float] = field(default_factory=dict)
    phase: str | None = None


def read_steps(pending: list[PendingStep]) -> list[StepResult]:
    """The pending steps' values on the host, read with one copy."""
    if not pending:
        return []
    stacked = torch.stack([v.to(torch.float64) for p in pending for v in p.values.values()])
    flat = iter(stacked.tolist())  # the one host read
    results = []
    for p in pending:
        values = {name: next(flat) for name in p.values}
        results.append(
            StepResult(
                step=p.step,
                loss=values["loss"],
                lr=p.lr,
                grad_norm=p.grad_norm,
                tokens=int(values["tokens"]),
                skipped=p.skipped,
                metrics={name: values[name] for name in p.metric_names},
                flops=values["flops"],
                phase=p.phase,
                **p.times,
            )
        )
    return results


def sum_in_order(values: list[torch.Tensor]) -> torch.Tensor:
    """The sum of 0-dim tensors in float64, left to right, on the run device: the value Python's
    sum of their floats gives, without reading them."""
    total = torch.zeros((), dtype=torch.float64, device=run_device())
    for value in values:
        total = total + value.to(torch.float64)
    return total


def global_sums(last_stage: dict[str, torch.Tensor], micro: list[dict]) -> dict[str, torch.Tensor]:
    """The step's values summed over every rank, on the device: `last_stage` (what the last
    pipeline stage computed: the loss, the objective's metrics; zeros elsewhere) and this rank's
    real tokens and FLOPs (host counts of its micro-batches, "real_tokens" and "flops"), which each
    pipeline stage knows alike and only the last contributes. One all-reduce over DP x CP (the CP
    ranks of a row add up its loss; they count its tokens alike, so only CP rank 0 contributes
    those), one over PP."""
    counting = ps.is_pipeline_last_stage(ignore_virtual=True) and ps.get_context_parallel_rank() == 0
    tokens = sum(b["real_tokens"] for b in micro) if counting else 0
    flops = sum(b["flops"] for b in micro) if counting else 0.0
    counts = torch.tensor([tokens, flops], dtype=torch.float64).to(run_device(), non_blocking=True)
    names = [*last_stage, "tokens", "flops"]
    summed = torch.cat([torch.stack([v.to(torch.float64) for v in last_stage.values()]), counts])
    torch.distributed.all_reduce(summed, group=ps.get_data_parallel_group(with_context_parallel=True))
    if ps.get_pipeline_model_parallel_world_size() > 1:
        torch.distributed.all_reduce(summed, group=ps.get_pipeline_model_parallel_group())
    return dict(zip(names, summed.unbind(), strict=True))


class LogInterval:
    """The steps of the current log interval, read (one copy) and handed to the logger on the
    first step of the run (it compiles: its time is its own), every `interval` steps, on the last
    step and when asked (`log()`: SIGTERM, an abort). Each step of an interval is given the
    interval's wall time shared evenly: without timers only the read at its end waits for the
    device, so a single step's host time would count its launches, not its work."""

    def __init__(self, logger, results: list, first_step: int, last_step: int, interval: int):
        self.logger, self.results = logger, results
        self.first_step, self.last_step, self.interval = first_step, last_step, interval
        self.pending: list[PendingStep] = []
        self.started = time.perf_counter()

    def add(self, step: PendingStep) -> None:
        self.pending.append(step)
        if step.step == self.first_step or step.step % self.interval == 0 or step.step >= self.last_step:
            self.log()

    def log(self) -> None:
        if not self.pending:
            return
        results = read_steps(self.pending)
        seconds = (time.perf_counter() - self.started) / len(results)
        for result in results:
            self.logger.log(result, seconds)
        self.results.extend(results)
        self.pending = []
        self.started = time.perf_counter()


class PhaseTimer:
    """Seconds between `lap`s of a step (data / fwd-bwd / opt), measured only when enabled:
    each lap then waits for the device, so it times the work rather than its launch."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.times: dict[str, float] = {}
        self._last = self._now() if enabled else 0.0

    def _now(self) -> float:
        synchronize()
        return time.perf_counter()

    def lap(self, name: str, seconds: float | None = None) -> None:
        """Record the time since the last lap as `name` (or `seconds`, e.g. 0 for a skipped phase)."""
        if not self.enabled:
            return
        now = self._now()
        self.times[name] = now - self._last if seconds is None else seconds
        self._last = now
