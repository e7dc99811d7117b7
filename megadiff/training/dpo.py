"""DPO on the diffusion ELBO (LLaDA2.0 §5.3; variance reduction of LLaDA 1.5 / VRPO).

    L = -log σ(β [(B_θ(y_w) - B_ref(y_w)) - (B_θ(y_l) - B_ref(y_l))])      (label smoothing ε:
        L = -(1-ε) log σ(βΔ) - ε log σ(-βΔ), conservative DPO)

B(y) estimates log p(y | x) by the masked-diffusion ELBO with the SFT noising: per Monte Carlo
sample, t ~ U(t_low, t_high) per response, response tokens masked with probability t, the prompt
never masked (block diffusion: every block at the same t, clean earlier blocks visible through
[x_t ; x_0]); B = -(1/K) Σ_k Σ_{masked i} CE_i / t_k over K = dpo.mc_samples samples.

Variance reduction: the K samples of a response are independent (t, mask) draws, and the policy and
the reference see identical ones (antithetic): both read the same prepared micro-batch, whose noise
is seeded by (train.seed, sample id, epoch) only (megadiff.data.preference).

Reduction: a pair's 2K documents are always in one micro-batch (PreferenceDataset), so each
micro-batch holds complete pairs and computes their logistic itself; the step's loss is the sum of
pair losses divided by the global number of pairs (known up front), hence the same for every layout
and micro-batch size. Only the last pipeline stage has logits; the reference ELBOs are computed
there too (live) or were stored there (precomputed), keyed by (epoch, pair).

Reference: `live` is a frozen copy of the starting weights, built and sharded like the policy (no
DDP, no optimizer); `precomputed` runs the policy's starting weights forward over every micro-batch
the run will see before the first step and keeps only the ELBOs. Both compute the same numbers.
"""

import copy

import torch
import torch.nn.functional as F
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

from megadiff.data.preference import PreferenceDataset, read_preference_rows, tokenize_pairs
from megadiff.models.common.schedule import forward_backward
from megadiff.platform.device import run_device
from megadiff.training.setup import build_model_with_initial_weights
from megadiff.training.step_metrics import global_sums, sum_in_order

METRICS = ("loss", "chosen_elbo", "rejected_elbo", "reward_margin", "accuracy")


def load_pairs(cfg, tokenizer, mask_id: int):
    """Read, validate and tokenise every preference row (before any process group or model)."""
    rows, stats = read_preference_rows(cfg.data.train_files, skip_bad_rows=cfg.data.skip_bad_rows)
    block = cfg.diffusion.block_size if cfg.data.pad_answers_to_block else None
    return tokenize_pairs(rows, tokenizer, mask_id, block), stats


def build_preference_dataset(cfg, tokenizer, pairs, stats, dp_size: int, dp_rank: int):
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    dataset = PreferenceDataset(
        pairs,
        max_seq_len=cfg.data.max_seq_len,
        pad_id=pad_id,
        global_batch_size=cfg.train.global_batch_size,
        micro_batch_size=cfg.train.micro_batch_size,
        mc_samples=cfg.dpo.mc_samples,
        dp_size=dp_size,
        dp_rank=dp_rank,
        seed=cfg.train.seed,
        truncation=cfg.data.truncation,
    )
    summary = {**dataset.stats, "preference_rows": stats["rows_kept"], "skipped_bad_rows": stats["rows_skipped"]}
    return dataset, summary


def elbo_estimates(logits: torch.Tensor, batch: dict, mc_samples: int) -> torch.Tensor:
    """[2P] ELBO estimates of the micro-batch's P pairs (chosen at 2j, rejected at 2j + 1) from
    vocab-parallel logits [rows, S_in, V/tp] (only the x_t half is read)."""
    at = batch.get("masked_at") or torch.nonzero(batch["masked"], as_tuple=True)  # x_t half (host-built)
    selected = logits[at].float()
    ce = vocab_parallel_cross_entropy(selected.clone(), batch["targets"][at])
    weighted = ce / batch["t"][at].float()  # the linear schedule's -α'/(1-α) = 1/t
    slots = batch["response_slot"][at]
    sums = torch.zeros(2 * batch["pair_ids"].numel(), dtype=weighted.dtype, device=weighted.device)
    return -sums.index_add(0, slots, weighted) / mc_samples


def pair_losses(policy: torch.Tensor, reference: torch.Tensor, beta: float, label_smoothing: float = 0.0):
    """Per-pair DPO losses and reward margins β·ΔB from [2P] policy and reference ELBOs."""
    diff = policy - reference
    margin = beta * (diff[0::2] - diff[1::2])
    losses = -(1.0 - label_smoothing) * F.logsigmoid(margin) - label_smoothing * F.logsigmoid(-margin)
    return losses, margin


