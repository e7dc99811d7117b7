"""Megatron indexed data for continued pretraining: tools/preprocess_data.py's output, megatron-core's
datasets over it (blend weights, splits) and the rows the trainer makes of their samples."""

import json

import numpy
import pytest
import torch

from megadiff.data.pretrain import PretrainDataset, build_gpt_datasets, document_row
from megadiff.data.tokenize import encode_text

TEXTS = [
    "Natalia sold 48 clips in April.",
    "A text that spells <|mask|> and <role>HUMAN</role> as plain text.",
    "",  # empty: skipped, as Megatron-LM does
    "Unicode: naïve café — 3.14\nsecond line",
]


def write_jsonl(path, texts, key="text"):
    with open(path, "w") as f:
        for text in texts:
            f.write(json.dumps({key: text, "other": 1}) + "\n")


@pytest.fixture(scope="module")
def tokenizer_dir(tiny_run_dir):
    return str(tiny_run_dir / "hf")


@pytest.fixture(scope="module")
def corpus(tokenizer_dir, tmp_path_factory):
    """The synthetic arithmetic corpus, preprocessed with two workers into one indexed dataset."""
    from megadiff.data.synthetic import arithmetic_problems
    from tools.preprocess_data import main

    root = tmp_path_factory.mktemp("indexed")
    texts = [r["question"] + "\n" + r["answer"] for r in arithmetic_problems(400, seed=9)]
    write_jsonl(root / "a.jsonl", texts[:200])
    write_jsonl(root / "b.jsonl", texts[200:])
    argv = ["--input", str(root), "--output-prefix", str(root / "corpus"), "--tokenizer", tokenizer_dir]
    assert main([*argv, "--workers", "2", "--no-progress"]) == 0
    return root, texts


