"""SFT rows in the three formats users bring (megadiff's `messages`, TRL's prompt/completion in both
forms, ShareGPT's `conversations`) read to the same messages, so the same token ids; any other
shape is refused with the accepted formats listed and the real skip key named."""

import json
import re

import pytest

from megadiff.data.rows import ACCEPTED_FORMATS, DataError, read_sft_rows
from megadiff.data.tokenize import tokenize_rows

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 6 * 7?"},
    {"role": "assistant", "content": "42"},
]
SAME_CHAT = {
    "messages": {"messages": MESSAGES},
    "trl_conversational": {"prompt": MESSAGES[:2], "completion": MESSAGES[2:]},
    "sharegpt": {
        "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": "What is 6 * 7?"},
            {"from": "gpt", "value": "42"},
        ]
    },
}


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_every_accepted_format_gives_the_same_messages_and_ids(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", list(SAME_CHAT.values()))
    rows, stats = read_sft_rows(path)
    assert stats["rows_kept"] == 3 and all(r["messages"] == MESSAGES for r in rows)
    ids = [s[0] for s in tokenize_rows(rows, tiny_tokenizer)]
    assert ids[0] == ids[1] == ids[2]


def test_plain_prompt_completion_is_one_user_turn_and_several_completions_join(tmp_path):
    plain = {"prompt": "2+2?", "completion": "4"}
    two = {"prompt": [{"role": "user", "content": "q"}], "completion": [{"role": "assistant", "content": "a"}] * 2}
    rows, _ = read_sft_rows(write_jsonl(tmp_path / "d.jsonl", [plain, two]))
    assert rows[0]["messages"] == [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    assert rows[1]["messages"][-1] == {"role": "assistant", "content": "a\na"}


@pytest.mark.parametrize(
    "row, reason",
    [
        ({"text": "hello", "id": 3}, f"no SFT fields (the row has 'text', 'id'); accepted: {ACCEPTED_FORMATS}"),
        ("[1]", f"row is a list, expected a JSON object: {ACCEPTED_FORMATS}"),
        ({"prompt": "q", "chosen": "a", "rejected": "b"}, "this is a preference (DPO) row"),
        ({"prompt": "q"}, "field 'prompt' without 'completion'"),
        ({"prompt": "q", "completion": [{"role": "assistant", "content": "a"}]}, "mix a string and a message list"),
        ({"prompt": [{"role": "assistant", "content": "a"}], "completion": "b"}, "mix a string"),
        (
            {"prompt": [{"role": "user", "content": "q"}], "completion": [{"role": "user", "content": "a"}]},
            r"completion\[0\]\.role is 'user', expected assistant",
        ),
        ({"conversations": [{"from": "bot", "value": "x"}]}, r"conversations\[0\]\.from is 'bot', expected one of"),
        ({"conversations": [{"from": "human", "value": 3}]}, r"conversations\[0\]\.value is int, expected str"),
        ({"conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "q"}]}, "last message has role"),
        ({"messages": MESSAGES, "conversations": []}, "the row has both 'messages' and 'conversations'"),
    ],
)
def test_unusable_shapes_name_the_formats_and_the_skip_key(tmp_path, row, reason):
    path = write_jsonl(tmp_path / "d.jsonl", [SAME_CHAT["messages"], row])
    with pytest.raises(DataError) as err:
        read_sft_rows(path)
    message = str(err.value)
    assert message.startswith(f"{path}:2: ") and message.endswith("(set data.skip_bad_rows=true to skip such rows)")
    assert reason in message or re.search(reason, message), message