class DPOObjective:
    """The DPO step for a Trainer whose dataset is a PreferenceDataset: reference ELBOs, then the
    policy's forward/backward with the pair losses, and the step's metrics."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.dpo = trainer.cfg.dpo
        self.reference_chunks = None
        self.stored: dict[tuple[int, int], torch.Tensor] = {}
        if self.dpo.reference == "live":
            cfg = trainer.cfg
            chunks = build_model_with_initial_weights(
                cfg,
                trainer.model_cfg,
                trainer.hf_config,
                trainer.layout,
                trainer.dtype,
                trainer.log,
                trainer.attention.backend,
                moe_experts=trainer.experts.backend,
            )
            for chunk in chunks:
                chunk.requires_grad_(False)
                chunk.eval()
            self.reference_chunks = chunks
        else:
            self._precompute()

    def _elbo_pass(self, chunks, micro: list[dict]) -> list[torch.Tensor]:
        """ELBOs [2P] of each micro-batch, forward only (last pipeline stage; [] elsewhere)."""
        zero = torch.zeros((), device=run_device())

        def loss_fn(batch, output):
            elbo = elbo_estimates(output, batch, self.dpo.mc_samples)
            return zero, torch.zeros((), dtype=torch.int, device=zero.device), {"elbo": elbo}

        for chunk in chunks:
            chunk.eval()
        with torch.no_grad():
            outputs = forward_backward(chunks, micro, loss_fn, forward_only=True)
        return [o["elbo"] for o in outputs]

    def _precompute(self) -> None:
        """Reference ELBOs of every micro-batch of the run (all train.steps, from the data's start),
        from the policy before it trains, keyed by (epoch, pair) — which fix the noise seeds."""
        trainer = self.trainer
        data = copy.copy(trainer.dataset)  # same pairs and order; its own position
        data.load_state_dict({"epoch": 0, "consumed_rows": 0})
        batches = iter(data)
        for _ in range(trainer.cfg.train.steps):
            micro = trainer.prepare_micro_batches(batches)
            for batch, elbo in zip(micro, self._elbo_pass(trainer.chunks, micro), strict=False):
                self._store(batch, elbo)
        trainer.log(f"dpo: precomputed reference ELBOs of {len(self.stored)} (epoch, pair) entries")

    def _store(self, batch: dict, elbo: torch.Tensor) -> None:
        epoch, pairs = batch["pair_keys"]
        for j, pair in enumerate(pairs):
            self.stored[(epoch, pair)] = elbo[2 * j : 2 * j + 2].clone()

    def reference_elbos(self, micro: list[dict]) -> list[torch.Tensor] | None:
        """Reference ELBOs [2P] per micro-batch on the last pipeline stage; None on the others."""
        if self.reference_chunks is not None:
            elbos = self._elbo_pass(self.reference_chunks, micro)
            return elbos or None
        if not ps.is_pipeline_last_stage(ignore_virtual=True):
            return None
        out = []
        for batch in micro:
            epoch, pairs = batch["pair_keys"]  # host ints: looking them up reads nothing from the device
            missing = [p for p in pairs if (epoch, p) not in self.stored]
            if missing:
                raise RuntimeError(f"dpo: no precomputed reference ELBO for epoch {epoch} pairs {missing[:5]}")
            out.append(torch.cat([self.stored[(epoch, p)] for p in pairs]))
        return out

    def forward_backward_step(self, micro: list[dict]) -> tuple[float, int, dict]:
        """Loss of the global batch, its gradients in the DDP grad buffers, real tokens, metrics
        (read to the host; the trainer's step keeps them on the device: device_forward_backward)."""
        values = self.device_forward_backward(micro)
        metrics = {k: float(v) for k, v in values.items() if k in METRICS}
        return metrics["loss"], int(values["tokens"]), metrics

    def device_forward_backward(self, micro: list[dict]) -> dict[str, torch.Tensor]:
        """Forward/backward of the global batch; returns the step's METRICS and `tokens` (real
        tokens of the global batch) as 0-dim tensors on the run device, summed over every rank."""
        trainer = self.trainer
        references = self.reference_elbos(micro)
        if references is not None:
            for batch, reference in zip(micro, references, strict=True):
                batch["reference_elbo"] = reference
        pairs = trainer.cfg.train.global_batch_size
        dpo = self.dpo

        def loss_fn(batch, output):
            policy = elbo_estimates(output, batch, dpo.mc_samples)
            losses, margin = pair_losses(policy, batch["reference_elbo"], dpo.beta, dpo.label_smoothing)
            loss = losses.sum() / pairs  # global pair count: each micro-batch holds whole pairs
            sums = {
                "loss": loss.detach().clone(),
                "chosen_elbo": policy[0::2].detach().sum() / pairs,
                "rejected_elbo": policy[1::2].detach().sum() / pairs,
                "reward_margin": margin.detach().sum() / pairs,
                "accuracy": (margin.detach() > 0).sum().to(loss.dtype) / pairs,
            }
            return loss, torch.zeros((), dtype=torch.int, device=loss.device), sums

        for chunk in trainer.chunks:
            chunk.train()
            chunk.zero_grad_buffer()
        trainer.optimizer.zero_grad()
        outputs = forward_backward(trainer.chunks, micro, loss_fn)
        totals = [sum_in_order([o[k] for o in outputs]) for k in METRICS]
        return global_sums(dict(zip(METRICS, totals, strict=True)), micro)
