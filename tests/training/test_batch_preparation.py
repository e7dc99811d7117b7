"""What the model is fed in each training mode."""

from types import SimpleNamespace

import torch

from megadiff.diffusion.masks import block_diffusion_mask
from megadiff.training.batch import loss_denominator, prepare_micro_batch

MASK = 99


def micro_batch():
    # two documents in one row: prompt (3 tokens) + answer (5 tokens) each, then 2 fill tokens
    ids = torch.arange(1, 19)[None]
    doc = torch.tensor([[0] * 8 + [1] * 8 + [2] * 2])
    pos = torch.tensor([list(range(8)) + list(range(8)) + [0, 1]])
    loss_mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1] * 2 + [0, 0]], dtype=torch.bool)
    sample_ids = torch.tensor([[4] * 8 + [7] * 8 + [-1] * 2])
    return dict(
        input_ids=ids,
        position_ids=pos,
        doc_ids=doc,
        loss_mask=loss_mask,
        sample_ids=sample_ids,
        epoch=torch.tensor([0]),
    )


def diffusion(mode, **kw):
    base = dict(mode=mode, t_low=0.5, t_high=0.9, complementary_masks=False, block_size=4, edit_ratio=0.0)
    return SimpleNamespace(**{**base, **kw})


def test_full_attention_mode_feeds_noised_tokens():
    b = prepare_micro_batch(micro_batch(), diffusion("full"), MASK, seed=1)
    assert b["masked"].any(), "with t >= 0.5 some of 10 answer tokens must be masked"
    assert torch.equal(b["input_ids"], torch.where(b["masked"], torch.tensor(MASK), b["targets"]))
    assert not (b["masked"] & ~b["loss_mask"]).any()  # prompts and fill are never noised


def test_block_diffusion_mode_feeds_noisy_then_clean_with_shared_positions():
    mb = micro_batch()
    b = prepare_micro_batch(mb, diffusion("block_diffusion"), MASK, seed=1)
    S = mb["input_ids"].shape[1]
    assert torch.equal(b["input_ids"][:, S:], mb["input_ids"])
    assert (b["input_ids"][:, :S] == MASK).sum() == b["masked"].sum() > 0
    assert torch.equal(b["position_ids"], torch.cat([mb["position_ids"]] * 2, dim=1))
    assert torch.equal(b["allowed"], block_diffusion_mask(mb["doc_ids"], mb["position_ids"], 4))


def test_denominators():
    b = prepare_micro_batch(micro_batch(), diffusion("full"), MASK, seed=1)
    assert loss_denominator(b, "masked_tokens") == b["masked"].sum()
    assert loss_denominator(b, "answer_tokens") == 10
    assert loss_denominator(b, "sequence") == 2


def test_edit_stream_corrupts_x_t_only_in_both_modes():
    """Editing stream: replaced tokens sit in x_t at `edited` (visible answer positions); x_0 (the
    block-diffusion second half, and the targets) stays clean."""
    mb = micro_batch()
    for mode in ("block_diffusion", "full"):
        b = prepare_micro_batch(mb, diffusion(mode, edit_ratio=0.8), MASK, seed=1)
        S = mb["input_ids"].shape[1]
        x_t, clean = b["input_ids"][:, :S], mb["input_ids"]
        assert b["edited"].any() and not (b["edited"] & (b["masked"] | ~b["loss_mask"])).any()
        assert torch.equal(x_t != torch.where(b["masked"], MASK, clean), b["edited"])
        assert torch.equal(b["targets"], clean)
        if mode == "block_diffusion":
            assert torch.equal(b["input_ids"][:, S:], clean)
