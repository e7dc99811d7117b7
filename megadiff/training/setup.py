"""Build what a training run needs, cheapest and most error-prone first: tokenizer, data, model."""

import math
import os

from megadiff.checkpoint import format as fmt
from megadiff.checkpoint import load_model_weights
from megadiff.checkpoint.hf_tensors import check_stored_shapes
from megadiff.checkpoint.untrusted import read_dcp_metadata
from megadiff.data.dataset import SFTDataset
from megadiff.data.rows import read_sft_rows
from megadiff.data.tokenize import pad_answers_to_block, tokenize_rows
from megadiff.errors import ConfigError
from megadiff.hf.checkpoint_reader import HFCheckpointReader, check_tensors_match
from megadiff.hf.tokenizer import MASK_TOKEN, TOKENIZER_FILES, TokenizerError, load_local_tokenizer, mask_token_id
from megadiff.lora.apply import apply_lora
from megadiff.lora.base_record import base_of_run
from megadiff.lora.init_from_peft import adapter_for_run
from megadiff.lora.state import load_full_adapter_state
from megadiff.models.common.hf_weights import load_hf_into_model
from megadiff.models.registry import family_for_config
from megadiff.training.config import TrainingConfig, TrainingConfigError, config_spelling
from megadiff.training.ddp import wrap_ddp
from megadiff.training.mcore_configs import ddp_config, transformer_overrides
from megadiff.training.phases import uses_block_diffusion


def check_config_fits_model(cfg: TrainingConfig, model_cfg, layout) -> None:
    """Raise naming the config key when the model (its config.json) cannot run this config: a layout
    that does not divide it, or rows longer than its position range. Block diffusion feeds
    [x_t ; x_0] (2S tokens) but both halves use positions 0..S-1, so S is what must fit."""
    try:
        model_cfg.validate_layout(layout)
    except ConfigError as e:
        raise ConfigError(config_spelling(str(e))) from None
    check_layout_fits_processes(layout, int(os.environ.get("WORLD_SIZE", "1")))
    if cfg.data.max_seq_len > model_cfg.max_position_embeddings:
        raise TrainingConfigError(
            f"data.max_seq_len={cfg.data.max_seq_len} is above max_position_embeddings="
            f"{model_cfg.max_position_embeddings} of {model_cfg.source}; the model has no positions beyond "
            f"that, so lower data.max_seq_len"
        )


def check_initial_weights_fit(cfg: TrainingConfig, hf_config: dict) -> None:
    """The run's starting weights (model.init_from_mcore, else model.hf_dir's) fit model.hf_dir's
    config.json (`check_weights_fit`)."""
    check_weights_fit(cfg.model.hf_dir, hf_config, cfg.model.init_from_mcore, cfg.checkpoint.trust_checkpoint)


def check_weights_fit(hf_dir: str, hf_config: dict, mcore_dir: str | None = None, trust: bool = False) -> None:
    """Before anything is allocated: the weights (the megatron checkpoint `mcore_dir`, else
    `hf_dir`'s safetensors) hold every tensor `hf_config` (hf_dir's config.json) implies, with its
    shape, read from the safetensors headers / the checkpoint's metadata. A config.json describing a
    far larger model than the weights is refused here, not after a model was built for it."""
    config_name = f"{os.path.join(hf_dir, 'config.json')}"
    if not mcore_dir:
        reader = HFCheckpointReader(hf_dir)
        family = family_for_config(hf_config, config_name)
        names = reader.names()
        unused = family.hf_format.unused_tensors(hf_config, names)  # e.g. an autoregressive Ling-2.0's MTP layers
        check_tensors_match(reader, family.hf_format.expected_shapes(family, hf_config, names, hf_dir), ignore=unused)
        return
    if not os.path.exists(mcore_dir):
        return  # reported where the run loads it, with what it was for (a LoRA run's base: its record)
    ckpt_dir = fmt.resolve_checkpoint_dir(mcore_dir)
    meta = fmt.read_meta(ckpt_dir)
    if meta.get("lora"):
        return  # adapters only: the loader says so (format.adapter_only_error)
    metadata = read_dcp_metadata(ckpt_dir, trust)
    stored = {k: tuple(v.size) for k, v in metadata.state_dict_metadata.items() if hasattr(v, "size")}
    check_stored_shapes(ckpt_dir, stored, hf_config, meta, config_name)


