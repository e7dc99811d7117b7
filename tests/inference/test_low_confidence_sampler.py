"""LLaDA's sampler (options.rule "low_confidence", megadiff.inference.low_confidence) against a plain
re-implementation of the public LLaDA generate.py's algorithm, on tiny LLaDA / LLaDA-MoE references."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from megadiff.inference import DecodingOptions, generate
from megadiff.inference.sampler import check_positions, row_seed
from megadiff.models.registry import family

MASK_ID = 1  # the tiny presets' mask_token_id
EOS_ID = 0


class NoMaskPrediction(torch.nn.Module):
    """The model with the mask token's logit at -inf: what megadiff's sampler decodes (its one
    documented change of the rule); generate.py run on this wrapper must give the same tokens."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        logits = self.model(x).logits.clone()
        logits[..., MASK_ID] = float("-inf")
        return type("Out", (), {"logits": logits})


def get_num_transfer_tokens(mask_index, steps):
    mask_num = mask_index.sum(dim=1, keepdim=True)
    base, remainder = mask_num // steps, mask_num % steps
    num = torch.zeros(mask_num.size(0), steps, dtype=torch.int64) + base
    for i in range(mask_num.size(0)):
        num[i, : remainder[i]] += 1
    return num


@torch.no_grad()
def plain_llada_generate(model, prompt, steps, gen_length, block_length, temperature=0.0, remasking="low_confidence",
                         generator=None):  # fmt: skip
    """generate.py's algorithm, one prompt, cfg_scale 0. With `generator`, the Gumbel noise (only at
    temperature > 0) and the random confidences are drawn for the current block's positions only, as
    megadiff draws them (generate.py discards the other positions' draws); else as generate.py."""
    prompt = torch.tensor([prompt])
    p_len = prompt.shape[1]
    x = torch.full((1, p_len + gen_length), MASK_ID, dtype=torch.long)
    x[:, :p_len] = prompt
    assert gen_length % block_length == 0
    num_blocks = gen_length // block_length
    assert steps % num_blocks == 0
    steps = steps // num_blocks
    for num_block in range(num_blocks):
        lo, hi = p_len + num_block * block_length, p_len + (num_block + 1) * block_length
        num_transfer_tokens = get_num_transfer_tokens(x[:, lo:hi] == MASK_ID, steps)
        for i in range(steps):
            mask_index = x == MASK_ID
            logits = model(x).logits
            logits64 = logits.to(torch.float64)
            if generator is None:
                noise = torch.rand_like(logits64)
            else:  # megadiff draws noise only where it can matter: the block, at temperature > 0
                noise = torch.full_like(logits64, 0.5)
                if temperature > 0:
                    shape = (hi - lo, logits.shape[-1])
                    noise[0, lo:hi] = torch.rand(shape, dtype=torch.float64, generator=generator)
            x0 = torch.argmax(logits64.exp() / (-torch.log(noise)) ** temperature, dim=-1)
            if remasking == "low_confidence":
                p = F.softmax(logits64, dim=-1)
                x0_p = torch.squeeze(torch.gather(p, dim=-1, index=torch.unsqueeze(x0, -1)), -1)
            else:
                x0_p = torch.rand(x0.shape, dtype=torch.float64)
                if generator is not None:
                    x0_p[0, lo:hi] = torch.rand(hi - lo, dtype=torch.float64, generator=generator)
            x0_p[:, hi:] = -np.inf
            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, x0_p, -np.inf)
            transfer_index = torch.zeros_like(x0, dtype=torch.bool)
            for j in range(confidence.shape[0]):
                _, select_index = torch.topk(confidence[j], k=int(num_transfer_tokens[j, i]))
                transfer_index[j, select_index] = True
            x[transfer_index] = x0[transfer_index]
    return x[0, p_len:].tolist()


def tiny(name, seed=0, head_scale=6.0):
    fam = family(name)
    model = fam.build_reference(fam.preset("tiny"), seed=seed)
    head = model.model.transformer.ff_out if name == "llada" else model.lm_head
    with torch.no_grad():
        head.weight.mul_(head_scale)  # sharper predictions: fewer near-ties between confidences
    return model


@pytest.fixture(scope="module")
def llada():
    return tiny("llada")


def prompt_of(length, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, 500, (length,), generator=g).tolist()


def run(model, prompts, eos_id=None, **kwargs):
    options = DecodingOptions(rule="low_confidence", **kwargs)
    return generate(model, prompts, options, mask_id=MASK_ID, eos_id=eos_id)


# (gen_length, block_length, steps): one block; several blocks with even quotas; quotas with a remainder
# (8 masks over 3 iterations: 3, 3, 2); more iterations than masks (quota 0 at the end)
SETTINGS = [(16, 16, 16), (16, 4, 8), (24, 8, 9), (8, 4, 10)]


