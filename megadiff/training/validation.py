"""Validation loss (train.eval_interval, train.eval_iters), for SFT rows and pretraining alike.

Data: the blend's valid split (pretraining), or data.valid_files (SFT rows, packed as training rows).
Measure: deterministic, so that checkpoints can be ranked by it (tools/average_checkpoints.py --top-k):
- the same eval_iters global batches every time (the first ones of the validation data);
- each sample noised from its own seed, in a seed domain of its own (never a training step's noise);
- at the current phase's mode and block size, with the masked-diffusion loss alone (no complementary
  copy, editing stream or CAP term), summed over every batch and rank and divided by the global
  denominator: the same number at every parallel layout.
Where it goes: `valid_loss` in the log, the metrics file, tensorboard and wandb, and in the
megadiff.json of each checkpoint (a validation runs before every save when validation is on).
"""

import dataclasses

import torch
from megatron.core import parallel_state as ps

from megadiff.data.rows import DataError
from megadiff.models.common.schedule import forward_backward
from megadiff.platform.device import run_device
from megadiff.seeding import stable_seed
from megadiff.training.batch import loss_denominator
from megadiff.training.config import TrainingConfig
from megadiff.training.loss import diffusion_loss_sums
from megadiff.training.setup import build_dataset, load_samples

VALID_SEED_DOMAIN = 2


def read_valid_samples(cfg: TrainingConfig, tokenizer, mask_id: int):
    """SFT validation rows (data.valid_files), read, checked and tokenized before the model is
    built; None when there are none or validation is off."""
    if not cfg.train.eval_interval or not cfg.data.valid_files:
        return None
    return load_samples(
        dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, train_files=cfg.data.valid_files)),
        tokenizer,
        mask_id,
    )


def build_valid_dataset(cfg: TrainingConfig, tokenizer, valid, dp_size: int, dp_rank: int):
    """The SFT validation rows as a dataset served like the training rows (None without them)."""
    if valid is None:
        return None
    samples, stats = valid
    try:
        dataset, _ = build_dataset(cfg, tokenizer, samples, stats, dp_size, dp_rank)
    except DataError as e:
        raise DataError(f"data.valid_files: {e}") from None
    return dataset


class Validator:
    """Runs the validation measure (module docstring) on a trainer's model."""

    def __init__(self, trainer, dataset):
        self.trainer = trainer
        self.dataset = dataset
        self.cfg = trainer.cfg
        batches = self.cfg.train.eval_iters
        available = getattr(dataset, "steps_per_epoch", None) or getattr(dataset, "steps_available", batches)
        self.batches = min(batches, available)
        if self.batches < batches:
            trainer.log(f"validation: {self.batches} global batches (train.eval_iters={batches}; that is all the data)")
        self.seed = stable_seed(VALID_SEED_DOMAIN, self.cfg.train.seed)
        self.initial_state = dataset.state_dict()
        self.last = None  # (step, loss, phase name) of the latest validation

    def due(self, step: int) -> bool:
        interval = self.cfg.train.eval_interval
        return step % interval == 0 or step == self.cfg.train.steps

    def measure(self, diffusion) -> float:
        """The validation loss of the model as it is now, at `diffusion`'s mode and block size."""
        d = dataclasses.replace(diffusion, complementary_masks=False, edit_ratio=0.0, confidence_beta=0.0)
        device = run_device()
        self.dataset.load_state_dict(self.initial_state)
        data = iter(self.dataset)
        sums = torch.zeros(2, dtype=torch.double, device=device)  # numerator, denominator

        def loss_fn(batch, output):
            numerator = diffusion_loss_sums(output, batch, d)["numerator"].detach()
            return numerator, torch.ones((), dtype=torch.int, device=device), {"numerator": numerator}

        for chunk in self.trainer.chunks:
            chunk.eval()
        with torch.no_grad():
            for _ in range(self.batches):
                micro = self.trainer.prepare_micro_batches(data, diffusion=d, seed=self.seed, step=None)
                sums[1] += sum(float(loss_denominator(b, d.normalize)) for b in micro)
                outputs = forward_backward(self.trainer.chunks, micro, loss_fn, forward_only=True)
                sums[0] += sum(float(o["numerator"]) for o in outputs)
        torch.distributed.all_reduce(sums, group=ps.get_data_parallel_group())
        denominator = float(sums[1])
        sums[1] = 0.0  # the denominator is known on every stage; only the last stage has numerators
        torch.distributed.all_reduce(sums, group=ps.get_pipeline_model_parallel_group())
        for chunk in self.trainer.chunks:
            chunk.train()
        return float(sums[0]) / denominator if denominator > 0 else float("nan")
