"""Progress bar, metrics file, tensorboard and wandb for the training loop (rank 0 only)."""

import json

from tqdm import tqdm

from megadiff.platform import is_rank0


class MetricsLogger:
    def __init__(self, cfg, total_steps: int, initial_step: int = 0):
        self.cfg = cfg.logging
        self.enabled = is_rank0()
        self.bar = self.metrics = self.tb = self.wandb = None
        if not self.enabled:
            return
        if self.cfg.progress_bar:
            self.bar = tqdm(total=total_steps, initial=initial_step, desc="train", dynamic_ncols=True)
        if self.cfg.metrics_file:
            self.metrics = open(self.cfg.metrics_file, "a")
        if self.cfg.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter  # optional (dev extra); only runs that log to it

            self.tb = SummaryWriter(self.cfg.tensorboard_dir)
        if self.cfg.wandb_project:
            import wandb  # optional (wandb extra); only runs that log to it

            self.wandb = wandb.init(project=self.cfg.wandb_project, mode=self.cfg.wandb_mode, config=cfg.to_dict())

    def log(self, result, seconds: float) -> None:
        if not self.enabled:
            return
        tokens_per_s = result.tokens / max(seconds, 1e-9)
        record = {
            "step": result.step,
            "loss": result.loss,
            "lr": result.lr,
            "grad_norm": None if result.grad_norm is None else float(result.grad_norm),
            "tokens": result.tokens,
            "tokens_per_s": tokens_per_s,
            "skipped": result.skipped,
        }
        if self.bar is not None:
            gn = "-" if record["grad_norm"] is None else f"{record['grad_norm']:.3f}"
            self.bar.set_postfix_str(f"loss={result.loss:.4f} lr={result.lr:.2e} gnorm={gn} tok/s={tokens_per_s:.0f}")
            self.bar.update(1)
        elif result.step % self.cfg.log_interval == 0:
            print(f"step {result.step} loss {result.loss:.4f} lr {result.lr:.2e} tok/s {tokens_per_s:.0f}", flush=True)
        if self.metrics is not None:
            self.metrics.write(json.dumps(record) + "\n")
            self.metrics.flush()
        if self.tb is not None:
            for key in ("loss", "lr", "grad_norm", "tokens_per_s"):
                if record[key] is not None:
                    self.tb.add_scalar(f"train/{key}", record[key], result.step)
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if v is not None}, step=result.step)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.metrics is not None:
            self.metrics.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
