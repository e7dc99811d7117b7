"""Continued-pretraining data for the trainer (data.blend or data.mock instead of data.train_files).

Two steps, like the SFT path's: `check_pretraining_data` runs before any process group or model exists
(each dataset of the blend: both files, the index, the .bin's length, every token id below the
vocabulary; megadiff.data.indexed), and `build_pretraining_data` then builds megatron-core's datasets
(collective: rank 0 writes the sample-index cache, the others read it) as this rank's PretrainDataset
for training and, with train.eval_interval, for validation (the blend's valid split).

The index cache goes to data.index_cache_dir, by default `SAVE_DIR-index-cache` beside the
checkpoint dir, and never next to the data (megatron-core's own default), which may be read-only or
shared by other runs.
"""

import os

from megadiff.data.indexed import check_indexed_dataset, parse_blend
from megadiff.data.pretrain import PretrainDataset, build_gpt_datasets
from megadiff.training.config import TrainingConfig, TrainingConfigError
from megadiff.training.preflight import check_writable_dir


def is_pretraining(cfg: TrainingConfig) -> bool:
    return bool(cfg.data.blend or cfg.data.mock)


def index_cache_dir(cfg: TrainingConfig) -> str | None:
    """data.index_cache_dir, else SAVE_DIR-index-cache beside checkpoint.save_dir (None: neither)."""
    if cfg.data.index_cache_dir:
        return cfg.data.index_cache_dir
    if cfg.checkpoint.save_dir:
        return os.path.normpath(os.path.abspath(cfg.checkpoint.save_dir)) + "-index-cache"
    return None


def end_of_document_id(tokenizer, vocab_size: int) -> int:
    eod = tokenizer.eos_token_id
    if eod is None or not 0 <= eod < vocab_size:
        raise TrainingConfigError(
            f"the tokenizer's EOS id {eod} cannot end documents in a vocabulary of {vocab_size}; the indexed data "
            f"needs the EOD its preprocessing appended (tools/preprocess_data.py uses the tokenizer's EOS)"
        )
    return eod


def check_pretraining_data(cfg: TrainingConfig, tokenizer, vocab_size: int, log=print) -> tuple[None, dict]:
    """Everything about the blend that can be checked before the model is built; returns (None,
    stats) as the SFT path's row reader returns (samples, stats)."""
    end_of_document_id(tokenizer, vocab_size)
    if cfg.data.mock:
        return None, {"source": "megatron-core mock samples"}
    cache = index_cache_dir(cfg)
    if cache is None:
        raise TrainingConfigError(
            "data.blend: megatron-core keeps each dataset's sample index on disk; set checkpoint.save_dir "
            "(it goes to SAVE_DIR-index-cache) or data.index_cache_dir"
        )
    check_writable_dir("data.index_cache_dir", cache)
    prefixes, weights = parse_blend(cfg.data.blend)
    stats = {"datasets": len(prefixes), "documents": 0, "tokens": 0, "index_cache_dir": cache}
    for prefix in prefixes:
        found = check_indexed_dataset(prefix, vocab_size, cache, log)
        stats["documents"] += found["documents"]
        stats["tokens"] += found["tokens"]
    return None, stats


def build_pretraining_data(cfg: TrainingConfig, tokenizer, vocab_size: int, dp_size: int, dp_rank: int):
    """(train PretrainDataset, validation PretrainDataset or None, summary) for this DP rank."""
    t = cfg.train
    eod = end_of_document_id(tokenizer, vocab_size)
    blend = None if cfg.data.mock else parse_blend(cfg.data.blend)
    valid_samples = t.eval_iters * t.global_batch_size if t.eval_interval else 0
    train, valid = build_gpt_datasets(
        blend,
        cfg.data.split,
        cfg.data.max_seq_len,
        cfg.train.seed,
        vocab_size,
        eod,
        t.steps * t.global_batch_size,
        valid_samples,
        None if cfg.data.mock else index_cache_dir(cfg),
    )

    def serve(samples):
        return PretrainDataset(
            samples,
            eod_id=eod,
            max_seq_len=cfg.data.max_seq_len,
            global_batch_size=t.global_batch_size,
            micro_batch_size=t.micro_batch_size,
            dp_size=dp_size,
            dp_rank=dp_rank,
        )

    summary = {"train_samples": len(train), "valid_samples": len(valid) if valid is not None else 0, "eod": eod}
    return serve(train), (serve(valid) if valid is not None else None), summary
