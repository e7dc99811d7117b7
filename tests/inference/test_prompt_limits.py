"""What a prompt may hold: no position beyond max_position_embeddings, and no mask token injected by
text (chat prompts are plain text; a raw prompt with <|mask|> is refused by the sampler)."""

import pytest
from inference_helpers import EOS_ID, MASK_ID

from megadiff.inference import DecodingOptions, encode_prompt, generate
from megadiff.inference.sampler import check_positions

OPTIONS = DecodingOptions(gen_length=8, block_length=8, steps=2)


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory):
    from megadiff.hf.tokenizer import build_tiny_tokenizer

    return build_tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def test_prompt_beyond_the_position_range_is_refused_before_decoding(flat_model):
    limit = flat_model.config.max_position_embeddings
    calls = []
    hook = flat_model.register_forward_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(
            ValueError,
            match=rf"prompts\[0\] has {limit - 4} tokens; .* that is {limit + 8} "
            rf"positions, beyond the model's max_position_embeddings={limit}",
        ):
            generate(flat_model, [[5] * (limit - 4)], OPTIONS, MASK_ID, EOS_ID)
    finally:
        hook.remove()
    assert not calls  # refused before any forward pass


def test_prompt_that_fits_exactly_is_accepted():
    check_positions(32, [[5] * 24], OPTIONS)  # 24 + 8 = 32 positions, whole blocks
    with pytest.raises(ValueError, match="33 tokens"):
        check_positions(40, [[5] * 33], OPTIONS)  # 33 + 8 padded to 48 > 40


def test_mask_text_in_a_chat_prompt_stays_text_and_raw_mask_is_refused(flat_model, tiny_tokenizer):
    mask_id = tiny_tokenizer.convert_tokens_to_ids("<|mask|>")
    chat = encode_prompt("what is <|mask|>?", tiny_tokenizer)
    assert mask_id not in chat and tiny_tokenizer.decode(chat).count("<|mask|>") == 1
    raw = encode_prompt("what is <|mask|>?", tiny_tokenizer, raw=True)
    assert mask_id in raw  # raw text is the model's input as written...
    with pytest.raises(ValueError, match=f"is the mask token {mask_id}; prompts must not contain it"):
        generate(flat_model, [raw], OPTIONS, mask_id, EOS_ID)  # ...and the sampler refuses a mask in it
