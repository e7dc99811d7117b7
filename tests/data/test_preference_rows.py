"""Preference rows (TRL formats) for DPO: read from jsonl and parquet, one test per malformed case
(each error names file:line), tokenised like SFT rows, and laid out as whole pairs per micro-batch
with per-(pair, Monte Carlo sample, response) noise ids."""

import json

import pytest

from megadiff.data.preference import PreferenceDataset, fit_pair, read_preference_rows, tokenize_pairs
from megadiff.data.rows import DataError

CONVERSATIONAL = {
    "prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"}],
    "chosen": [{"role": "assistant", "content": "The answer is 4."}],
    "rejected": [{"role": "assistant", "content": "4"}],
}
PLAIN = {"prompt": "2+3?", "chosen": "The answer is 5.", "rejected": "5"}


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_conversational_and_plain_rows_are_read_in_order(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [CONVERSATIONAL, PLAIN])
    rows, stats = read_preference_rows(path)
    assert rows[0]["prompt"] == CONVERSATIONAL["prompt"] and rows[0]["chosen"] == "The answer is 4."
    assert rows[1]["prompt"] == [{"role": "user", "content": "2+3?"}] and rows[1]["rejected"] == "5"
    assert [r["source"] for r in rows] == [f"{path}:1", f"{path}:2"] and stats["rows_kept"] == 2


def test_parquet_rows_are_read_like_jsonl(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([PLAIN, PLAIN | {"chosen": "Five."}]), tmp_path / "p.parquet")
    rows, _ = read_preference_rows(tmp_path / "p.parquet")
    assert [r["chosen"] for r in rows] == ["The answer is 5.", "Five."]
    assert rows[1]["source"] == f"{tmp_path / 'p.parquet'}:2"


MALFORMED = {
    "not_an_object": ("[1, 2]", r"row is a list, expected a JSON object"),
    "invalid_json": ('{"prompt": ', r"invalid JSON"),
    "missing_rejected": ({"prompt": "q", "chosen": "a"}, r"missing field 'rejected'"),
    "mixed_forms": (
        PLAIN | {"chosen": [{"role": "assistant", "content": "a"}]},
        r"'prompt', 'chosen' and 'rejected' mix strings and message lists",
    ),
    "prompt_wrong_type": ({"prompt": 3, "chosen": 4, "rejected": 5}, r"field 'prompt' is a int"),
    "empty_prompt_list": (CONVERSATIONAL | {"prompt": []}, r"field 'prompt' is empty"),
    "prompt_ends_with_assistant": (
        CONVERSATIONAL | {"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
        r"the last message of 'prompt' is the assistant's",
    ),
    "bad_prompt_role": (
        CONVERSATIONAL | {"prompt": [{"role": "robot", "content": "q"}]},
        r"prompt\[0\]\.role is 'robot'",
    ),
    "response_not_assistant": (
        CONVERSATIONAL | {"chosen": [{"role": "user", "content": "a"}]},
        r"chosen\[0\]\.role is 'user', expected assistant",
    ),
    "content_not_string": (
        CONVERSATIONAL | {"rejected": [{"role": "assistant", "content": None}]},
        r"rejected\[0\]\.content is NoneType",
    ),
    "message_not_object": (CONVERSATIONAL | {"chosen": ["hi"]}, r"chosen\[0\] is a str"),
    "empty_chosen_text": (PLAIN | {"chosen": "  "}, r"field 'chosen' is an empty answer"),
    "empty_rejected_messages": (CONVERSATIONAL | {"rejected": []}, r"field 'rejected' is empty"),
    "same_answers": (PLAIN | {"rejected": PLAIN["chosen"]}, r"'chosen' and 'rejected' are the same answer"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_row_is_named_by_file_and_line_and_can_be_skipped(tmp_path, case):
    row, reason = MALFORMED[case]
    path = write_jsonl(tmp_path / "p.jsonl", [PLAIN, row, CONVERSATIONAL])
    with pytest.raises(DataError, match=rf"^{path}:2: {reason}"):
        read_preference_rows(path)
    rows, stats = read_preference_rows(path, skip_bad_rows=True)
    assert [r["source"] for r in rows] == [f"{path}:1", f"{path}:3"] and stats["rows_skipped"] == 1


def test_no_valid_row_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "q"}])
    with pytest.raises(DataError, match=r"no valid preference rows \(1 read\); first problem: .*:1: missing"):
        read_preference_rows(path, skip_bad_rows=True)


def test_mask_text_in_a_response_is_plain_text_not_the_mask_id(tmp_path, tiny_tokenizer):
    mask = tiny_tokenizer.convert_tokens_to_ids("<|mask|>")
    path = write_jsonl(tmp_path / "p.jsonl", [PLAIN | {"rejected": "<|mask|>"}])
    rows, _ = read_preference_rows(path)
    [(chosen, rejected)] = tokenize_pairs(rows, tiny_tokenizer, mask)
    assert mask not in rejected[0] and chosen[1] == rejected[1]  # same prompt length


def test_pairs_are_padded_to_blocks_and_share_their_prompt(tmp_path, tiny_tokenizer):
    rows, _ = read_preference_rows(write_jsonl(tmp_path / "p.jsonl", [CONVERSATIONAL]))
    [(chosen, rejected)] = tokenize_pairs(rows, tiny_tokenizer, block_size=8)
    eos = tiny_tokenizer.eos_token_id
    assert chosen[0][: chosen[1]] == rejected[0][: rejected[1]]
    for ids, prompt_len in (chosen, rejected):
        assert (len(ids) - prompt_len) % 8 == 0 and ids[-1] == eos


def test_fit_pair_truncates_answers_to_half_a_row_or_drops():
    pair = (([1] * 4 + [2] * 10, 4), ([1] * 4 + [3] * 2, 4))
    assert fit_pair(pair, 20, "truncate") is pair
    assert fit_pair(pair, 16, "truncate") == (([1] * 4 + [2] * 4, 4), ([1] * 4 + [3] * 2, 4))
    assert fit_pair(pair, 16, "drop") is None
    assert fit_pair(pair, 8, "truncate") is None  # prompt of half a row: no room for an answer


def test_dataset_keeps_pairs_whole_and_noise_ids_distinct():
    pairs = [(([7, 7, i, 1], 2), ([7, 7, 9, 9, 1], 2)) for i in range(4)]
    data = PreferenceDataset(
        pairs, max_seq_len=12, pad_id=0, global_batch_size=4, micro_batch_size=2, mc_samples=3, dp_size=2, dp_rank=1
    )
    micro = next(iter(data))
    assert micro["input_ids"].shape == (6, 12) and micro["pair_ids"].tolist() == data.global_batch_rows(0, 0)[2:]
    for row in range(6):
        slots, sids = micro["response_slot"][row], micro["sample_ids"][row]
        pair, k = micro["pair_ids"][row // 3].item(), row % 3
        assert slots[:4].tolist() == [2 * (row // 3)] * 4 and slots[4:9].tolist() == [2 * (row // 3) + 1] * 5
        assert slots[9:].tolist() == [-1] * 3
        assert set(sids[:9].tolist()) == {(pair * 3 + k) * 2, (pair * 3 + k) * 2 + 1}
        assert micro["loss_mask"][row].tolist() == [False] * 2 + [True] * 2 + [False] * 2 + [True] * 3 + [False] * 3
