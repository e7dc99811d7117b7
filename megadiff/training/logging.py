"""Progress, metrics file, tensorboard and wandb for the training loop (rank 0 only).

Per step: loss, lr, grad norm, tokens/s (and its average over the run without the first step,
which includes compilation and warm-up), model TFLOP/s per GPU (megadiff.training.throughput),
MFU against the GPU's peak, the time split into data / forward-backward / optimizer, and the
maximum allocated and reserved CUDA memory (None in the files and "n/a" on the console on CPU).

On a terminal the progress is a tqdm bar; when stdout is not a terminal (a log file, CI) the
progress is one plain line every logging.log_interval steps instead of thousands of '\\r' frames,
which says what the bar would: `step i/N`, the time since the first step of this run began and
the ETA at the mean step time so far (`elapsed 0:01:05 ETA 0:09:40`).
"""

import json
import sys
import time

import torch
from tqdm import tqdm

from megadiff.files.outputs import open_output
from megadiff.platform import is_rank0

SCALARS = (
    "loss", "lr", "grad_norm", "tokens_per_s", "tokens_per_s_avg", "tflops_per_gpu", "mfu",
    "data_s", "fwd_bwd_s", "optimizer_s", "max_allocated_gib", "max_reserved_gib",
)  # fmt: skip


def cuda_memory_gib() -> tuple[float | None, float | None]:
    """Max allocated and reserved CUDA memory of this process (GiB); None on the CPU."""
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None, None
    return torch.cuda.max_memory_allocated() / 2**30, torch.cuda.max_memory_reserved() / 2**30


