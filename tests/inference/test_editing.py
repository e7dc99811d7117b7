"""LLaDA2.1 draft-and-edit decoding (megadiff.inference.editing, driven by the cached sampler) against
a plain, uncached implementation of the rule written out here from its description."""

import math

import pytest
import torch
from conftest import tiny_model
from inference_helpers import EOS_ID, MASK_ID, Recorder

from megadiff.inference import DecodingOptions, generate


def plain_edit_generate(
    model,
    prompt,
    gen_length,
    block_length,
    threshold,
    editing_threshold,
    max_post_steps=16,
    num_to_transfer=1,
    eos_early_stop=False,
    draft=(),
):
    """The LLaDA2.1 rule, plainly: one prompt, greedy, no cache, the whole prefix every forward,
    Python lists. Returns (tokens, forwards, edits)."""
    n = len(prompt)
    num_blocks = math.ceil((n + gen_length) / block_length)
    x = list(prompt) + list(draft) + [MASK_ID] * (num_blocks * block_length - n - len(draft))
    forwards = edits = 0
    for block in range(n // block_length, num_blocks):
        lo, hi = block * block_length, (block + 1) * block_length
        post_steps = 0
        while True:
            masked = [p for p in range(lo, hi) if x[p] == MASK_ID]
            if not masked:
                post_steps += 1
            if post_steps > max_post_steps:
                break
            allowed = [[k // block_length <= q // block_length for k in range(hi)] for q in range(hi)]
            with torch.no_grad():
                logits = model(
                    torch.tensor([x[:hi]]), position_ids=torch.arange(hi)[None], attention_mask=torch.tensor([allowed])
                ).logits[0]
            forwards += 1
            choice = {}
            for p in range(lo, hi):
                scores = logits[p].float().clone()
                scores[MASK_ID] = float("-inf")
                probs = torch.softmax(scores, dim=-1)
                token = int(probs.argmax())
                choice[p] = (token, float(probs[token]))
            commit = []
            if masked:
                confident = [p for p in masked if choice[p][1] > threshold]
                if len(confident) >= num_to_transfer:
                    commit = confident
                else:
                    commit = sorted(masked, key=lambda p: (-choice[p][1], p))[:num_to_transfer]
            edit = [
                p
                for p in range(lo, hi)
                if p not in masked and p >= n and choice[p][1] > editing_threshold and choice[p][0] != x[p]
            ]
            for p in commit + edit:
                x[p] = choice[p][0]
            edits += len(edit)
            if not masked and not edit:
                break
        if eos_early_stop and EOS_ID in x[n:hi]:
            break
    generated = x[n : n + gen_length]
    if EOS_ID in generated:
        generated = generated[: generated.index(EOS_ID) + 1]
    return generated, forwards, edits


@pytest.fixture(scope="module")
def editing_model():
    """Sharpened tiny model (lm_head x 30): many predictions are confident, and they change as the
    block fills in, so committed tokens really get edited."""
    return tiny_model(seed=3, lm_head_scale=30.0)


def prompt_of(length, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 500, (length,), generator=g).tolist()


def run(model, prompts, **kwargs):
    return generate(model, prompts, DecodingOptions(**kwargs), mask_id=MASK_ID, eos_id=EOS_ID)


THRESHOLDS = [(0.95, 0.9), (0.8, 0.5), (0.6, 0.2)]  # (threshold, editing_threshold)


@pytest.mark.parametrize("prompt_len", [5, 16, 37])  # shorter than, equal to, longer than a block of 16
@pytest.mark.parametrize("thresholds", THRESHOLDS, ids=lambda t: f"th{t[0]}-edit{t[1]}")
@pytest.mark.parametrize("num_to_transfer", [1, 3])
def test_cached_sampler_matches_plain_rule(editing_model, prompt_len, thresholds, num_to_transfer):
    threshold, editing_threshold = thresholds
    prompt = prompt_of(prompt_len, seed=prompt_len)
    expected, forwards, edits = plain_edit_generate(
        editing_model, prompt, 32, 16, threshold, editing_threshold, max_post_steps=4, num_to_transfer=num_to_transfer
    )
    got = run(
        editing_model,
        [prompt],
        gen_length=32,
        block_length=16,
        threshold=threshold,
        editing_threshold=editing_threshold,
        max_post_steps=4,
        num_to_transfer=num_to_transfer,
    )
    assert got.tokens == [expected]
    assert got.forward_passes == [forwards] and got.edits == [edits]
    if editing_threshold <= 0.5:
        assert edits > 0, "the sharpened model made no edit: this case does not test T2T"


def test_edits_happen_and_change_the_result(editing_model):
    """Sanity for the fixture: on this model editing re-writes tokens, so the results differ from
    the same decoding with editing that can never fire (threshold 1.0: p > 1 is impossible)."""
    prompts = [prompt_of(n, seed=n) for n in (5, 16, 37)]
    edited = run(editing_model, prompts, gen_length=32, block_length=16, threshold=0.8, editing_threshold=0.3)
    never = run(editing_model, prompts, gen_length=32, block_length=16, threshold=0.8, editing_threshold=1.0)
    assert edited.num_edits >= 3 and never.num_edits == 0
    assert edited.tokens != never.tokens


@pytest.mark.parametrize("num_to_transfer", [1, 2, 4])
@pytest.mark.parametrize("prompt_len", [3, 16, 21])
def test_editing_off_decodes_like_the_2_0_rule(editing_model, prompt_len, num_to_transfer):
    """With T2T unable to fire, M2T with num_to_transfer K is the 2.0 rule with steps = bl // K."""
    prompt = prompt_of(prompt_len, seed=7)
    common = dict(gen_length=24, block_length=8, threshold=0.9)
    card = run(editing_model, [prompt], steps=8 // num_to_transfer, **common)
    edit_off = run(editing_model, [prompt], editing_threshold=1.0, num_to_transfer=num_to_transfer, **common)
    assert edit_off.tokens == card.tokens and edit_off.num_edits == 0


def test_prompt_and_earlier_blocks_never_change(editing_model):
    prompt = prompt_of(21, seed=1)
    recorder = Recorder(editing_model)
    result = generate(
        recorder,
        [prompt],
        DecodingOptions(gen_length=40, block_length=8, threshold=0.6, editing_threshold=0.0, use_cache=False),
        MASK_ID,
        EOS_ID,
    )
    assert result.num_edits > 0
    frozen = {}  # block -> its tokens once decoding moved past it
    for input_ids, _ in recorder.calls:
        ids = input_ids[0].tolist()
        assert ids[:21] == prompt
        current = len(ids) // 8 - 1
        for block in range(current):
            assert frozen.setdefault(block, ids[block * 8 : (block + 1) * 8]) == ids[block * 8 : (block + 1) * 8]
    assert len(frozen) >= 5


@pytest.mark.parametrize("max_post_steps", [0, 2])
def test_post_step_limit_is_honoured(editing_model, max_post_steps):
    """editing_threshold 0: every changed prediction is written back, so blocks keep editing and
    the limit is what ends them. Post steps = forwards whose current block has no mask."""
    recorder = Recorder(editing_model)
    options = DecodingOptions(
        gen_length=48, block_length=8, threshold=0.6, editing_threshold=0.0, max_post_steps=max_post_steps
    )
    options = DecodingOptions(**{**options.__dict__, "use_cache": False})
    generate(recorder, [prompt_of(5, seed=2)], options, MASK_ID, EOS_ID)
    post = {}
    for input_ids, position_ids in recorder.calls:
        block = int(position_ids[0, -1]) // 8
        post[block] = post.get(block, 0) + int(not (input_ids[0, -8:] == MASK_ID).any())
    assert max(post.values()) == max_post_steps  # reached (the limit binds) and never exceeded


def test_eos_handling(editing_model):
    """The result is cut at the first EOS, inclusive; eos_early_stop saves forwards only."""
    prompt = prompt_of(5, seed=4)
    common = dict(gen_length=40, block_length=8, threshold=0.8, editing_threshold=0.5, use_cache=False)
    full = generate(Recorder(editing_model, eos_at=(14,)), [prompt], DecodingOptions(**common), MASK_ID, EOS_ID)
    early = generate(
        Recorder(editing_model, eos_at=(14,)), [prompt], DecodingOptions(eos_early_stop=True, **common), MASK_ID, EOS_ID
    )
    assert full.tokens[0][-1] == EOS_ID and len(full.tokens[0]) == 14 - 5 + 1
    assert early.tokens == full.tokens
    assert early.forward_passes[0] < full.forward_passes[0]
    plain, forwards, edits = plain_edit_generate(
        Recorder(editing_model, eos_at=(14,)), prompt, 40, 8, 0.8, 0.5, eos_early_stop=True
    )
    assert early.tokens == [plain] and early.forward_passes == [forwards] and early.edits == [edits]


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_batched_decoding_equals_one_by_one(editing_model, temperature):
    prompts = [prompt_of(n, seed=n) for n in (3, 16, 21, 40, 5)]
    options = dict(gen_length=24, block_length=8, threshold=0.7, editing_threshold=0.4, temperature=temperature)
    batched = generate(editing_model, prompts, DecodingOptions(**options), MASK_ID, EOS_ID)
    assert batched.num_edits > 0
    for i, prompt in enumerate(prompts):
        single = generate(editing_model, [prompt], DecodingOptions(**options), MASK_ID, EOS_ID, row_ids=[i])
        assert single.tokens[0] == batched.tokens[i]
        assert single.edits[0] == batched.edits[i] and single.forward_passes[0] == batched.forward_passes[i]


def test_bad_editing_options_are_refused():
    with pytest.raises(ValueError, match="editing_threshold"):
        DecodingOptions(editing_threshold=1.5)
    with pytest.raises(ValueError, match="max_post_steps"):
        DecodingOptions(max_post_steps=-1)
    with pytest.raises(ValueError, match="num_to_transfer"):
        DecodingOptions(num_to_transfer=0)


def test_a_draft_is_re_decoded_by_the_rule_and_kept_by_the_2_0_rule(editing_model):
    """drafts= writes committed tokens (and mask holes) after the prompt: draft-and-edit treats them
    as the plain rule does; the 2.0 rule only fills the holes."""
    prompt = prompt_of(9, seed=5)
    draft = prompt_of(20, seed=6)
    draft[3] = draft[11] = MASK_ID
    expected, forwards, edits = plain_edit_generate(editing_model, prompt, 24, 8, 0.8, 0.3, draft=draft)
    common = dict(gen_length=24, block_length=8, threshold=0.8)
    edited = generate(
        editing_model, [prompt], DecodingOptions(editing_threshold=0.3, **common), MASK_ID, EOS_ID, drafts=[draft]
    )
    assert edited.tokens == [expected] and edited.edits == [edits] and edits > 0
    kept = generate(editing_model, [prompt], DecodingOptions(**common), MASK_ID, EOS_ID, drafts=[draft])
    filled = kept.tokens[0]
    assert all(filled[i] == draft[i] for i in range(min(20, len(filled))) if i not in (3, 11))
    assert MASK_ID not in filled and kept.num_edits == 0
