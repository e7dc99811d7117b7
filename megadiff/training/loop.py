"""The diffusion SFT training loop on megatron-core.

for step in steps:
    micro-batches of this DP rank -> noise -> [x_t] or [x_t ; x_0] + attention mask
    global loss denominator (all micro-batches, all DP ranks; known before forward)
    forward/backward through megatron-core's pipeline schedule
    skip the step if the loss is NaN/Inf, else clip + AdamW step + LR schedule
    log, checkpoint (every N steps, at the end, on SIGTERM)

The host reads two values per step (whether the loss is finite, to skip or step; the gradient norm,
which megatron-core's optimizer reads to clip); losses, token counts and FLOPs stay on the device
until the log interval reads them (megadiff.training.step_metrics).
"""

import os
import signal

import torch
from megatron.core import parallel_state as ps
from megatron.core.optimizer import get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megadiff.checkpoint import load_checkpoint, model_sharded_state_dict, resolve_checkpoint_dir, save_checkpoint
from megadiff.hf.checkpoint_reader import read_hf_config
from megadiff.hf.ling import as_llada2_config
from megadiff.lora.adapter_checkpoint import adapter_meta, adapter_sharded_state_dict
from megadiff.models.common.gpt import set_xt_only_logits
from megadiff.models.common.schedule import forward_backward
from megadiff.models.registry import family_for_config
from megadiff.platform import compat, init_distributed, initialize_parallel, print_rank0
from megadiff.platform.device import default_params_dtype, to_run_device
from megadiff.platform.kernels import probe_environment
from megadiff.training import dpo as dpo_objective
from megadiff.training.batch import prepare_micro_batch
from megadiff.training.checkpointing import (
    align_saved_schedule_values,
    apply_model_state,
    check_optimizer_layout,
    claim_save_dir,
    initialise_optimizer_state,
    lora_base_for_run,
    lora_settings,
    prune_checkpoints,
    restore_adam_steps,
)
from megadiff.training.config import TrainingConfig, parallel_layout
from megadiff.training.context_parallel import loss_denominator_share, split_micro_batch
from megadiff.training.data_fingerprint import data_fingerprints
from megadiff.training.disk_space import checkpoint_bytes, no_space_error
from megadiff.training.embedding_noise import embedding_noise, noise_active
from megadiff.training.logging import MetricsLogger
from megadiff.training.loss import diffusion_loss_sums
from megadiff.training.mcore_configs import optimizer_config
from megadiff.training.memory_check import check_memory_forecast
from megadiff.training.optimizer_memory import optimizer_state_bytes
from megadiff.training.perf_preflight import check_perf, choose_attention_backend, choose_moe_experts
from megadiff.training.phases import BLOCK_DIFFUSION, phase_at, phase_diffusion, run_phases
from megadiff.training.preflight import check_outputs
from megadiff.training.pretraining import build_pretraining_data, check_pretraining_data, is_pretraining
from megadiff.training.recipe import apply_family_recipe, describe_recipe
from megadiff.training.resume_config import compare_with_checkpoint
from megadiff.training.setup import (
    build_dataset,
    build_model_and_load,
    check_config_fits_model,
    check_initial_weights_fit,
    load_samples,
    load_tokenizer_and_mask_id,
    peft_adapters_for_run,
)
from megadiff.training.step_metrics import (
    LogInterval,
    PendingStep,
    PhaseTimer,
    StepResult,
    global_sums,
    read_steps,
    sum_in_order,
)
from megadiff.training.throughput import active_params, model_flops, peak_tflops, token_counts
from megadiff.training.validation import Validator, build_valid_dataset, read_valid_samples

