import random

import pytest
import torch

from megadiff.data.packing import (
    build_row,
    collate_rows,
    pack_samples,
    plan_packed_rows,
)

PAD = 9999


def make_samples(n, prompt_range, answer_range, seed=0):
    """Samples whose token j of sample i is i*1000 + j, so every token names its sample and position."""
    rng = random.Random(seed)
    samples = []
    for i in range(n):
        prompt, answer = rng.randint(*prompt_range), rng.randint(*answer_range)
        samples.append(([i * 1000 + j for j in range(prompt + answer)], prompt))
    return samples


def documents_of(row):
    """Split a row into its (doc id, token slice) segments, brute force."""
    segments, start = [], 0
    doc = row["doc_ids"].tolist()
    for j in range(1, len(doc) + 1):
        if j == len(doc) or doc[j] != doc[start]:
            segments.append((doc[start], slice(start, j)))
            start = j
    return segments


def test_pack_rows_hold_whole_documents_with_restarting_positions_and_answer_loss():
    samples = make_samples(60, (3, 12), (1, 20))
    rows, stats = pack_samples(samples, max_seq_len=40, pad_id=PAD)
    seen = []
    for row in rows:
        assert all(v.shape == (40,) for v in row.values())
        assert row["input_ids"].dtype == row["position_ids"].dtype == row["doc_ids"].dtype == torch.long
        assert row["loss_mask"].dtype == torch.bool and row["sample_ids"].dtype == torch.long
        for d, (doc, span) in enumerate(documents_of(row)):
            assert doc == d  # doc ids count 0, 1, 2, ... along the row
            n = span.stop - span.start
            assert row["position_ids"][span].tolist() == list(range(n))
            sid = row["sample_ids"][span].unique().tolist()
            assert len(sid) == 1
            if sid[0] == -1:  # fill: last segment, pad, no loss
                assert span.stop == 40
                assert row["input_ids"][span].eq(PAD).all() and not row["loss_mask"][span].any()
                continue
            ids, prompt_len = samples[sid[0]]
            assert row["input_ids"][span].tolist() == ids  # whole document, in order
            assert row["loss_mask"][span].tolist() == [False] * prompt_len + [True] * (len(ids) - prompt_len)
            seen.append(sid[0])
    assert sorted(seen) == list(range(60))  # every sample exactly once
    real = sum(int((r["sample_ids"] >= 0).sum()) for r in rows)
    assert stats["real_tokens"] == real == sum(len(s[0]) for s in samples)
    assert stats["real_token_fraction"] == real / (40 * len(rows))
    assert stats["answer_tokens"] == stats["loss_tokens"] == sum(int(r["loss_mask"].sum()) for r in rows)


