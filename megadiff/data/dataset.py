"""Deterministic, data-parallel-sharded, resumable micro-batches of packed SFT rows.

Order contract (the training loop relies on it):

- Packing happens once (plan_packed_rows, deterministic). Each epoch e shuffles the N packed rows with a
  permutation seeded by (seed, e): `epoch_order(e)`.
- Global batch k of epoch e is rows `epoch_order(e)[k*G : (k+1)*G]`, G = global_batch_size (rows).
  Only whole global batches are used; the last N % G rows of an epoch are skipped.
- global_batch(step) is identical for every layout; rank r gets rows [r*G/dp, (r+1)*G/dp) of it,
  split into accum = G / (dp*B) micro-batches of B consecutive rows, in order.
  So the union over ranks of one step's micro-batches is the global batch, whatever dp_size is.
- State is (epoch, consumed_rows): consumed_rows counts global rows of finished global batches of the
  current epoch. It advances by G when a rank hands out the LAST micro-batch of a step, so a checkpoint
  taken between optimizer steps resumes at the next step exactly (a mid-step state replays that step).
  The state does not depend on dp_size, so a run may resume on a different layout.

Each micro-batch is the collated row dict of packing.py ([B, S] tensors: input_ids, position_ids,
doc_ids, loss_mask, sample_ids) plus `epoch` ([B] long), which noise_batch needs for its seeds.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from megadiff.data.packing import (
    PACK,
    TRUNCATE,
    Sample,
    build_row,
    collate_rows,
    plan_packed_rows,
)
from megadiff.data.rows import DataError
from megadiff.seeding import seeded_generator

SHUFFLE_SEED_DOMAIN = 0  # keeps shuffle seeds apart from noise seeds derived from the same `seed`


def check_batch_split(global_batch_size: int, micro_batch_size: int, dp_size: int, dp_rank: int) -> None:
    """A global batch must split into whole micro-batches on every data-parallel rank."""
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank={dp_rank} is outside [0, dp_size={dp_size})")
    if global_batch_size % (micro_batch_size * dp_size):
        raise DataError(
            f"global_batch_size={global_batch_size} is not divisible by micro_batch_size={micro_batch_size} "
            f"* dp_size={dp_size}; pick a global batch that is a multiple of {micro_batch_size * dp_size}"
        )


def too_little_data(what: str, total: int, unit: str, dropped: dict, global_batch_size: int) -> DataError:
    """The error for data that fills fewer than one global batch: when samples were dropped for
    their length, that (not the batch size) is the cause to name."""
    reasons = [f"{n} {why}" for why, n in dropped.items() if n]
    if not reasons:
        return DataError(
            f"{what} are fewer than global_batch_size={global_batch_size}; lower the global batch size or add data"
        )
    lost = sum(dropped.values())
    head = f"all {total} {unit} were dropped" if lost == total else f"{lost} of {total} {unit} were dropped"
    return DataError(
        f"{head} for their length ({', '.join(reasons)}), leaving {what}, fewer than global_batch_size="
        f"{global_batch_size}; raise data.max_seq_len (or shorten the prompts)"
    )


class SFTDataset:
    """Packed SFT rows served as micro-batches for one data-parallel rank (see module docstring)."""

    def __init__(
        self,
        samples: Sequence[Sample],
        *,
        max_seq_len: int,
        pad_id: int,
        global_batch_size: int,
        micro_batch_size: int,
        dp_size: int = 1,
        dp_rank: int = 0,
        seed: int = 0,
        mode: str = PACK,
        truncation: str = TRUNCATE,
    ):
        check_batch_split(global_batch_size, micro_batch_size, dp_size, dp_rank)
        self.samples = samples
        self.max_seq_len = max_seq_len
        self.pad_id = pad_id
        self.mode = mode
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.dp_size = dp_size
        self.dp_rank = dp_rank
        self.seed = seed
        self.accumulation_steps = global_batch_size // (micro_batch_size * dp_size)
        self.plans, self.stats = plan_packed_rows(samples, max_seq_len, mode, truncation)
        if len(self.plans) < global_batch_size:
            dropped = {
                "whose prompt alone fills a row": self.stats["dropped_prompt_too_long"],
                "longer than a row (data.truncation=drop)": self.stats["dropped_too_long"],
            }
            raise too_little_data(
                f"{len(self.plans)} packed rows of {max_seq_len} tokens",
                len(samples),
                "samples",
                dropped,
                global_batch_size,
            )
        self.epoch = 0
        self.consumed_rows = 0
        self._order_cache: tuple[int, list[int]] | None = None

    @property
    def rows_per_epoch(self) -> int:
        return len(self.plans)

    @property
    def steps_per_epoch(self) -> int:
        return len(self.plans) // self.global_batch_size

    def epoch_order(self, epoch: int) -> list[int]:
        """Return the shuffled packed-row indices of `epoch` (depends only on seed and epoch)."""
        if self._order_cache is None or self._order_cache[0] != epoch:
            generator = seeded_generator(SHUFFLE_SEED_DOMAIN, self.seed, epoch)
            self._order_cache = (epoch, torch.randperm(len(self.plans), generator=generator).tolist())
        return self._order_cache[1]

    def global_batch_rows(self, epoch: int, batch_index: int) -> list[int]:
        """Return the packed-row indices of global batch `batch_index` of `epoch` (G of them)."""
        if not 0 <= batch_index < self.steps_per_epoch:
            raise IndexError(f"batch_index={batch_index} outside [0, {self.steps_per_epoch}) for epoch {epoch}")
        start = batch_index * self.global_batch_size
        return self.epoch_order(epoch)[start : start + self.global_batch_size]

    def rows_batch(self, row_indices: Sequence[int], epoch: int) -> dict:
        """Return the collated [len(row_indices), S] batch of those packed rows, with `epoch`."""
        batch = collate_rows(
            [build_row(self.plans[r], self.samples, self.max_seq_len, self.pad_id, self.mode) for r in row_indices]
        )
        batch["epoch"] = torch.full((len(row_indices),), epoch, dtype=torch.long)
        return batch

    def global_batch(self, epoch: int, batch_index: int) -> dict:
        """Return global batch `batch_index` of `epoch` as one [G, S] batch (for checks and tests)."""
        return self.rows_batch(self.global_batch_rows(epoch, batch_index), epoch)

    def __iter__(self) -> Iterator[dict]:
        """Yield this rank's micro-batches forever, from the current state on (see module docstring)."""
        G, B = self.global_batch_size, self.micro_batch_size
        per_rank = G // self.dp_size
        while True:
            if self.consumed_rows + G > len(self.plans):
                self.epoch, self.consumed_rows = self.epoch + 1, 0
            epoch = self.epoch
            rows = self.epoch_order(epoch)[self.consumed_rows : self.consumed_rows + G]
            mine = rows[self.dp_rank * per_rank : (self.dp_rank + 1) * per_rank]
            for j in range(self.accumulation_steps):
                batch = self.rows_batch(mine[j * B : (j + 1) * B], epoch)
                if j == self.accumulation_steps - 1:  # the step is done once its last micro-batch is out
                    self.consumed_rows += G
                yield batch

    def state_dict(self) -> dict:
        """Return {"epoch", "consumed_rows"}: where the next global batch starts (layout-independent)."""
        return {"epoch": self.epoch, "consumed_rows": self.consumed_rows}

    def load_state_dict(self, state: dict) -> None:
        """Resume at the state returned by state_dict() (possibly saved under another dp layout)."""
        epoch, consumed = int(state["epoch"]), int(state["consumed_rows"])
        if epoch < 0 or not 0 <= consumed <= len(self.plans):
            raise ValueError(f"data state {state} is outside this dataset ({len(self.plans)} rows per epoch)")
        self.epoch, self.consumed_rows = epoch, consumed