def check_layout_fits_processes(layout, world: int) -> None:
    """Raise naming the parallel.* keys when `world` processes (torchrun's WORLD_SIZE) cannot hold
    the layout: megatron-core needs tp*cp*pp | world and ep*etp | world/pp. Checked before any process
    group exists (platform.initialize_parallel would refuse too, but in its own terms)."""
    model_parallel, expert_parallel = layout.tp * layout.cp * layout.pp, layout.ep * layout.etp * layout.pp
    if world % model_parallel == 0 and world % expert_parallel == 0:
        return
    need = math.lcm(model_parallel, expert_parallel)
    cp = f"parallel.cp={layout.cp}, " if layout.cp > 1 else ""
    raise TrainingConfigError(
        f"parallel.tp={layout.tp}, {cp}parallel.pp={layout.pp}, parallel.ep={layout.ep}, parallel.etp={layout.etp} "
        f"need a multiple of {need} processes (tp*cp*pp and ep*etp*pp must divide it), but {world} were started; "
        f"launch a multiple of {need} (torchrun --nproc-per-node) or change parallel.*"
    )


def load_tokenizer_and_mask_id(cfg: TrainingConfig, model_cfg, family=None):
    """The run's tokenizer and diffusion mask id: model.mask_token_id, else the id of the model
    family's mask token (TokenizerFacts.mask_token; no `family`: `<|mask|>`, LLaDA2's)."""
    mask_token = family.tokenizer.mask_token if family is not None else MASK_TOKEN
    tokenizer_dir = cfg.model.tokenizer_dir or cfg.model.hf_dir
    key = "model.tokenizer_dir" if cfg.model.tokenizer_dir else "model.hf_dir"
    if not any(os.path.isfile(os.path.join(tokenizer_dir, f)) for f in TOKENIZER_FILES):
        raise TokenizerError(
            f"{tokenizer_dir}: cannot load the tokenizer: none of {', '.join(TOKENIZER_FILES)} "
            f"is there; point {key} at the model's tokenizer"
        )
    try:
        tokenizer = load_local_tokenizer(tokenizer_dir)  # never runs code from the dir
    except TokenizerError:
        raise
    except Exception as e:  # transformers raises several types for a missing/broken tokenizer
        reason = " ".join(str(e).split())  # one line: transformers' messages span several
        raise TokenizerError(f"{tokenizer_dir}: cannot load the tokenizer ({reason})") from None
    try:
        mask_id = mask_token_id(tokenizer, cfg.model.mask_token_id, mask_token)
    except TokenizerError:  # an autoregressive model's tokenizer (Ling-2.0) has no diffusion mask token
        raise TokenizerError(
            f"{tokenizer_dir}: the tokenizer has no '{mask_token}' token (an autoregressive model's, e.g. Ling-2.0); "
            f"set model.mask_token_id to the token id that diffusion is to use as its mask (an unused or reserved "
            f"token of the vocabulary)"
        ) from None
    if mask_id in (tokenizer.eos_token_id, tokenizer.pad_token_id):
        raise TokenizerError(
            f"model.mask_token_id={mask_id} is the tokenizer's EOS / pad token, which the data holds; choose "
            f"another id for the diffusion mask"
        )
    if not 0 <= mask_id < model_cfg.vocab_size:
        raise TokenizerError(
            f"mask token id {mask_id} is outside the model vocabulary ({model_cfg.vocab_size} "
            f"in {model_cfg.source}); fix model.mask_token_id"
        )
    return tokenizer, mask_id


def load_samples(cfg: TrainingConfig, tokenizer, mask_id: int):
    """Read, validate and tokenise every SFT row (malformed input stops here, before any
    process group or model exists)."""
    rows, stats = read_sft_rows(cfg.data.train_files, skip_bad_rows=cfg.data.skip_bad_rows)
    samples = tokenize_rows(rows, tokenizer, mask_id)
    if cfg.data.pad_answers_to_block:
        samples = pad_answers_to_block(samples, tokenizer.eos_token_id, cfg.diffusion.block_size)
    return samples, stats


def build_dataset(cfg: TrainingConfig, tokenizer, samples, stats, dp_size: int, dp_rank: int):
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    dataset = SFTDataset(
        samples,
        max_seq_len=cfg.data.max_seq_len,
        pad_id=pad_id,
        global_batch_size=cfg.train.global_batch_size,
        micro_batch_size=cfg.train.micro_batch_size,
        dp_size=dp_size,
        dp_rank=dp_rank,
        seed=cfg.train.seed,
        mode=cfg.data.mode,
        truncation=cfg.data.truncation,
    )
    summary = {
        **{k: v for k, v in dataset.stats.items() if isinstance(v, (int, float))},
        "sft_rows": stats.get("rows_kept"),
        "skipped_bad_rows": stats.get("rows_skipped"),
        "packed_rows": len(dataset.plans),
    }
    return dataset, summary