@pytest.mark.parametrize("gen_length,block_length,steps", SETTINGS)
@pytest.mark.parametrize("prompt_len", [5, 11])
def test_low_confidence_sampler_matches_plain_generate_py(llada, gen_length, block_length, steps, prompt_len):
    prompt = prompt_of(prompt_len, seed=prompt_len)
    expected = plain_llada_generate(NoMaskPrediction(llada), prompt, steps, gen_length, block_length)
    got = run(llada, [prompt], gen_length=gen_length, block_length=block_length, steps=steps)
    assert got.tokens == [expected]
    assert MASK_ID not in expected
    iterations = steps // (gen_length // block_length)
    assert got.forward_passes == [(gen_length // block_length) * min(iterations, block_length)]


def test_low_confidence_sampler_matches_plain_generate_py_on_lladamoe():
    model = tiny("lladamoe", seed=1)
    prompt = prompt_of(7, seed=3)
    expected = plain_llada_generate(NoMaskPrediction(model), prompt, 9, 24, 8)
    assert run(model, [prompt], gen_length=24, block_length=8, steps=9).tokens == [expected]


@pytest.mark.parametrize(
    "temperature,remasking,gen_length,block_length,steps",
    [(0.7, "low_confidence", 16, 8, 4), (0.0, "random", 12, 4, 6), (1.0, "random", 12, 4, 6)],
)
def test_sampling_and_random_remasking_match_plain_generate_py(
    llada, temperature, remasking, gen_length, block_length, steps
):
    prompt, seed = prompt_of(6, seed=1), 5
    generator = torch.Generator().manual_seed(row_seed(seed, 0))
    expected = plain_llada_generate(
        NoMaskPrediction(llada), prompt, steps, gen_length, block_length, temperature, remasking, generator
    )
    settings = dict(gen_length=gen_length, block_length=block_length, steps=steps)
    got = run(llada, [prompt], temperature=temperature, remasking=remasking, seed=seed, **settings)
    assert got.tokens == [expected]
    assert got.tokens != run(llada, [prompt], **settings).tokens  # the draws matter


class FavoursMask(torch.nn.Module):
    """The model with the mask token as its most likely prediction everywhere."""

    def __init__(self, model):
        super().__init__()
        self.model, self.cfg = model, model.cfg

    def forward(self, x):
        logits = self.model(x).logits.clone()
        logits[..., MASK_ID] += 100.0
        return type("Out", (), {"logits": logits})


def test_the_mask_token_is_never_predicted(llada):
    prompt = prompt_of(5, seed=2)
    expected = plain_llada_generate(NoMaskPrediction(llada), prompt, 8, 8, 4)
    got = run(FavoursMask(llada), [prompt], gen_length=8, block_length=4, steps=8)
    assert got.tokens == [expected] and MASK_ID not in expected


def test_generation_stops_after_the_block_holding_eos_and_cuts_there(llada):
    prompt = prompt_of(5, seed=5)
    full = plain_llada_generate(NoMaskPrediction(llada), prompt, 16, 16, 4)
    eos = full[6]  # a token of the second block, as the EOS id
    got = run(llada, [prompt], eos_id=eos, gen_length=16, block_length=4, steps=16)
    assert got.tokens == [full[: full.index(eos) + 1]]
    assert got.forward_passes == [4 * (full.index(eos) // 4 + 1)]  # no forward after that block


def test_batched_rows_of_different_prompt_lengths_equal_one_by_one(llada):
    prompts = [prompt_of(5, seed=1), prompt_of(8, seed=2), prompt_of(5, seed=3)]
    settings = dict(gen_length=8, block_length=4, steps=4, temperature=0.5)
    batched = generate(llada, prompts, DecodingOptions(rule="low_confidence", **settings), MASK_ID, None)
    for i, prompt in enumerate(prompts):
        alone = generate(llada, [prompt], DecodingOptions(rule="low_confidence", **settings), MASK_ID, None, [i])
        assert batched.tokens[i] == alone.tokens[0]
    assert batched.model_calls == 2 * 4  # two prompt lengths, 4 iterations each


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(gen_length=10, block_length=4), "gen_length=10 is not a multiple of block_length=4"),
        (dict(gen_length=12, block_length=4, steps=4), "steps=4 is not a multiple of the 3 blocks"),
        (dict(top_k=5), "top_k is not part of the low_confidence rule"),
        (dict(editing_threshold=0.9), "editing_threshold is not part of the low_confidence rule"),
        (dict(remasking="lowest"), "remasking must be one of low_confidence, random"),
    ],
)
def test_bad_low_confidence_options_are_refused_by_name(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DecodingOptions(**dict(dict(rule="low_confidence", gen_length=16, block_length=4, steps=8), **kwargs))
    with pytest.raises(ValueError, match="rule must be one of threshold, low_confidence"):
        DecodingOptions(rule="entropy")


def test_position_check_counts_no_block_padding_for_low_confidence():
    options = DecodingOptions(rule="low_confidence", gen_length=8, block_length=4, steps=8)
    check_positions(13, [[2] * 5], options)  # 5 + 8 positions fit
    with pytest.raises(ValueError, match="that is 14 positions"):
        check_positions(13, [[2] * 6], options)
