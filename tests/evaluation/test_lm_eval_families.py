"""The lm-eval model on a full-attention family (LLaDA): the ELBO scores the whole sequence as one block,
as LLaDA's own evaluation does, and decoding follows the family's sampler (low_confidence rule)."""

import importlib.util
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from megadiff.evaluation.generation import request_decoding
from megadiff.evaluation.likelihood import continuation_noise, estimate_loglikelihoods
from megadiff.evaluation.model_args import decoding_options, parse_model_args
from megadiff.hf.tokenizer import build_tiny_tokenizer
from megadiff.models.common.hf_dir import write_reference_dir
from megadiff.models.registry import family

MASK_ID = 1  # the tiny LLaDA preset's


@pytest.fixture(scope="module")
def llada():
    fam = family("llada")
    return fam.build_reference(fam.preset("tiny"), seed=0)


@torch.no_grad()
def plain_llada_elbo(model, context, continuation, mc_num, seed):
    """LLaDA's likelihood estimate written out: the context clean, the continuation's sampled masks,
    full attention over the whole sequence, -(1/mc) sum_k sum_masked CE / t_k."""
    masks, t = continuation_noise(seed, context, continuation, mc_num)
    total = 0.0
    for k in range(mc_num):
        y = torch.tensor(continuation)
        ids = torch.tensor(context + torch.where(masks[k], MASK_ID, y).tolist())[None]
        logits = model(ids).logits[0, len(context) :]
        ce = F.cross_entropy(logits[masks[k]].double(), y[masks[k]], reduction="sum")
        total += float(ce) / float(t[k])
    return -total / mc_num


def test_full_attention_family_elbo_is_one_block_over_the_whole_sequence(llada):
    pairs = [([5, 9, 13, 7], [21, 22, 23, 24, 25]), ([8, 3], [40, 41, 42])]
    got = estimate_loglikelihoods(
        llada, pairs, mask_id=MASK_ID, mc_num=4, batch_size=3, block_length=sys.maxsize, seed=3
    )
    expected = [plain_llada_elbo(llada, c, y, 4, 3) for c, y in pairs]
    assert got == pytest.approx(expected, rel=1e-6)


@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason="lm-eval is not installed")
def test_lm_eval_model_args_take_the_family_sampler_and_scale_steps_per_request(tmp_path):
    write_reference_dir(family("llada"), str(tmp_path), seed=0)
    build_tiny_tokenizer(tmp_path)
    args = parse_model_args({"pretrained": str(tmp_path)})
    base = decoding_options(args)
    sampler = family("llada").sampler
    assert (base.rule, base.gen_length, base.block_length, base.steps) == (
        sampler.rule,
        sampler.gen_length,
        sampler.block_length,
        sampler.steps,
    )
    options, _ = request_decoding(base, {"max_gen_toks": 64, "until": ["\n"]})
    per_block = sampler.steps // (sampler.gen_length // sampler.block_length)
    assert (options.gen_length, options.steps) == (64, per_block * 2)
    with pytest.raises(ValueError, match="gen_length=50 is not a multiple of block_length=32"):
        request_decoding(base, {"max_gen_toks": 50})
    overridden = decoding_options(parse_model_args({"pretrained": str(tmp_path), "rule": "threshold"}))
    assert overridden.rule == "threshold"

    from megadiff.evaluation.lm_eval_model import MegadiffLM

    lm = MegadiffLM(pretrained=str(tmp_path), mc_num=2, device="cpu")
    assert lm.likelihood_block_length == sys.maxsize  # LLaDA's recipe: full-attention diffusion
    request = SimpleNamespace(args=("2 + 2 =", " 4"))
    [(score, greedy)] = lm.loglikelihood([request])
    assert score < 0 and greedy is False
    [text] = lm.generate_until([SimpleNamespace(args=("2 + 2 =", {"max_gen_toks": 32, "until": ["\n"]}))])
    assert isinstance(text, str)
