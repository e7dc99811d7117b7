import copy

import pytest

from megadiff.data.tokenize import tokenize_rows, tokenize_sample

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 6 * 7?"},
    {"role": "assistant", "content": "6 * 7 = 42.\n#### 42"},
]


def test_tokenize_sample_is_prompt_with_generation_prompt_then_answer_then_eos(tiny_tokenizer):
    ids, prompt_len = tokenize_sample(MESSAGES, tiny_tokenizer)
    prompt = (
        "<role>SYSTEM</role>Be brief.<|role_end|><role>HUMAN</role>What is 6 * 7?<|role_end|><role>ASSISTANT</role>"
    )
    assert tiny_tokenizer.decode(ids[:prompt_len]) == prompt
    assert ids[:prompt_len] == tiny_tokenizer.encode(prompt, add_special_tokens=False)
    assert ids[prompt_len:] == tiny_tokenizer.encode("6 * 7 = 42.\n#### 42", add_special_tokens=False) + [
        tiny_tokenizer.eos_token_id
    ]
    assert tiny_tokenizer.convert_tokens_to_ids("<|role_end|>") not in ids[prompt_len:]


def test_tokenize_sample_falls_back_to_llada2_template_when_tokenizer_has_none(tiny_tokenizer):
    no_template = copy.deepcopy(tiny_tokenizer)
    no_template.chat_template = None
    assert tokenize_sample(MESSAGES, no_template) == tokenize_sample(MESSAGES, tiny_tokenizer)


def test_tokenize_sample_uses_the_tokenizers_own_template(tiny_tokenizer):
    other = copy.deepcopy(tiny_tokenizer)
    other.chat_template = "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}"
    ids, prompt_len = tokenize_sample(MESSAGES, other)
    assert other.decode(ids[:prompt_len]) == "[system]Be brief.[user]What is 6 * 7?[assistant]"


def test_assistant_only_row_gets_just_the_generation_prompt(tiny_tokenizer):
    ids, prompt_len = tokenize_sample([{"role": "assistant", "content": "hello"}], tiny_tokenizer)
    assert tiny_tokenizer.decode(ids[:prompt_len]) == "<role>ASSISTANT</role>"
    assert tiny_tokenizer.decode(ids[prompt_len:]) == "hello<|endoftext|>"


def test_empty_answer_is_just_eos(tiny_tokenizer):
    ids, prompt_len = tokenize_sample(
        [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}], tiny_tokenizer
    )
    assert ids[prompt_len:] == [tiny_tokenizer.eos_token_id]


def test_tokenize_sample_requires_final_assistant_turn(tiny_tokenizer):
    with pytest.raises(ValueError, match="last message must be the assistant answer"):
        tokenize_sample(MESSAGES[:2], tiny_tokenizer)


def test_tokenize_rows_keeps_row_order(tiny_tokenizer):
    rows = [{"messages": MESSAGES}, {"messages": [{"role": "assistant", "content": "x"}]}]
    assert tokenize_rows(rows, tiny_tokenizer) == [tokenize_sample(r["messages"], tiny_tokenizer) for r in rows]


def test_answers_are_padded_with_eos_to_whole_blocks():
    from megadiff.data.tokenize import pad_answers_to_block

    samples = [([1, 2, 3, 9], 2), ([1] * 8, 3), ([5] * 9, 1)]
    padded = pad_answers_to_block(samples, eos_id=9, block_size=4)
    assert padded == [([1, 2, 3, 9], 2), ([1] * 8, 3), ([5] * 9 + [9, 9, 9], 1)]
    assert all(len(ids) % 4 == 0 for ids, _ in padded)
