"""Block-wise diffusion decoding (megadiff.inference.sampler) against the LLaDA2 model card's rule."""

import math

import pytest
import torch
from inference_helpers import EOS_ID, MASK_ID, VOCAB, Recorder

from megadiff.inference import DecodingOptions, block_causal_mask, generate, transfer_schedule
from megadiff.inference.sampler import filter_logits, sample_tokens


def plain_generate(model, prompt, gen_length, block_length, steps, threshold, minimal_topk=1, eos_early_stop=False):
    """The model card's rule written out plainly: one prompt, greedy, no cache, the whole prefix every
    step, Python lists. Ties go to the earlier position; the mask token is never predicted."""
    steps = min(steps, gen_length // minimal_topk)
    quotas = [block_length // steps + (1 if s < block_length % steps else 0) for s in range(steps)]
    n = len(prompt)
    num_blocks = math.ceil((n + gen_length) / block_length)
    x = list(prompt) + [MASK_ID] * (num_blocks * block_length - n)
    for block in range(n // block_length, num_blocks):
        lo, hi = block * block_length, (block + 1) * block_length
        for quota in quotas:
            masked = [p for p in range(lo, hi) if x[p] == MASK_ID]
            if not masked:
                break
            allowed = [[k // block_length <= q // block_length for k in range(hi)] for q in range(hi)]
            with torch.no_grad():
                logits = model(
                    torch.tensor([x[:hi]]), position_ids=torch.arange(hi)[None], attention_mask=torch.tensor([allowed])
                ).logits[0]
            choice = {}
            for p in masked:
                scores = logits[p].float().clone()
                scores[MASK_ID] = float("-inf")
                probs = torch.softmax(scores, dim=-1)
                token = int(probs.argmax())
                choice[p] = (token, float(probs[token]))
            confident = [p for p in masked if choice[p][1] > threshold]
            if len(confident) >= quota:
                commit = confident
            else:
                commit = sorted(masked, key=lambda p: (-choice[p][1], p))[: min(quota, len(masked))]
            for p in commit:
                x[p] = choice[p][0]
            if eos_early_stop and any(choice[p][0] == EOS_ID for p in commit):
                generated = x[n:hi]
                first = generated.index(EOS_ID)
                if MASK_ID not in generated[:first]:
                    return generated[: first + 1]
        if EOS_ID in x[n:hi]:
            break
    generated = x[n : n + gen_length]
    return generated[: generated.index(EOS_ID) + 1] if EOS_ID in generated else generated


def prompt_of(length, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 500, (length,), generator=g).tolist()


def run(model, prompts, **kwargs):
    return generate(model, prompts, DecodingOptions(**kwargs), mask_id=MASK_ID, eos_id=EOS_ID)


def mask_counts_per_block(recorder, block_length):
    """{block: [masks left in that block at each forward]} from the recorded uncached calls."""
    counts = {}
    for input_ids, position_ids in recorder.calls:
        block = int(position_ids[0, -1]) // block_length
        counts.setdefault(block, []).append(int((input_ids[0, -block_length:] == MASK_ID).sum()))
    return counts


SETTINGS = [dict(block_length=16, steps=4), dict(block_length=8, steps=8), dict(block_length=16, steps=3)]


@pytest.mark.parametrize("prompt_len", [5, 16, 37])  # shorter than, equal to, longer than a block of 16
@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: f"bl{s['block_length']}-steps{s['steps']}")
def test_cached_and_uncached_decoding_return_identical_tokens(sharp_model, prompt_len, setting):
    prompt = prompt_of(prompt_len)
    cached = run(sharp_model, [prompt], gen_length=24, use_cache=True, **setting)
    uncached = run(sharp_model, [prompt], gen_length=24, use_cache=False, **setting)
    assert cached.tokens == uncached.tokens
    assert cached.forward_passes == uncached.forward_passes
    assert len(cached.tokens[0]) == 24 and MASK_ID not in cached.tokens[0]


def test_cached_decoding_feeds_only_the_current_and_previous_block(sharp_model):
    recorder = Recorder(sharp_model)
    run(recorder, [prompt_of(37)], gen_length=24, block_length=8, steps=4)
    widths = [ids.shape[1] for ids, _ in recorder.calls]
    assert widths[0] == 40  # first forward: the prompt's whole blocks + the first block to decode
    assert max(widths[1:]) == 16 and min(widths) == 8


@pytest.mark.parametrize("prompt_len", [3, 8, 21])
@pytest.mark.parametrize("threshold", [0.95, 0.6])
@pytest.mark.parametrize("setting", SETTINGS[:2], ids=lambda s: f"bl{s['block_length']}-steps{s['steps']}")
def test_sampler_matches_plain_implementation_of_the_rule(sharp_model, prompt_len, threshold, setting):
    prompt = prompt_of(prompt_len, seed=prompt_len)
    expected = plain_generate(sharp_model, prompt, 24, setting["block_length"], setting["steps"], threshold)
    for use_cache in (True, False):
        got = run(sharp_model, [prompt], gen_length=24, threshold=threshold, use_cache=use_cache, **setting)
        assert got.tokens == [expected]


def test_comparison_with_plain_implementation_covers_both_commit_branches(sharp_model):
    """The sharp model commits more than the quota in some steps and exactly the quota in others."""
    recorder = Recorder(sharp_model)
    run(recorder, [prompt_of(8, seed=8)], gen_length=24, block_length=8, steps=8, threshold=0.6, use_cache=False)
    drops = [
        a - b
        for counts in mask_counts_per_block(recorder, 8).values()
        for a, b in zip(counts, counts[1:], strict=False)
    ]
    assert 1 in drops and max(drops) > 1


def test_threshold_one_commits_exactly_the_quota_per_step(sharp_model):
    recorder = Recorder(sharp_model)
    result = run(recorder, [prompt_of(5)], gen_length=27, block_length=16, steps=5, threshold=1.0, use_cache=False)
    assert transfer_schedule(16, 5) == [4, 3, 3, 3, 3]
    # block 0 holds 11 masks after the 5-token prompt; block 1 is all masks
    assert mask_counts_per_block(recorder, 16) == {0: [11, 7, 4, 1], 1: [16, 12, 9, 6, 3]}
    assert result.forward_passes == [9] and len(result.tokens[0]) == 27


def test_threshold_zero_commits_a_whole_block_per_forward(sharp_model):
    result = run(sharp_model, [prompt_of(5)], gen_length=40, block_length=16, steps=16, threshold=0.0)
    assert result.forward_passes == [3]  # 45 tokens -> blocks 0, 1, 2
    assert result.tokens == [plain_generate(sharp_model, prompt_of(5), 40, 16, 16, 0.0)]


def test_steps_above_block_length_decode_like_steps_equal_to_block_length(sharp_model):
    prompt = prompt_of(6)
    many = run(sharp_model, [prompt], gen_length=20, block_length=8, steps=50, threshold=0.9)
    equal = run(sharp_model, [prompt], gen_length=20, block_length=8, steps=8, threshold=0.9)
    assert transfer_schedule(8, 50)[:9] == [1] * 8 + [0]
    assert many.tokens == equal.tokens and many.forward_passes == equal.forward_passes


def test_steps_are_capped_by_gen_length_over_minimal_topk(sharp_model):
    prompt = prompt_of(3)
    capped = run(sharp_model, [prompt], gen_length=8, block_length=16, steps=32, minimal_topk=4, threshold=1.0)
    assert capped.forward_passes == [2]  # steps = min(32, 8 // 4) = 2, quotas [8, 8]; 13 masks
    uncapped = run(sharp_model, [prompt], gen_length=8, block_length=16, steps=32, threshold=1.0)
    assert uncapped.forward_passes == [7]  # steps = 8, quotas of 2; 13 masks


def test_generation_stops_after_the_block_where_eos_appears(sharp_model):
    recorder = Recorder(sharp_model, eos_at=[12])
    result = run(recorder, [prompt_of(5)], gen_length=40, block_length=8, steps=4)
    tokens = result.tokens[0]
    assert len(tokens) == 8 and tokens[-1] == EOS_ID and EOS_ID not in tokens[:-1]
    assert max(int(pos.max()) for _, pos in recorder.calls) == 15  # block 2 (16..23) never decoded
    assert tokens == plain_generate(Recorder(sharp_model, eos_at=[12]), prompt_of(5), 40, 8, 4, 0.95)


def test_eos_early_stop_returns_once_eos_has_no_mask_before_it(sharp_model):
    early = Recorder(sharp_model, eos_at=[5])
    result = run(early, [prompt_of(5)], gen_length=20, block_length=8, steps=8, threshold=1.0, eos_early_stop=True)
    assert result.tokens == [[EOS_ID]] and len(early.calls) == 1
    late = Recorder(sharp_model, eos_at=[5])
    result = run(late, [prompt_of(5)], gen_length=20, block_length=8, steps=8, threshold=1.0)
    assert result.tokens == [[EOS_ID]] and len(late.calls) == 3  # finishes block 0 (positions 5..7)


def test_eos_early_stop_waits_while_masks_precede_the_eos(sharp_model):
    recorder = Recorder(sharp_model, eos_at=[7])
    result = run(recorder, [prompt_of(5)], gen_length=20, block_length=8, steps=8, threshold=1.0, eos_early_stop=True)
    tokens = result.tokens[0]
    assert len(tokens) == 3 and tokens[-1] == EOS_ID and len(recorder.calls) == 3
    plain = plain_generate(Recorder(sharp_model, eos_at=[7]), prompt_of(5), 20, 8, 8, 1.0, eos_early_stop=True)
    assert tokens == plain


def test_eos_inside_the_prompt_does_not_stop_generation(flat_model):
    prompt = prompt_of(6)[:3] + [EOS_ID] + prompt_of(6)[3:]
    result = run(flat_model, [prompt], gen_length=20, block_length=8, steps=8)
    assert len(result.tokens[0]) == 20 and EOS_ID not in result.tokens[0]


@pytest.mark.parametrize(
    "sampling",
    [dict(threshold=0.9), dict(temperature=0.8, top_p=0.9), dict(temperature=1.0, top_k=20)],
    ids=["greedy", "top_p", "top_k"],
)
@pytest.mark.parametrize("use_cache", [True, False])
def test_batched_generation_equals_one_by_one(sharp_model, sampling, use_cache):
    prompts = [prompt_of(n, seed=n) for n in (3, 10, 17, 20, 33, 10)]
    options = DecodingOptions(gen_length=20, block_length=8, steps=4, use_cache=use_cache, seed=7, **sampling)
    batched = generate(sharp_model, prompts, options, MASK_ID, EOS_ID)
    alone = [generate(sharp_model, [p], options, MASK_ID, EOS_ID, row_ids=[i]) for i, p in enumerate(prompts)]
    assert batched.tokens == [a.tokens[0] for a in alone]
    assert batched.forward_passes == [a.model_calls for a in alone]
    assert batched.model_calls < sum(a.model_calls for a in alone)  # rows really shared forwards


def test_temperature_sampling_is_reproducible_per_seed(flat_model):
    prompt = prompt_of(9)
    first = run(flat_model, [prompt], gen_length=16, block_length=8, steps=4, temperature=1.0, seed=3)
    again = run(flat_model, [prompt], gen_length=16, block_length=8, steps=4, temperature=1.0, seed=3)
    other = run(flat_model, [prompt], gen_length=16, block_length=8, steps=4, temperature=1.0, seed=4)
    greedy = run(flat_model, [prompt], gen_length=16, block_length=8, steps=4)
    assert first.tokens == again.tokens
    assert first.tokens != other.tokens and first.tokens != greedy.tokens


@pytest.mark.parametrize("filters", [dict(top_k=1), dict(top_p=1e-6)])
def test_sampling_with_a_single_candidate_equals_greedy(sharp_model, filters):
    prompt = prompt_of(11)
    sampled = run(sharp_model, [prompt], gen_length=24, block_length=8, steps=4, temperature=1.0, **filters)
    greedy = run(sharp_model, [prompt], gen_length=24, block_length=8, steps=4, threshold=0.0)
    assert sampled.tokens == greedy.tokens
    assert sampled.forward_passes == [4]  # confidence 1.0 everywhere: a block per forward


def test_temperature_zero_is_argmax_not_a_sample(flat_model):
    """The card's code samples at temperature 0; here two different seeds give the same tokens."""
    prompt = prompt_of(9)
    a = run(flat_model, [prompt], gen_length=16, block_length=8, steps=4, seed=1)
    b = run(flat_model, [prompt], gen_length=16, block_length=8, steps=4, seed=2)
    assert a.tokens == b.tokens == [plain_generate(flat_model, prompt, 16, 8, 4, 0.95)]


def test_confidence_is_the_chosen_tokens_probability_after_temperature_and_filters():
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0)) * 3
    tokens, confidence = sample_tokens(logits, 0.5, top_k=10, generator=torch.Generator().manual_seed(1))
    probs = torch.softmax(filter_logits(logits / 0.5, 10, None), dim=-1)
    assert torch.allclose(confidence, probs.gather(-1, tokens[:, None]).squeeze(-1))
    assert all(t in logits[i].topk(10).indices for i, t in enumerate(tokens.tolist()))
    tokens, confidence = sample_tokens(logits, 0.0)
    assert torch.equal(tokens, logits.argmax(-1))
    assert torch.allclose(confidence, torch.softmax(logits, -1).max(-1).values)


def test_top_p_keeps_the_smallest_nucleus_reaching_p():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    kept = torch.isfinite(filter_logits(logits, None, 0.75))
    assert kept.tolist() == [[True, True, False, False]]
    assert torch.isfinite(filter_logits(logits, 3, None)).tolist() == [[True, True, True, False]]


def test_transfer_schedule_gives_the_remainder_to_the_first_steps():
    assert transfer_schedule(32, 32) == [1] * 32
    assert transfer_schedule(32, 5) == [7, 7, 6, 6, 6]
    assert sum(transfer_schedule(32, 7)) == 32


def test_block_causal_mask_matches_bruteforce():
    mask = block_causal_mask(5, 13, 4)
    expected = [[k // 4 <= q // 4 for k in range(13)] for q in range(5, 13)]
    assert mask.shape == (1, 8, 13) and mask[0].tolist() == expected


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(block_length=0), "block_length"),
        (dict(block_length=-8), "block_length"),
        (dict(steps=0), "steps"),
        (dict(gen_length=0), "gen_length"),
        (dict(threshold=1.5), "threshold"),
        (dict(threshold=-0.1), "threshold"),
        (dict(temperature=-1.0), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_k=-1), "top_k"),
        (dict(gen_length=4, minimal_topk=5), "minimal_topk"),
    ],
)
def test_bad_decoding_options_raise_value_error_naming_them(kwargs, name):
    with pytest.raises(ValueError, match=name):
        DecodingOptions(**kwargs)


@pytest.mark.parametrize(
    "mask_id, eos_id, prompts, message",
    [
        (VOCAB, EOS_ID, [[1, 2]], "mask_id=512 is outside"),
        (-1, EOS_ID, [[1, 2]], "mask_id=-1 is outside"),
        (MASK_ID, VOCAB + 3, [[1, 2]], "eos_id=515 is outside"),
        (MASK_ID, MASK_ID, [[1, 2]], "eos_id and mask_id"),
        (MASK_ID, EOS_ID, [], "prompts is empty"),
        (MASK_ID, EOS_ID, [[1, 2], [3, MASK_ID]], r"prompts\[1\]\[1\] is the mask token"),
        (MASK_ID, EOS_ID, [[1, 9999]], r"prompts\[0\]\[1\]=9999 is outside"),
    ],
)
def test_bad_token_ids_raise_value_error_naming_them(flat_model, mask_id, eos_id, prompts, message):
    with pytest.raises(ValueError, match=message):
        generate(flat_model, prompts, DecodingOptions(gen_length=8), mask_id, eos_id)
