import itertools
import json
import random

import pytest
import torch

from megadiff.data.dataset import SFTDataset
from megadiff.data.rows import read_sft_rows
from megadiff.data.tokenize import tokenize_rows

PAD = 9999


def make_samples(n, prompt_range, answer_range, seed=0):
    """Samples whose token j of sample i is i*1000 + j."""
    rng = random.Random(seed)
    lengths = [(rng.randint(*prompt_range), rng.randint(*answer_range)) for _ in range(n)]
    return [([i * 1000 + j for j in range(p + a)], p) for i, (p, a) in enumerate(lengths)]


SAMPLES = make_samples(300, (3, 20), (1, 30), seed=7)
KEYS = ("input_ids", "position_ids", "doc_ids", "loss_mask", "sample_ids", "epoch")


def dataset(**kwargs):
    args = {"max_seq_len": 64, "pad_id": PAD, "global_batch_size": 8, "micro_batch_size": 2, "seed": 11}
    args.update(kwargs)
    return SFTDataset(SAMPLES, **args)


def take(ds, n):
    return list(itertools.islice(iter(ds), n))


def cat(batches):
    return {k: torch.cat([b[k] for b in batches]) for k in KEYS}


def assert_batches_equal(a, b):
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def steps_for_layout(dp_size, micro_batch_size, steps, global_batch_size=8):
    """Global batch of each step rebuilt from every rank's micro-batches, ranks in order."""
    per_rank = []
    for rank in range(dp_size):
        ds = dataset(
            dp_size=dp_size, dp_rank=rank, micro_batch_size=micro_batch_size, global_batch_size=global_batch_size
        )
        per_rank.append(take(ds, steps * ds.accumulation_steps))
    accum = len(per_rank[0]) // steps
    return [cat([mb for rank in per_rank for mb in rank[s * accum : (s + 1) * accum]]) for s in range(steps)]


def test_micro_batches_have_row_keys_shapes_and_dtypes():
    (batch,) = take(dataset(), 1)
    assert set(batch) == set(KEYS)
    for k in KEYS[:5]:
        assert batch[k].shape == (2, 64)
    assert batch["loss_mask"].dtype == torch.bool
    assert all(batch[k].dtype == torch.long for k in KEYS if k != "loss_mask")
    assert batch["epoch"].tolist() == [0, 0]


@pytest.mark.parametrize("dp_size, micro_batch_size", [(1, 8), (2, 2), (4, 1), (2, 4)])
def test_union_of_ranks_is_the_global_batch_for_every_layout(dp_size, micro_batch_size):
    ds = dataset()
    steps = ds.steps_per_epoch + 2  # crosses into epoch 1
    expected = [ds.global_batch(s // ds.steps_per_epoch, s % ds.steps_per_epoch) for s in range(steps)]
    for got, want in zip(steps_for_layout(dp_size, micro_batch_size, steps), expected, strict=True):
        assert_batches_equal(got, want)


def test_rank_gets_its_contiguous_slice_of_the_global_batch():
    ds = dataset(dp_size=2, dp_rank=1, micro_batch_size=2)
    rows = ds.global_batch_rows(0, 0)
    first, second = take(ds, 2)
    assert_batches_equal(cat([first, second]), ds.rows_batch(rows[4:8], 0))


def test_each_epoch_uses_every_row_at_most_once_and_epochs_differ():
    ds = dataset()
    orders = [[r for k in range(ds.steps_per_epoch) for r in ds.global_batch_rows(e, k)] for e in range(2)]
    for order in orders:
        assert len(order) == len(set(order)) == ds.steps_per_epoch * 8
    assert orders[0] != orders[1]
    assert sorted(ds.epoch_order(0)) == list(range(ds.rows_per_epoch))


def test_order_depends_only_on_seed_and_epoch():
    assert dataset(seed=5).epoch_order(3) == dataset(seed=5).epoch_order(3)
    assert dataset(seed=5).epoch_order(3) != dataset(seed=6).epoch_order(3)
    assert dataset(seed=1).epoch_order(0) != dataset(seed=0).epoch_order(1)


@pytest.mark.parametrize("resume_dp_size", [2, 4])
def test_resume_from_state_dict_continues_identically(resume_dp_size):
    ds = dataset(dp_size=2, dp_rank=0, micro_batch_size=2)  # accumulation 2
    steps_done = ds.steps_per_epoch - 1
    it = iter(ds)
    for _ in range(steps_done * ds.accumulation_steps):
        next(it)
    state = ds.state_dict()
    assert state == {"epoch": 0, "consumed_rows": steps_done * 8}
    reference = steps_for_layout(2, 2, steps_done + 3)[steps_done:]  # crosses the epoch boundary

    resumed = []
    for rank in range(resume_dp_size):
        fresh = dataset(dp_size=resume_dp_size, dp_rank=rank, micro_batch_size=8 // resume_dp_size // 2)
        fresh.load_state_dict(state)
        resumed.append(take(fresh, 3 * fresh.accumulation_steps))
        assert fresh.state_dict() == {"epoch": 1, "consumed_rows": 16}
    accum = len(resumed[0]) // 3
    for s in range(3):
        assert_batches_equal(cat([mb for rank in resumed for mb in rank[s * accum : (s + 1) * accum]]), reference[s])


def test_state_advances_when_the_last_micro_batch_of_a_step_is_handed_out():
    ds = dataset(micro_batch_size=4)  # accumulation 2
    it = iter(ds)
    next(it)
    assert ds.state_dict() == {"epoch": 0, "consumed_rows": 0}
    next(it)
    assert ds.state_dict() == {"epoch": 0, "consumed_rows": 8}


def test_bad_batch_layouts_are_explained():
    with pytest.raises(ValueError, match="global_batch_size=8 is not divisible by micro_batch_size=3 \\* dp_size=1"):
        dataset(micro_batch_size=3)
    with pytest.raises(ValueError, match="packed rows of 64 tokens are fewer than global_batch_size=4096"):
        dataset(global_batch_size=4096)
    with pytest.raises(ValueError, match="dp_rank=2 is outside"):
        dataset(dp_size=2, dp_rank=2)
    with pytest.raises(ValueError, match="outside this dataset"):
        dataset().load_state_dict({"epoch": 0, "consumed_rows": 10**6})


def test_jsonl_to_micro_batches_end_to_end(tmp_path, tiny_tokenizer):
    rows = [
        {"messages": [{"role": "user", "content": f"What is {i} + {i}?"}, {"role": "assistant", "content": f"{2 * i}"}]}
        for i in range(40)
    ]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    samples = tokenize_rows(read_sft_rows(path)[0], tiny_tokenizer)
    ds = SFTDataset(
        samples, max_seq_len=64, pad_id=tiny_tokenizer.pad_token_id, global_batch_size=2, micro_batch_size=1
    )
    batch = next(iter(ds))
    real = batch["sample_ids"][0] >= 0
    answers = batch["input_ids"][0][batch["loss_mask"][0]]
    assert tiny_tokenizer.decode(answers).count("<|endoftext|>") == len(batch["sample_ids"][0][real].unique())
    assert ds.stats["real_token_fraction"] > 0.9
