import json
import string

import pytest
from transformers import AutoTokenizer

from megadiff.hf.tokenizer import (
    EOS_TOKEN,
    LLADA2_CHAT_TEMPLATE,
    MASK_TOKEN,
    ROLE_CLOSE_TOKEN,
    ROLE_END_TOKEN,
    ROLE_OPEN_TOKEN,
    SPECIAL_TOKENS,
    build_tiny_tokenizer,
    mask_token_id,
)

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 48 / 2?\nShow work."},
    {"role": "assistant", "content": "48 / 2 = 24.\n#### 24"},
]


@pytest.mark.parametrize(
    "text",
    [
        string.printable,
        "Natalia sold 48 clips in April, and half as many in May. 48 / 2 = 24.\n#### 72",
        "  leading and trailing spaces  \n\n\ttabs\r\nx>=y && a-b*c%d != e**2; f(-1.5e3)",
        "",
        "naïve café — 日本",  # byte-level: even non-ASCII round-trips
    ],
)
def test_tiny_tokenizer_round_trips_text(tiny_tokenizer, text):
    ids = tiny_tokenizer.encode(text, add_special_tokens=False)
    assert tiny_tokenizer.decode(ids) == text


def test_tiny_tokenizer_vocab_is_under_500_and_specials_follow_the_bpe_vocab(tiny_tokenizer):
    assert len(tiny_tokenizer) <= 500
    base = tiny_tokenizer.backend_tokenizer.get_vocab_size(with_added_tokens=False)
    ids = [tiny_tokenizer.convert_tokens_to_ids(tok) for tok in SPECIAL_TOKENS]
    assert ids == list(range(base, base + len(SPECIAL_TOKENS)))
    assert len(tiny_tokenizer) == base + len(SPECIAL_TOKENS)


def test_special_tokens_encode_to_single_ids_and_pad_equals_eos(tiny_tokenizer):
    for tok in SPECIAL_TOKENS:
        assert tiny_tokenizer.encode(tok, add_special_tokens=False) == [tiny_tokenizer.convert_tokens_to_ids(tok)]
    eos = tiny_tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    assert tiny_tokenizer.eos_token == tiny_tokenizer.pad_token == EOS_TOKEN
    assert tiny_tokenizer.eos_token_id == tiny_tokenizer.pad_token_id == eos
    assert mask_token_id(tiny_tokenizer) == tiny_tokenizer.convert_tokens_to_ids(MASK_TOKEN) != eos
    # no BOS/EOS is added implicitly (LLaDA2 has no BOS)
    assert tiny_tokenizer.encode("hi") == tiny_tokenizer.encode("hi", add_special_tokens=False)


def test_chat_template_renders_three_turn_conversation_in_llada2_format(tiny_tokenizer):
    text = tiny_tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert text == (
        "<role>SYSTEM</role>You are terse.<|role_end|>"
        "<role>HUMAN</role>What is 48 / 2?\nShow work.<|role_end|>"
        "<role>ASSISTANT</role>48 / 2 = 24.\n#### 24<|role_end|>"
    )


def test_chat_template_generation_prompt_opens_an_assistant_turn(tiny_tokenizer):
    text = tiny_tokenizer.apply_chat_template(CONVERSATION[:2], tokenize=False, add_generation_prompt=True)
    assert text == (
        "<role>SYSTEM</role>You are terse.<|role_end|>"
        "<role>HUMAN</role>What is 48 / 2?\nShow work.<|role_end|><role>ASSISTANT</role>"
    )
    ids = tiny_tokenizer.encode(text, add_special_tokens=False)
    specials = [tiny_tokenizer.convert_ids_to_tokens(i) for i in ids if i >= len(tiny_tokenizer) - 5]
    assert specials == [ROLE_OPEN_TOKEN, ROLE_CLOSE_TOKEN, ROLE_END_TOKEN] * 2 + [ROLE_OPEN_TOKEN, ROLE_CLOSE_TOKEN]


def test_chat_template_rejects_unknown_role(tiny_tokenizer):
    with pytest.raises(Exception, match="unknown chat role: tool"):
        tiny_tokenizer.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_autotokenizer_loads_written_files_with_template(tiny_tokenizer_dir):
    assert {p.name for p in tiny_tokenizer_dir.iterdir()} >= {
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    }
    config = json.loads((tiny_tokenizer_dir / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert config["chat_template"] == LLADA2_CHAT_TEMPLATE
    loaded = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    assert loaded.chat_template == LLADA2_CHAT_TEMPLATE
    assert loaded.encode("48 + 24 = 72", add_special_tokens=False) == loaded.encode("48 + 24 = 72")


def test_build_is_deterministic(tiny_tokenizer_dir, tmp_path):
    build_tiny_tokenizer(tmp_path)
    assert (tmp_path / "tokenizer.json").read_text() == (tiny_tokenizer_dir / "tokenizer.json").read_text()


def test_mask_token_id_override_wins_and_missing_mask_is_a_clear_error(tiny_tokenizer):
    assert mask_token_id(tiny_tokenizer, override=7) == 7

    class NoMaskTokenizer:
        name_or_path = "some/tokenizer"

        def get_vocab(self):
            return {"a": 0}

    with pytest.raises(ValueError, match=r"some/tokenizer has no '<\|mask\|>' token; pass the mask token id"):
        mask_token_id(NoMaskTokenizer())
    assert mask_token_id(NoMaskTokenizer(), override=3) == 3