def test_preprocessed_documents_read_back_as_tokenizer_ids_plus_eod(tokenizer_dir, tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from transformers import AutoTokenizer

    from tools.preprocess_data import main

    write_jsonl(tmp_path / "one.jsonl", TEXTS[:2])
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow

    pq.write_table(pyarrow.table({"text": TEXTS[2:]}), tmp_path / "two.parquet")
    prefix = tmp_path / "out" / "docs"
    inputs = [str(tmp_path / "one.jsonl"), str(tmp_path / "two.parquet")]
    assert (
        main(["--input", *inputs, "--output-prefix", str(prefix), "--tokenizer", tokenizer_dir, "--no-progress"]) == 0
    )
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    want = [encode_text(t, tokenizer) + [tokenizer.eos_token_id] for t in TEXTS if t]
    dataset = IndexedDataset(str(prefix))
    assert [dataset[i].tolist() for i in range(len(dataset))] == want
    assert numpy.dtype(dataset.index.dtype) == numpy.uint16  # a vocabulary under 65 500
    mask = tokenizer.convert_tokens_to_ids("<|mask|>")
    assert mask not in sum(want, [])  # special-token text stays text
    # an existing output is never replaced without --overwrite
    assert main(["--input", *inputs, "--output-prefix", str(prefix), "--tokenizer", tokenizer_dir]) == 2


def test_a_vocabulary_over_65535_ids_is_stored_as_int32(tokenizer_dir, tmp_path, monkeypatch):
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from transformers import AutoTokenizer

    import megadiff.data.preprocess as preprocess

    class Large:  # the tiny tokenizer, claiming LLaDA2's 157 184 ids and a high EOS
        def __init__(self, inner):
            self.inner, self.eos_token_id = inner, 156892

        def __len__(self):
            return 157184

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def __call__(self, *args, **kwargs):
            return self.inner(*args, **kwargs)

    monkeypatch.setattr(preprocess, "load_tokenizer", lambda d: Large(AutoTokenizer.from_pretrained(d)))
    write_jsonl(tmp_path / "in.jsonl", TEXTS[:1])
    preprocess.preprocess([str(tmp_path / "in.jsonl")], str(tmp_path / "big"), tokenizer_dir, progress=False)
    dataset = IndexedDataset(str(tmp_path / "big"))
    assert numpy.dtype(dataset.index.dtype) == numpy.int32
    assert dataset[0].tolist()[-1] == 156892


def test_rows_split_documents_at_eod_with_megatron_positions(corpus, tokenizer_dir):
    from transformers import AutoTokenizer

    root, _ = corpus
    eod = AutoTokenizer.from_pretrained(tokenizer_dir).eos_token_id
    train, _ = build_gpt_datasets(([str(root / "corpus")], None), "100,0,0", 48, 1, 512, eod, 64, 0, str(root / "c"))
    several = 0
    for g in range(len(train)):
        sample = train.dataset[g]  # megatron-core's own reset_position_ids positions
        row = document_row(sample["tokens"], eod, g)
        assert torch.equal(row["position_ids"], sample["position_ids"]), g
        ends = (row["input_ids"] == eod).nonzero().flatten().tolist()
        starts = [0] + [e + 1 for e in ends if e + 1 < 48]
        assert torch.equal(row["doc_ids"], torch.bucketize(torch.arange(48), torch.tensor(starts), right=True) - 1)
        assert bool(row["loss_mask"].all())  # every token is a diffusion target
        assert len(set(row["sample_ids"].tolist())) == len(starts)  # one noise key per document
        several += len(starts) >= 2
    assert several >= len(train) // 2


def test_blend_weights_are_honoured_within_2_percent_over_10000_samples(corpus, tmp_path, monkeypatch):
    """Two datasets of very different sizes, weighted 0.2 / 0.8: the samples follow the weights."""
    from tests.dist.conftest import write_with_megatron_builder

    root, _ = corpus
    write_with_megatron_builder(str(tmp_path / "small"), 60, 400, 436, seed=1)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda *a: 0)  # megatron-core asks even without a group
    blend = ([str(root / "corpus"), str(tmp_path / "small")], [0.2, 0.8])
    train, _ = build_gpt_datasets(blend, "100,0,0", 32, 1, 512, 436, 10_000, 0, str(tmp_path / "cache"))
    ids = numpy.array([int(train.dataset[i]["dataset_id"]) for i in range(10_000)])
    shares = numpy.bincount(ids, minlength=2) / 10_000
    assert abs(shares[0] - 0.2) <= 0.02 and abs(shares[1] - 0.8) <= 0.02, shares


def test_valid_split_never_overlaps_train(corpus):
    root, _ = corpus
    train, valid = build_gpt_datasets(([str(root / "corpus")], None), "80,20,0", 48, 1, 512, 436, 200, 40, None)
    documents = {}
    for name, split in (("train", train), ("valid", valid)):
        docs = set()
        for i in range(len(split)):
            docs.update(split.dataset._query_document_sample_shuffle_indices(i)[1].tolist())
        documents[name] = docs
    assert documents["train"] and documents["valid"]
    assert not documents["train"] & documents["valid"]


def test_resume_continues_at_the_next_global_sample_at_another_dp_size():
    samples = [torch.arange(8) + 100 * g for g in range(64)]

    def served(dp_size, state):
        rows = []
        for rank in range(dp_size):
            dataset = PretrainDataset(
                samples, eod_id=7, max_seq_len=8, global_batch_size=8, micro_batch_size=2, dp_size=dp_size, dp_rank=rank
            )
            dataset.load_state_dict(state)
            it = iter(dataset)
            rows += [row for _ in range(dataset.accumulation_steps) for row in next(it)["input_ids"].tolist()]
        return sorted(rows)

    trained = PretrainDataset(samples, eod_id=7, max_seq_len=8, global_batch_size=8, micro_batch_size=1, dp_size=2)
    it = iter(trained)
    for _ in range(3 * trained.accumulation_steps):  # three steps at DP=2
        next(it)
    state = trained.state_dict()
    assert state == {"consumed_samples": 24}
    want = sorted(trained.global_batch(0, 3)["input_ids"].tolist())
    assert served(1, state) == served(4, state) == want
