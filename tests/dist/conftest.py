"""Continued-pretraining inputs for the dist tests, built once per session: the tiny model's corpus
tokenized by tools/preprocess_data.py's library, a second dataset written directly by megatron-core's
IndexedDatasetBuilder (as Megatron-LM's own preprocessing writes them), and a config blending both."""

import json

import pytest


def write_text_corpus(path, rows: int, seed: int) -> None:
    """A jsonl of {"text": ...} documents: arithmetic word problems and their worked answers."""
    from megadiff.data.synthetic import arithmetic_problems

    with open(path, "w") as f:
        for row in arithmetic_problems(rows, seed=seed):
            f.write(json.dumps({"text": row["question"] + "\n" + row["answer"]}) + "\n")


def write_with_megatron_builder(prefix: str, documents: int, vocab: int, eod: int, seed: int) -> None:
    """Random documents of 5..40 ids below `vocab`, each ended by `eod`, through megatron-core alone."""
    import numpy
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = numpy.random.default_rng(seed)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=numpy.uint16)
    for _ in range(documents):
        ids = rng.integers(0, vocab, size=int(rng.integers(5, 40))).tolist() + [eod]
        builder.add_document(torch.tensor(ids), [len(ids)])
    builder.finalize(prefix + ".idx")


@pytest.fixture(scope="session")
def cpt_run_dir(tiny_run_dir, tmp_path_factory):
    from megadiff.data.preprocess import load_tokenizer, preprocess

    root = tmp_path_factory.mktemp("cpt")
    hf = tiny_run_dir / "hf"
    write_text_corpus(root / "corpus.jsonl", 300, seed=5)
    preprocess([str(root / "corpus.jsonl")], str(root / "corpus"), str(hf), progress=False)
    tokenizer = load_tokenizer(str(hf))
    eod = tokenizer.eos_token_id
    mask = tokenizer.convert_tokens_to_ids("<|mask|>")
    write_with_megatron_builder(str(root / "direct"), 200, min(mask, eod), eod, seed=6)
    (root / "cfg.yaml").write_text(
        f"model: {{hf_dir: {hf}}}\n"
        f"data: {{blend: [0.6, {root / 'corpus'}, 0.4, {root / 'direct'}], max_seq_len: 64, split: '90,10,0', "
        f"index_cache_dir: {root / 'index_cache'}}}\n"
        "train: {steps: 6, global_batch_size: 4, micro_batch_size: 1, lr: 1.0e-3, lr_schedule: wsd, "
        "warmup_steps: 1, lr_decay_steps: 2}\n"
        "diffusion: {loss_weight: inverse_t, normalize: answer_tokens, t_low: 0.05, t_high: 1.0, block_schedule: "
        "[{steps: 2, block_size: 1}, {steps: 3, block_size: 4}, {steps: 1, mode: full}]}\n"
        "logging: {progress_bar: false}\n"
    )
    return root