class MetricsLogger:
    def __init__(self, cfg, total_steps: int, initial_step: int = 0, world_size: int = 1,
                 peak_tflops: float | None = None, stream=None, clock=time.monotonic):  # fmt: skip
        self.cfg = cfg.logging
        self.total_steps, self.initial_step, self.clock = total_steps, initial_step, clock
        self.started = None  # when the first step of this run began (set by the first log)
        self.enabled = is_rank0()
        self.stream = stream if stream is not None else sys.stdout
        self.world_size, self.peak_tflops = world_size, peak_tflops
        self.steps_seen, self.avg_tokens, self.avg_seconds = 0, 0, 0.0
        self.bar = self.metrics = self.tb = self.wandb = None
        if not self.enabled:
            return
        if self.cfg.progress_bar and self.stream.isatty():
            self.bar = tqdm(total=total_steps, initial=initial_step, desc="train", dynamic_ncols=True, file=self.stream)
        if self.cfg.metrics_file:
            self.metrics = open_output(self.cfg.metrics_file, append=True, label="logging.metrics_file")
        if self.cfg.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter  # optional (dev extra); only runs that log to it

            self.tb = SummaryWriter(self.cfg.tensorboard_dir)
        if self.cfg.wandb_project:
            import wandb  # optional (wandb extra); only runs that log to it

            self.wandb = wandb.init(project=self.cfg.wandb_project, mode=self.cfg.wandb_mode, config=cfg.to_dict())

    def record(self, result, seconds: float) -> dict:
        """The step's metrics (see the module docstring)."""
        seconds = max(seconds, 1e-9)
        self.steps_seen += 1
        if self.steps_seen > 1:  # the first step of a run compiles and warms up
            self.avg_tokens += result.tokens
            self.avg_seconds += seconds
        flops = getattr(result, "flops", 0.0)
        tflops = flops / self.world_size / seconds / 1e12 if flops else None
        allocated, reserved = cuda_memory_gib()
        record = {
            "step": result.step,
            "loss": result.loss,
            "lr": result.lr,
            "grad_norm": None if result.grad_norm is None else float(result.grad_norm),
            "tokens": result.tokens,
            "tokens_per_s": result.tokens / seconds,
            "tokens_per_s_avg": self.avg_tokens / self.avg_seconds if self.avg_seconds else None,
            "tflops_per_gpu": tflops,
            "mfu": tflops / self.peak_tflops if tflops is not None and self.peak_tflops else None,
            "data_s": getattr(result, "data_s", None),
            "fwd_bwd_s": getattr(result, "fwd_bwd_s", None),
            "optimizer_s": getattr(result, "optimizer_s", None),
            "max_allocated_gib": allocated,
            "max_reserved_gib": reserved,
            "skipped": result.skipped,
        }
        if getattr(result, "phase", None):  # diffusion.block_schedule's phase of the step
            record["phase"] = result.phase
        record.update({k: v for k, v in getattr(result, "metrics", {}).items() if k not in record})  # DPO's margin
        return record

    def log(self, result, seconds: float) -> None:
        if not self.enabled:
            return
        record = self.record(result, seconds)
        extra = {k: v for k, v in getattr(result, "metrics", {}).items() if k != "loss"}
        if self.bar is not None:
            self.bar.set_postfix_str(console_fields(record, short=True))
            self.bar.update(1)
        else:
            now = self.clock()
            if self.started is None:
                self.started = now - seconds  # the first step began `seconds` ago
            if result.step % self.cfg.log_interval == 0:
                extra_text = "".join(f" {k} {v:.4f}" for k, v in extra.items())
                print(
                    f"step {result.step}/{self.total_steps} {console_fields(record)}{extra_text} "
                    f"{self.progress(result.step, now - self.started)}",
                    file=self.stream,
                    flush=True,
                )
        if self.metrics is not None:
            self.metrics.write(json.dumps(record) + "\n")
            self.metrics.flush()
        if self.tb is not None:
            for key in (*SCALARS, *extra):
                if record[key] is not None:
                    self.tb.add_scalar(f"train/{key}", record[key], result.step)
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if v is not None}, step=result.step)

    def log_validation(self, step: int, loss: float, phase: str | None = None) -> None:
        """One validation result (megadiff.training.validation) to every sink, as `valid_loss`."""
        if not self.enabled:
            return
        line = f"validation at step {step}" + (f" (phase {phase})" if phase else "") + f": valid_loss {loss:.4f}"
        if self.bar is not None:
            self.bar.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)
        if self.metrics is not None:
            self.metrics.write(json.dumps({"step": step, "valid_loss": loss, "phase": phase}) + "\n")
            self.metrics.flush()
        if self.tb is not None:
            self.tb.add_scalar("valid/loss", loss, step)
        if self.wandb is not None:
            self.wandb.log({"valid_loss": loss}, step=step)

    def progress(self, step: int, elapsed: float) -> str:
        """'elapsed H:MM:SS ETA H:MM:SS' after `step`, `elapsed` seconds into this run."""
        done = step - self.initial_step
        eta = elapsed / done * (self.total_steps - step) if done > 0 else 0.0
        return f"elapsed {clock_text(elapsed)} ETA {clock_text(eta)}"

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.metrics is not None:
            self.metrics.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def console_fields(r: dict, short: bool = False) -> str:
    def num(value, fmt):
        return "n/a" if value is None else format(value, fmt)

    parts = [f"phase {r['phase']}"] if r.get("phase") else []
    parts += [
        f"loss {r['loss']:.4f}",
        f"lr {r['lr']:.2e}",
        f"gnorm {num(r['grad_norm'], '.3f')}",
        f"tok/s {r['tokens_per_s']:.0f}",
        f"avg {num(r['tokens_per_s_avg'], '.0f')}",
        f"TFLOP/s/GPU {num(r['tflops_per_gpu'], '.1f')}",
        f"MFU {num(r['mfu'], '.1%')}",
    ]
    if not short:
        split = (r["data_s"], r["fwd_bwd_s"], r["optimizer_s"])
        if None not in split:
            parts.append("data/fwd-bwd/opt {:.3f}/{:.3f}/{:.3f}s".format(*split))
        parts.append(f"mem alloc/reserved {num(r['max_allocated_gib'], '.1f')}/{num(r['max_reserved_gib'], '.1f')} GiB")
    return " ".join(parts)


def clock_text(seconds: float) -> str:
    """H:MM:SS (as tqdm and Megatron-LM's logs write durations)."""
    seconds = max(0, round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
