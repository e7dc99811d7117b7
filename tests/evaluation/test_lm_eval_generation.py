"""generate_until and is_greedy of the lm-eval model on megadiff's sampler (megadiff.evaluation.generation):
lm-eval's generation kwargs, stop strings, batching with the prompt cache, max_gen_toks. Needs no lm-eval."""

import dataclasses

import pytest

from megadiff.evaluation.generation import cut_at_stop_strings, generate_texts, greedy_matches, request_decoding
from megadiff.hf.tiny import write_tiny_model_dir
from megadiff.inference import DecodingOptions, decode_tokens, encode_prompt, generate, load_model, load_tokenizer

BASE = DecodingOptions(gen_length=24, block_length=8, steps=4, threshold=0.9)
QUESTIONS = ["Tom has 3 apples and gets 4 more. How many?", "Hi", "What is 2 + 2? Let's think step by step.", "x = 3"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model_dir = write_tiny_model_dir(str(tmp_path_factory.mktemp("tiny_llada2")), seed=0, num_hidden_layers=2)
    tokenizer = load_tokenizer(model_dir)
    ids = tokenizer.convert_tokens_to_ids
    return load_model(model_dir), tokenizer, ids("<|mask|>"), ids("<|endoftext|>")


def test_request_decoding_reads_lm_eval_generation_kwargs_and_names_unsupported_ones():
    options, until = request_decoding(BASE, {"until": "Q:", "max_gen_toks": 40, "do_sample": False, "temperature": 0.7})
    assert until == ("Q:",) and options == dataclasses.replace(BASE, gen_length=40, temperature=0.0)
    options, until = request_decoding(BASE, {"do_sample": True, "temperature": 0.5, "top_p": 0.9, "until": ["a", "b"]})
    assert until == ("a", "b") and (options.temperature, options.top_p, options.gen_length) == (0.5, 0.9, 24)
    with pytest.raises(ValueError, match="generation kwarg 'num_beams' is not supported"):
        request_decoding(BASE, {"until": [], "num_beams": 4})
    with pytest.raises(ValueError, match="gen_length must be a positive integer, got 0"):
        request_decoding(BASE, {"max_gen_toks": 0})


def test_stop_strings_cut_at_the_earliest_one():
    assert cut_at_stop_strings("a + b = 7\n#### 7\n\nQuestion: next", ["Question:", "\n\n"]) == "a + b = 7\n#### 7"
    assert cut_at_stop_strings("no stop here", ["Q:"]) == "no stop here"


def test_batched_generation_equals_one_prompt_at_a_time_cut_at_until_and_max_gen_toks(tiny):
    model, tokenizer, mask_id, eos_id = tiny
    prompts = [encode_prompt(q, tokenizer) for q in QUESTIONS]
    kwargs = [{"until": []}, {"max_gen_toks": 10, "until": []}, {"until": []}, {"max_gen_toks": 13, "until": []}]
    decodings = [request_decoding(BASE, k) for k in kwargs]
    alone = []
    for i, (prompt, (options, _)) in enumerate(zip(prompts, decodings, strict=True)):
        tokens = generate(model, [prompt], dataclasses.replace(options, use_cache=False), mask_id, eos_id, [i]).tokens[
            0
        ]
        assert len(tokens) <= options.gen_length  # max_gen_toks honoured (the last block is decoded whole)
        alone.append(decode_tokens(tokens, tokenizer))
    assert len(set(alone)) == len(alone) and all(alone)
    batched = generate_texts(model, tokenizer, prompts, decodings, mask_id=mask_id, eos_id=eos_id, batch_size=3)
    assert batched == alone
    # a stop string taken from inside each output cuts it there
    stops = [(text[len(text) // 2 :][:2],) for text in alone]
    cut = generate_texts(
        model,
        tokenizer,
        prompts,
        [(options, stop) for (options, _), stop in zip(decodings, stops, strict=True)],
        mask_id=mask_id,
        eos_id=eos_id,
        batch_size=4,
    )
    assert cut == [text[: text.find(stop[0])] for text, stop in zip(alone, stops, strict=True)]


def test_is_greedy_is_whether_the_greedy_sampler_writes_the_continuation(tiny):
    model, tokenizer, mask_id, eos_id = tiny
    contexts = [encode_prompt(q, tokenizer) for q in QUESTIONS[:3]]
    lengths = [5, 9, 5]
    written = [
        generate(model, [c], dataclasses.replace(BASE, gen_length=n), mask_id, eos_id).tokens[0]
        for c, n in zip(contexts, lengths, strict=True)
    ]
    assert all(len(w) == n for w, n in zip(written, lengths, strict=True))  # no EOS inside: a full-length check
    changed = [w[:-1] + [(w[-1] + 1) % 400] for w in written]
    pairs = list(zip(contexts, written, strict=True)) + list(zip(contexts, changed, strict=True)) + [(contexts[0], [])]
    matches = greedy_matches(model, pairs, BASE, mask_id=mask_id, eos_id=eos_id, batch_size=2)
    assert matches == [True, True, True, False, False, False, True]


def test_decoding_comes_from_model_args_then_generation_config_json_then_defaults(tmp_path):
    """The 2.1 editing rule when the model dir's generation_config.json sets it (as tools/generate.py),
    a model arg over it, `off` for the 2.0 threshold rule; bad values name the model arg."""
    from megadiff.evaluation.model_args import ModelArgError, decoding_options, parse_model_args

    (tmp_path / "generation_config.json").write_text('{"editing_threshold": 0.8, "max_post_steps": 4}')
    options = decoding_options(parse_model_args({"pretrained": str(tmp_path), "threshold": 0.7, "block_length": 16}))
    assert (options.editing_threshold, options.max_post_steps, options.threshold) == (0.8, 4, 0.7)
    assert (options.block_length, options.gen_length, options.steps) == (16, 256, 32)
    assert (
        decoding_options(parse_model_args({"pretrained": str(tmp_path), "editing_threshold": 0.5})).editing_threshold
        == 0.5
    )
    assert (
        decoding_options(parse_model_args({"pretrained": str(tmp_path), "editing_threshold": "off"})).editing_threshold
        is None
    )
    with pytest.raises(ModelArgError, match="model arg threshold must be in"):
        parse_model_args({"pretrained": str(tmp_path), "threshold": 2.0})
    with pytest.raises(ModelArgError, match="model arg block_length=8.5 must be an integer"):
        parse_model_args({"pretrained": str(tmp_path), "block_length": 8.5})