__all__ = ["NonFiniteLossError", "StepResult", "Trainer", "train"]


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps with a NaN/Inf loss."""


class _Sigterm:
    """Remembers a SIGTERM so the loop can save a checkpoint and exit cleanly."""

    def __init__(self):
        self.received = False
        signal.signal(signal.SIGTERM, self._handler)

    def _handler(self, signum, frame):
        self.received = True


def params_dtype(cfg: TrainingConfig) -> torch.dtype:
    if cfg.model.dtype == "auto":
        return default_params_dtype()  # bf16 on a CUDA run device, fp32 on the CPU
    return torch.bfloat16 if cfg.model.dtype == "bf16" else torch.float32


def build_optimizer(cfg: TrainingConfig, chunks, dtype):
    t = cfg.train
    compat.grad_norm_on_device_without_apex()  # no host read per gradient tensor without apex
    opt_config = optimizer_config(cfg, dtype)
    optimizer = get_megatron_optimizer(opt_config, chunks)
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if t.warmup_steps else t.lr,
        max_lr=t.lr,
        min_lr=t.min_lr,
        lr_warmup_steps=t.warmup_steps,
        lr_decay_steps=max(t.steps, t.warmup_steps + 1),
        lr_decay_style="WSD" if t.lr_schedule == "wsd" else t.lr_schedule,
        wsd_decay_steps=t.lr_decay_steps,  # wsd: megatron-core's warmup-stable-decay
        lr_wsd_decay_style=t.lr_wsd_decay_style,
        start_wd=t.weight_decay,
        end_wd=t.weight_decay,
        wd_incr_steps=t.steps,
        wd_incr_style="constant",
    )
    return optimizer, scheduler


class Trainer:
    """Holds everything one run needs; `run()` trains and returns the per-step results."""

    def __init__(self, cfg: TrainingConfig):

        self.cfg = cfg
        self.log = print_rank0
        check_outputs(cfg)  # every output path writable, before anything is read or built
        self.layout = parallel_layout(cfg)
        self.hf_config = read_hf_config(cfg.model.hf_dir)
        config_name = os.path.join(cfg.model.hf_dir, "config.json")
        self.family = family_for_config(self.hf_config, config_name)  # model_type -> its model family
        self.model_cfg = self.family.config_from_hf(self.hf_config, config_name)
        self.active_params = active_params(self.model_cfg, self.family.mapping)  # FLOPs per token (MFU)
        recipe_filled = apply_family_recipe(cfg, self.family)  # diffusion.* the config left unset
        if recipe_filled:
            self.log(describe_recipe(cfg, self.family, recipe_filled))
        check_config_fits_model(cfg, self.model_cfg, self.layout)
        # Speed options that cannot work here are refused now, not inside the model build.
        self.env = probe_environment()
        stage_layers = self.model_cfg.num_hidden_layers // self.layout.pp
        check_perf(cfg, self.env, stage_layers)
        self.attention = choose_attention_backend(
            cfg, self.env, self.model_cfg.num_attention_heads, stage_layers, params_dtype(cfg).itemsize
        )
        self.log(f"attention: {self.attention.backend} ({self.attention.reason})")
        if self.attention.warning:
            self.log(f"warning: {self.attention.warning}")
        expert_ffn = self.model_cfg.moe_ffn_hidden_size // self.layout.etp
        self.experts = choose_moe_experts(cfg, self.env, self.model_cfg.hidden_size, expert_ffn, params_dtype(cfg))
        self.log(f"routed experts: {self.experts.backend} ({self.experts.reason})")
        # The forecast runs before anything is loaded: a layout that cannot fit stops here.
        check_memory_forecast(cfg, self.model_cfg, self.layout, params_dtype(cfg), self.log)
        check_initial_weights_fit(cfg, self.hf_config)  # shapes from headers / metadata, nothing allocated
        # Cheap checks first: tokenizer and every data row are validated before the model is built.
        self.tokenizer, self.mask_id = load_tokenizer_and_mask_id(cfg, self.model_cfg, self.family)
        dpo = cfg.train.objective == "dpo"
        read_rows, make_dataset = load_samples, build_dataset
        if dpo:
            read_rows, make_dataset = dpo_objective.load_pairs, dpo_objective.build_preference_dataset
        pretraining = is_pretraining(cfg)  # data.blend / data.mock: megatron-core indexed datasets
        if pretraining:
            samples, row_stats = check_pretraining_data(cfg, self.tokenizer, self.model_cfg.vocab_size, self.log)
        else:
            samples, row_stats = read_rows(cfg, self.tokenizer, self.mask_id)
        # What each save records about the data just read, for a resume to compare (resume_config).
        self.data_files = None if pretraining else data_fingerprints(cfg.data.train_files)
        valid_rows = read_valid_samples(cfg, self.tokenizer, self.mask_id)  # data.valid_files
        initial_adapters = peft_adapters_for_run(cfg, self.hf_config, self.log)  # lora.init_from_peft
        # Rank 0 locks, repairs and inspects save_dir before the others can join the process group.
        self._save_dir_lock, resume_from, lora_base, new_data = None, None, None, False
        self.lora_base = None  # a LoRA run with a save_dir: the base its adapter-only checkpoints record
        if cfg.checkpoint.save_dir and int(os.environ.get("RANK", "0")) == 0:
            self._save_dir_lock, resume_from = claim_save_dir(cfg.checkpoint.save_dir, cfg.checkpoint.resume, self.log)
            lora_base = lora_base_for_run(cfg, resume_from)  # checks what it resumes; no weight read yet
            if resume_from is not None:  # this config against the checkpoint's: refused, or which value applies
                ckpt_dir = resolve_checkpoint_dir(cfg.checkpoint.save_dir, resume_from)
                new_data = compare_with_checkpoint(cfg, ckpt_dir, self.hf_config, self.log).new_data
        init_distributed()
        if cfg.checkpoint.save_dir:
            box = [resume_from, lora_base, new_data]
            torch.distributed.broadcast_object_list(box, src=0)
            resume_from, self.lora_base, new_data = box
        initialize_parallel(self.layout, seed=cfg.train.seed)
        self.dp_size, self.dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        self.cp_size, self.cp_rank = ps.get_context_parallel_world_size(), ps.get_context_parallel_rank()
        if pretraining:
            vocab = self.model_cfg.vocab_size
            self.dataset, valid_data, data_stats = build_pretraining_data(
                cfg, self.tokenizer, vocab, self.dp_size, self.dp_rank
            )
            data_stats.update(row_stats)
        else:
            self.dataset, data_stats = make_dataset(cfg, self.tokenizer, samples, row_stats, self.dp_size, self.dp_rank)
            valid_data = build_valid_dataset(cfg, self.tokenizer, valid_rows, self.dp_size, self.dp_rank)
        self.log(f"data: {data_stats}")
        self.phases = run_phases(cfg)  # diffusion.block_schedule, or one phase
        self.validator = Validator(self, valid_data) if valid_data is not None else None
        self.dtype = params_dtype(cfg)
        self.chunks = build_model_and_load(
            cfg,
            self.model_cfg,
            self.hf_config,
            self.layout,
            self.dtype,
            self.log,
            self.attention.backend,
            initial_adapters=initial_adapters,
            moe_experts=self.experts.backend,
        )
        self.optimizer, self.scheduler = build_optimizer(cfg, self.chunks, self.dtype)
        self.log(
            f"optimizer: {optimizer_state_bytes(self.optimizer) / 2**20:.1f} MiB of parameters and Adam state on rank 0"
        )
        self._data_iter = iter(self.dataset)
        self.step = 0  # before the objective: DPO's precomputed reference prepares batches (self.phase)
        self.objective = dpo_objective.DPOObjective(self) if dpo else None  # None: diffusion SFT
        self.nonfinite_in_a_row = 0
        self.skipped_steps = 0
        self.saved_step = None  # the step the newest checkpoint of save_dir holds
        self._logger = None  # the run's MetricsLogger while run() runs (validation logs to it)
        if resume_from is not None:
            self._resume(resume_from, new_data)

    # ---- checkpoints ---------------------------------------------------------------------------

    def _sharded_state_dict(self, is_loading: bool = False):
        state = model_sharded_state_dict(self.chunks)
        if self.lora_base is not None:  # adapter-only: the frozen base is not saved
            state = adapter_sharded_state_dict(self.chunks, state)
        # dp_reshardable: parallel save/load with no gathering; the optimizer state then resumes
        # only at the same TP/EP/PP layout (any DP). fully_reshardable gathers on DP rank 0.
        sharding = "fully_reshardable" if self.cfg.checkpoint.fully_reshardable_optimizer else "dp_reshardable"
        state["optimizer"] = self.optimizer.sharded_state_dict(
            state, is_loading=is_loading, metadata={"distrib_optim_sharding_type": sharding}
        )
        state["scheduler"] = self.scheduler.state_dict()
        state["data"] = self.dataset.state_dict()
        state["trainer"] = {"step": self.step, "skipped_steps": self.skipped_steps}
        state["rng"] = {"torch": torch.get_rng_state()}
        return state

    def save(self) -> str:
        ck = self.cfg.checkpoint
        if self.validator is not None and (self.validator.last or (None,))[0] != self.step:
            self.validate()  # megadiff.json records the valid_loss of the weights it holds
        meta = {
            "hf_config": as_llada2_config(self.hf_config, self.mask_id),  # a Ling-2.0 start becomes LLaDA2
            "hf_source_dir": os.path.abspath(self.cfg.model.hf_dir),
            "layout": vars(self.layout),
            "dtype": str(self.dtype).replace("torch.", ""),
            "extra": {
                "training_config": self.cfg.to_dict(),
                "data_files": self.data_files,
                "step": self.step,
                **self._phase_and_validation(),
            },
        }
        if self.lora_base is not None:
            meta["lora"] = adapter_meta(lora_settings(self.cfg), self.lora_base)
        sharded = self._sharded_state_dict()
        needed = checkpoint_bytes(sharded)
        no_space = no_space_error(ck.save_dir, needed)  # checked before writing (rank 0 decides)
        if no_space:
            raise no_space
        try:
            path = save_checkpoint(ck.save_dir, self.step, sharded, meta)
        except Exception as e:  # a full disk shows as e.g. torch's "unexpected pos 704 vs 598"
            no_space = no_space_error(ck.save_dir, needed, error=e)
            if no_space:
                raise no_space from e
            raise
        self.saved_step = self.step
        prune_checkpoints(ck.save_dir, keep_last=ck.keep_last)
        self.log(f"saved checkpoint {path}")
        return path

    def _resume(self, iteration: int, new_data: bool = False):
        """Load iteration `iteration` of save_dir. The LR schedule takes this run's config values
        from the resumed step on (compared and reported by resume_config); `new_data`: the data
        position is not restored (checkpoint.allow_new_data with changed data)."""
        root = self.cfg.checkpoint.save_dir
        initialise_optimizer_state(self.optimizer)
        trust = self.cfg.checkpoint.trust_checkpoint
        sharded = self._sharded_state_dict(is_loading=True)
        check_optimizer_layout(resolve_checkpoint_dir(root, iteration), sharded, self.layout, trust=trust)
        state, _ = load_checkpoint(root, sharded, iteration=iteration, trust=trust)

        align_saved_schedule_values(self.optimizer, state["optimizer"])  # a changed train.lr (mcore 0.19)
        with torch.no_grad():  # fp32 main params are views of the model's leaf params
            apply_model_state(self.chunks, state, adapters_only=self.lora_base is not None)
            self.optimizer.load_state_dict(state["optimizer"])
        restore_adam_steps(self.optimizer, state["optimizer"])
        self.scheduler.override_opt_param_scheduler = True  # this run's lr, warmup, steps...; the saved step
        self.scheduler.load_state_dict(state["scheduler"])
        if not new_data:
            self.dataset.load_state_dict(state["data"])
        self.step = int(state["trainer"]["step"])
        self.skipped_steps = int(state["trainer"]["skipped_steps"])
        torch.set_rng_state(state["rng"]["torch"])
        self.saved_step = self.step
        self.log(f"resumed from {root} at step {self.step}")

    # ---- one step ------------------------------------------------------------------------------

    def _micro_batches(self) -> list[dict]:
        return self.prepare_micro_batches(self._data_iter)

    def prepare_micro_batches(
        self, data_iter, diffusion=None, seed: int | None = None, step: int | None = -1
    ) -> list[dict]:
        """One step's micro-batches from `data_iter`, noised on the host, with what the step counts
        of them computed there too (loss denominator, real tokens, FLOPs: reading them on the run
        device would wait for it), then moved to the run device (inputs, masks, targets; BlockMasks
        are built there). `diffusion`: default the current phase's; `seed`: of the noise (default
        train.seed); `step`: whose embedding noise to add (-1: the current step's, None: none)."""
        d = diffusion or self.diffusion
        seed = self.cfg.train.seed if seed is None else seed
        step = self.step if step == -1 else step
        dense = self.attention.backend == "dense"
        batches = []
        for _ in range(self.dataset.accumulation_steps):
            raw = next(data_iter)
            prepared = prepare_micro_batch(raw, d, self.mask_id, seed, with_dense_mask=dense)
            prepared.update({k: raw[k] for k in ("response_slot", "pair_ids", "epoch") if k in raw})  # DPO pairs
            if step is not None and noise_active(d, step):  # diffusion.mask_embedding_noise
                noise = d.mask_embedding_noise
                prepared["embedding_noise"] = embedding_noise(
                    prepared, raw, self.model_cfg.hidden_size, noise["std"], seed, step
                )
            if "pair_ids" in raw:  # the precomputed DPO reference is looked up by these, on the host
                prepared["pair_keys"] = (int(raw["epoch"][0]), raw["pair_ids"].tolist())
            real, pairs = (
                int(n) for n in token_counts(prepared["doc_ids"], prepared["sample_ids"], d.mode, d.block_size)
            )
            prepared["real_tokens"] = real
            prepared["flops"] = model_flops(
                self.model_cfg, real, pairs, d.mode, self.cfg.perf.xt_only_logits, self.active_params
            )
            prepared = split_micro_batch(prepared, d.mode, self.cp_size, self.cp_rank)  # this CP rank's part
            prepared["loss_denominator"] = loss_denominator_share(prepared, d.normalize)
            prepared = to_run_device(prepared)
            if not dense:
                # flex attention imports TorchDynamo (seconds); only the flex backend pays that
                from megadiff.diffusion.block_mask import block_mask_for

                mode = "full" if d.mode == "full" else "bd"
                doc_ids = prepared["doc_ids"]  # 2B rows with complementary masks
                positions = prepared["position_ids"][:, : doc_ids.shape[1]]
                prepared["allowed"] = block_mask_for(
                    doc_ids, positions, mode, d.block_size, prepared["input_ids"].device, self.cp_size, self.cp_rank
                )
            batches.append(prepared)
        return batches

    def forward_backward_step(self, micro: list[dict]):
        """Loss of the global batch (all DP ranks) and its gradients in the DDP grad buffers.
        Returns (loss, real tokens of the global batch), read to the host (the trainer's own step
        keeps them on the device: device_forward_backward)."""
        values = self.device_forward_backward(micro)
        return float(values["loss"]), int(values["tokens"])

    def device_forward_backward(self, micro: list[dict]) -> dict[str, torch.Tensor]:
        """Forward/backward of the global batch; returns its loss, real tokens and FLOPs as 0-dim
        tensors on the run device, summed over every rank (step_metrics.global_sums)."""
        d = self.diffusion
        set_xt_only_logits(self.chunks, d.mode == BLOCK_DIFFUSION)  # a full phase feeds x_t only
        # Loss sums of DP ranks and of the CP ranks that split each row add up (context_parallel.py):
        # each micro-batch's "loss_denominator" is this rank's share.
        denominator = torch.stack([b["loss_denominator"] for b in micro]).sum()
        torch.distributed.all_reduce(denominator, group=ps.get_data_parallel_group(with_context_parallel=True))
        # 1 / denominator in float64, rounded to the loss's float32 (as a Python float would be)
        scale = torch.where(denominator > 0, 1.0 / denominator, 0.0).float()

        def loss_fn(batch, output):
            sums = diffusion_loss_sums(output, batch, d)
            loss = (sums["numerator"] + d.confidence_beta * sums["cap_numerator"]) * scale
            # num_tokens 0: the loss is already divided by the global denominator, so
            # finalize_model_grads must not rescale; DP gradients are summed.
            return loss, torch.zeros((), dtype=torch.int, device=loss.device), {"loss": loss.detach().clone()}

        for chunk in self.chunks:
            chunk.train()
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        outputs = forward_backward(self.chunks, micro, loss_fn)
        return global_sums({"loss": sum_in_order([o["loss"] for o in outputs])}, micro)

    def train_step(self) -> StepResult:
        """One step, its values read at once (tests, benchmarks); run() reads them once per log
        interval instead."""
        return read_steps([self.step_on_device()])[0]

    def step_on_device(self) -> PendingStep:
        """One optimizer step (or a skipped one); its loss, tokens and FLOPs stay on the device.
        The host reads whether the loss is finite (every rank agrees: it is all-reduced)."""
        # the block-schedule phase of this step; a run without a schedule has one phase, and its
        # step lines and metrics stay as they were (no 'phase' field)
        phase = self.phase.name if self.cfg.diffusion.block_schedule else None
        timer = PhaseTimer(self.cfg.logging.timers)
        micro = self._micro_batches()
        timer.lap("data_s")
        if self.objective is not None:
            values, metric_names = self.objective.device_forward_backward(micro), dpo_objective.METRICS
        else:
            values, metric_names = self.device_forward_backward(micro), ()
        timer.lap("fwd_bwd_s")
        self.step += 1
        if not bool(torch.isfinite(values["loss"])):  # the step's one read of its own
            self.nonfinite_in_a_row += 1
            self.skipped_steps += 1
            loss = float(values["loss"])
            self.log(f"step {self.step}: loss is {loss}; step skipped ({self.nonfinite_in_a_row} in a row)")
            if self.nonfinite_in_a_row >= self.cfg.train.max_consecutive_nonfinite:
                raise NonFiniteLossError(
                    f"{self.nonfinite_in_a_row} consecutive steps with a non-finite loss; stopping "
                    f"(train.max_consecutive_nonfinite={self.cfg.train.max_consecutive_nonfinite})"
                )
            timer.lap("optimizer_s", seconds=0.0)
            return PendingStep(self.step, self._lr(), None, True, values, metric_names, timer.times, phase)
        self.nonfinite_in_a_row = 0
        _, grad_norm, _ = self.optimizer.step()  # megatron-core reads the gradient norm to clip
        self.scheduler.step(increment=1)
        timer.lap("optimizer_s")
        return PendingStep(self.step, self._lr(), grad_norm, False, values, metric_names, timer.times, phase)

    def _lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    # ---- block schedule and validation (megadiff.training.phases, megadiff.training.validation) ---

    @property
    def phase(self):
        """The phase of the step about to run (of the last one once the run is over)."""
        return phase_at(self.phases, min(self.step, self.cfg.train.steps - 1))

    @property
    def diffusion(self):
        """The diffusion section as the current phase trains it (its mode and block size)."""
        return phase_diffusion(self.cfg.diffusion, self.phase)

    def validate(self) -> float:
        """The validation loss now, at the phase of the last step trained; logged and remembered."""
        phase = phase_at(self.phases, max(self.step - 1, 0))
        d = phase_diffusion(self.cfg.diffusion, phase)
        set_xt_only_logits(self.chunks, d.mode == BLOCK_DIFFUSION)
        loss = self.validator.measure(d)
        self.validator.last = (self.step, loss, phase.name)
        if self._logger is not None:
            self._logger.log_validation(self.step, loss, phase.name)
        else:
            self.log(f"validation at step {self.step} (phase {phase.name}): valid_loss {loss:.4f}")
        return loss

    def _phase_and_validation(self) -> dict:
        """What megadiff.json records about the schedule and validation at this step."""
        out = {"phase": phase_at(self.phases, max(self.step - 1, 0)).record()}
        if self.validator is not None and self.validator.last and self.validator.last[0] == self.step:
            out["valid_loss"] = self.validator.last[1]
        return out

    # ---- the run -------------------------------------------------------------------------------

    def run(self) -> list[StepResult]:
        cfg = self.cfg
        sigterm = _Sigterm()
        results = []
        precision = "fp8" if cfg.perf.fp8 != "off" else "bf16"
        logger = MetricsLogger(
            cfg,
            total_steps=cfg.train.steps,
            initial_step=self.step,
            world_size=torch.distributed.get_world_size(),
            peak_tflops=peak_tflops(self.env.gpu_name, precision) if self.env.on_cuda else None,
        )
        self._logger = logger
        interval = LogInterval(logger, results, self.step + 1, cfg.train.steps, cfg.logging.log_interval)
        try:
            while self.step < cfg.train.steps:
                try:
                    interval.add(self.step_on_device())
                except NonFiniteLossError:
                    interval.log()
                    raise
                if self.validator is not None and self.validator.due(self.step):
                    interval.log()  # the step's line before its validation line (validation reads anyway)
                    self.validate()
                ck = cfg.checkpoint
                if sigterm.received:
                    interval.log()
                    self.log(f"SIGTERM at step {self.step}: saving a checkpoint and exiting")
                    self._save_unless_saved()
                    break
                if (
                    ck.save_dir
                    and ck.save_interval
                    and self.step % ck.save_interval == 0
                    and self.step < cfg.train.steps
                ):
                    self.save()
            else:
                self._save_unless_saved()  # a relaunch of a finished run trains nothing and saves nothing
        finally:
            self._logger = None
            logger.close()
            self.close()
        return results

    def _save_unless_saved(self) -> None:
        if self.cfg.checkpoint.save_dir and self.step != self.saved_step:
            self.save()

    def close(self) -> None:
        """Release the save_dir for the next run (also released when the process ends)."""
        if self._save_dir_lock is not None:
            self._save_dir_lock.release()
            self._save_dir_lock = None


def train(cfg: TrainingConfig) -> list[StepResult]:
    return Trainer(cfg).run()