def build_model_and_load(
    cfg: TrainingConfig,
    model_cfg,
    hf_config: dict,
    layout,
    dtype,
    log,
    attention_backend: str | None = None,
    initial_adapters: dict | None = None,
    moe_experts: str | None = None,
):
    """Model chunks for this rank with their initial weights, wrapped in megatron-core DDP.
    attention_backend: the resolved one (perf_preflight.choose_attention_backend); default: the
    config's, which must then not be auto. initial_adapters: a LoRA run's starting adapters (full
    adapter state, peft_adapters_for_run) instead of freshly drawn ones. moe_experts: the resolved
    routed experts (perf_preflight.choose_moe_experts); default: the config's perf.moe_experts."""
    chunks = build_model_with_initial_weights(
        cfg, model_cfg, hf_config, layout, dtype, log, attention_backend, moe_experts=moe_experts
    )
    if cfg.lora.enabled:
        add_lora_adapters(cfg, chunks, log, initial_adapters)
    # megatron-core DDP buckets only trainable params; the trainer's losses are already divided by
    # the step's global denominator (their loss functions return 0 tokens)
    return wrap_ddp(chunks, ddp_config=ddp_config(cfg), divide_by_tokens=False)


def add_lora_adapters(cfg: TrainingConfig, chunks, log, initial_adapters: dict | None = None) -> None:
    """Freeze the base and adapt cfg.lora's targets (before DDP and the optimizer exist); the
    adapters start from `initial_adapters` when given."""
    names = apply_lora(chunks, **cfg.lora.adapter_config())
    if initial_adapters is not None:
        load_full_adapter_state(chunks, initial_adapters)
    params = [p for chunk in chunks for p in chunk.parameters()]
    trainable = sum(p.numel() for p in params if p.requires_grad)
    log(
        f"lora: rank {cfg.lora.rank}, alpha {cfg.lora.alpha}, {len(names)} adapted linears on rank 0; trainable "
        f"parameters {trainable:,} of {sum(p.numel() for p in params):,} on rank 0"
    )


def peft_adapters_for_run(cfg: TrainingConfig, hf_config: dict, log) -> dict | None:
    """The full adapter state of lora.init_from_peft (None when unset), checked against the lora
    section and the run's base before any model exists: a mismatch is an error naming the field."""
    if not (cfg.lora.enabled and cfg.lora.init_from_peft):
        return None
    base = base_of_run(cfg.model.hf_dir, cfg.model.init_from_mcore)
    full, base_note = adapter_for_run(cfg.lora.init_from_peft, cfg.lora.adapter_config(), hf_config, base)
    log(f"lora: adapters start from the PEFT adapter {os.path.abspath(cfg.lora.init_from_peft)} ({base_note})")
    return full


def build_model(family, model_cfg, layout, **kwargs):
    """This rank's model chunks of `family` (ModelFamily.build_model's arguments)."""
    return family.build_model(model_cfg, layout, **kwargs)


def build_model_with_initial_weights(
    cfg: TrainingConfig,
    model_cfg,
    hf_config: dict,
    layout,
    dtype,
    log,
    attention_backend: str | None = None,
    moe_experts: str | None = None,
):
    """Model chunks for this rank holding the run's starting weights (hf_dir or init_from_mcore)."""
    family = family_for_config(hf_config, os.path.join(cfg.model.hf_dir, "config.json"))
    chunks = build_model(
        family,
        model_cfg,
        layout,
        params_dtype=dtype,
        use_te=False if cfg.lora.enabled else None,  # LoRA adapts the local spec's torch linears only
        attention_backend=attention_backend or cfg.model.attention_backend,
        xt_only_logits=cfg.perf.xt_only_logits and uses_block_diffusion(cfg),
        moe_experts=moe_experts or cfg.perf.moe_experts,
        calculate_per_token_loss=True,
        **transformer_overrides(cfg),
    )
    if cfg.model.init_from_mcore:
        load_model_weights(cfg.model.init_from_mcore, chunks, trust=cfg.checkpoint.trust_checkpoint)
        log(f"initial weights: megatron checkpoint {cfg.model.init_from_mcore}")
    else:
        reader = HFCheckpointReader(cfg.model.hf_dir)  # shapes checked before the build (check_initial_weights_fit)
        unused = family.hf_format.unused_tensors(hf_config, reader.names())  # an autoregressive Ling-2.0's MTP layers
        if unused:
            log(
                f"{len(unused)} multi-token-prediction tensors of {cfg.model.hf_dir} are not used (diffusion has no MTP)"
            )
        get_hf = family.hf_format.tensor_getter(reader, cfg.model.hf_dir)
        load_hf_into_model(chunks, get_hf, family.mapping, model_cfg)
        log(f"initial weights: HF {os.path.abspath(cfg.model.hf_dir)}")
    return chunks