def test_pack_fill_is_its_own_document_with_positions_from_zero():
    samples = [([1, 2, 3, 4], 2), ([5, 6, 7], 1)]
    (row,), _ = pack_samples(samples, max_seq_len=10, pad_id=PAD)
    assert row["input_ids"].tolist() == [1, 2, 3, 4, 5, 6, 7, PAD, PAD, PAD]
    assert row["position_ids"].tolist() == [0, 1, 2, 3, 0, 1, 2, 0, 1, 2]
    assert row["doc_ids"].tolist() == [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert row["loss_mask"].tolist() == [False, False, True, True, False, True, True, False, False, False]
    assert row["sample_ids"].tolist() == [0, 0, 0, 0, 1, 1, 1, -1, -1, -1]


def test_full_row_has_no_fill_segment():
    (row,), _ = pack_samples([([1, 2, 3], 1), ([4, 5], 1)], max_seq_len=5, pad_id=PAD)
    assert row["doc_ids"].tolist() == [0, 0, 0, 1, 1] and (row["sample_ids"] >= 0).all()


def test_pack_reaches_95_percent_real_tokens_on_sft_length_mix():
    samples = make_samples(400, (60, 200), (50, 300), seed=1)
    _, stats = plan_packed_rows(samples, max_seq_len=2048)
    assert stats["real_token_fraction"] >= 0.95
    _, padded = plan_packed_rows(samples, max_seq_len=2048, mode="pad_to_max")
    assert padded["real_token_fraction"] < 0.2


def test_pad_to_max_is_one_sample_per_row_with_trained_pad_tail_in_the_same_document():
    samples = [([1, 2, 3, 4], 2), ([5, 6, 7], 1)]
    rows, stats = pack_samples(samples, max_seq_len=6, pad_id=PAD, mode="pad_to_max")
    assert [r["input_ids"].tolist() for r in rows] == [[1, 2, 3, 4, PAD, PAD], [5, 6, 7, PAD, PAD, PAD]]
    assert rows[1]["position_ids"].tolist() == [0, 1, 2, 3, 4, 5]
    assert rows[1]["doc_ids"].tolist() == [0] * 6
    assert rows[1]["loss_mask"].tolist() == [False, True, True, True, True, True]
    assert rows[1]["sample_ids"].tolist() == [1] * 6
    assert stats["rows"] == 2 and stats["answer_tokens"] == 4 and stats["loss_tokens"] == 4 + 5
    assert stats["real_token_fraction"] == 7 / 12


def test_truncate_keeps_prompt_cuts_answer_and_drops_prompts_that_fill_the_row():
    samples = [(list(range(10)), 3), (list(range(10, 18)), 6), (list(range(20, 28)), 7), ([30, 31], 1)]
    rows, stats = pack_samples(samples, max_seq_len=6, pad_id=PAD, mode="pad_to_max", truncation="truncate")
    assert [r["input_ids"].tolist() for r in rows] == [[0, 1, 2, 3, 4, 5], [30, 31, PAD, PAD, PAD, PAD]]
    assert rows[0]["loss_mask"].tolist() == [False] * 3 + [True] * 3
    assert stats["truncated"] == 1 and stats["truncated_tokens"] == 4
    assert stats["dropped_prompt_too_long"] == 2 and stats["dropped_too_long"] == 0


def test_drop_mode_drops_every_overlong_sample():
    samples = [(list(range(10)), 3), (list(range(10, 16)), 2), ([30, 31], 1)]
    rows, stats = pack_samples(samples, max_seq_len=6, pad_id=PAD, truncation="drop")
    assert sorted(set(torch.cat([r["sample_ids"] for r in rows]).tolist()) - {-1}) == [1, 2]
    assert stats["dropped_too_long"] == 1 and stats["truncated"] == 0 and stats["dropped_prompt_too_long"] == 0


def test_packing_is_deterministic_and_independent_of_previous_calls():
    samples = make_samples(200, (5, 40), (1, 60), seed=3)
    plans_a, _ = plan_packed_rows(samples, max_seq_len=128)
    plan_packed_rows(make_samples(50, (1, 5), (1, 5), seed=4), max_seq_len=16)
    plans_b, _ = plan_packed_rows(samples, max_seq_len=128)
    assert plans_a == plans_b


def test_collate_rows_stacks_to_batch():
    samples = make_samples(5, (2, 4), (1, 4))
    plans, _ = plan_packed_rows(samples, max_seq_len=8, mode="pad_to_max")
    batch = collate_rows([build_row(p, samples, 8, PAD, "pad_to_max") for p in plans])
    assert set(batch) == {"input_ids", "position_ids", "doc_ids", "loss_mask", "sample_ids"}
    assert all(v.shape == (5, 8) for v in batch.values())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"mode": "packed"}, "packing mode 'packed' is not one of pack, pad_to_max"),
        ({"truncation": "cut"}, "truncation 'cut' is not one of truncate, drop"),
    ],
)
def test_bad_packing_options_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        plan_packed_rows([([1, 2], 1)], max_seq_len=4, **kwargs)


def test_sample_without_answer_token_is_rejected():
    with pytest.raises(ValueError, match="sample 1: prompt_len=2 but 2 tokens"):
        plan_packed_rows([([1, 2], 1), ([1, 2], 2)], max_seq_len=4)
