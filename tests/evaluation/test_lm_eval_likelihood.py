"""The Monte-Carlo ELBO behind the lm-eval model's `loglikelihood` (megadiff.evaluation.likelihood):
its noise, and the cached, batched computation against the plain [x_t ; x_0] one (elbo_reference).
Needs no lm-eval."""

import pytest
import torch
from elbo_reference import direct_loglikelihood

from megadiff.evaluation.likelihood import continuation_noise, estimate_loglikelihoods, stratified_mask_counts
from megadiff.hf.tiny import write_tiny_model_dir
from megadiff.inference import load_model, load_tokenizer

TOLERANCE = 1e-5  # absolute, on log-likelihoods of about -10 to -300 (fp32 model, fp64 sums)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model_dir = write_tiny_model_dir(str(tmp_path_factory.mktemp("tiny_llada2")), seed=0, num_hidden_layers=2)
    tokenizer = load_tokenizer(model_dir)
    return load_model(model_dir), tokenizer, tokenizer.convert_tokens_to_ids("<|mask|>")


def pairs_of(tokenizer):
    """(context, continuation) ids: a context of several blocks with a short answer, a short context
    with a continuation over several blocks, an empty context, an empty continuation."""
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False)
    return [
        (encode("Tom has 3 apples and gets 4 more. How many apples does Tom have? " * 2), encode("3 + 4 = 7\n#### 7")),
        (encode("Hi"), encode(" there, how many apples do you have? I have 3 + 4 = 7 and then some more words")),
        ([], encode("hello world")),
        (encode("nothing to score"), []),
    ]


def test_noise_masks_stratified_counts_of_the_continuation_only_and_depends_only_on_seed_and_ids():
    masks, t = continuation_noise(seed=3, context=[1, 2, 3], continuation=list(range(10, 30)), mc_num=8)
    counts = masks.sum(dim=1)
    assert masks.shape == (8, 20) and torch.equal(t, counts.double() / 20)
    assert counts.min() >= 1 and counts.max() <= 20
    # stratified: the sorted counts step by L / mc_num = 2.5 (LLaDA's linspace, rounded and wrapped)
    steps = counts.sort().values.diff()
    assert steps.min() >= 2 and steps.max() <= 3
    again, _ = continuation_noise(seed=3, context=[1, 2, 3], continuation=list(range(10, 30)), mc_num=8)
    assert torch.equal(masks, again)
    assert not torch.equal(masks, continuation_noise(4, [1, 2, 3], list(range(10, 30)), 8)[0])
    assert not torch.equal(masks, continuation_noise(3, [1, 2, 4], list(range(10, 30)), 8)[0])
    generator = torch.Generator().manual_seed(0)
    assert all(1 <= c <= 5 for c in stratified_mask_counts(5, 64, generator).tolist())


@pytest.mark.parametrize("block_length", [8, 1024])  # several blocks; one block (LLaDA's full attention)
def test_loglikelihood_equals_the_direct_block_diffusion_elbo_with_the_same_seed(tiny, block_length):
    model, tokenizer, mask_id = tiny
    pairs = pairs_of(tokenizer)
    for mc_num, batch_size in ((1, 1), (5, 3), (4, 16)):  # samples split over forwards; requests sharing one
        got = estimate_loglikelihoods(
            model, pairs, mask_id=mask_id, mc_num=mc_num, batch_size=batch_size, block_length=block_length, seed=7
        )
        want = [
            direct_loglikelihood(model, c, y, mask_id=mask_id, mc_num=mc_num, block_length=block_length, seed=7)
            for c, y in pairs
        ]
        assert got[-1] == 0.0 and want[0] < -1.0
        assert max(abs(g - w) for g, w in zip(got, want, strict=True)) < TOLERANCE, (mc_num, batch_size, got, want)


def test_loglikelihood_does_not_depend_on_batch_size_or_request_order(tiny):
    model, tokenizer, mask_id = tiny
    pairs = pairs_of(tokenizer)[:3]
    kwargs = dict(mask_id=mask_id, mc_num=6, block_length=8, seed=1)
    alone = [estimate_loglikelihoods(model, [p], batch_size=1, **kwargs)[0] for p in pairs]
    together = estimate_loglikelihoods(model, pairs[::-1], batch_size=32, **kwargs)[::-1]
    assert max(abs(a - b) for a, b in zip(alone, together, strict=True)) < TOLERANCE
    other_seed = estimate_loglikelihoods(model, pairs, batch_size=32, **{**kwargs, "seed": 2})
    assert all(abs(a - b) > 1e-3 for a, b in zip(alone, other_seed, strict=True))


def test_pairs_that_cannot_be_scored_are_named(tiny):
    model, tokenizer, mask_id = tiny
    kwargs = dict(mask_id=mask_id, mc_num=1, batch_size=1, block_length=8)
    with pytest.raises(ValueError, match=r"pairs\[1\]: the continuation holds the mask token"):
        estimate_loglikelihoods(model, [([1], [2]), ([1], [2, mask_id])], **kwargs)
    too_long = model.config.max_position_embeddings
    with pytest.raises(ValueError, match=r"pairs\[0\]: context \+ continuation is .* max_position_embeddings"):
        estimate_loglikelihoods(model, [([1] * too_long, [2])], **kwargs)
    with pytest.raises(ValueError, match="mc_num must be a positive integer, got 0"):
        estimate_loglikelihoods(model, [([1], [2])], **{**kwargs, "mc_num": 0})
