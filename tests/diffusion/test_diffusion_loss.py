import math

import pytest
import torch

from megadiff.diffusion.loss import loss_from_sums, masked_diffusion_loss

# Two rows of 4 tokens, vocab 3.
# row 0: doc 0 = [prompt, answer, answer], doc 1 = [answer]; row 1: doc 0 = [prompt, answer, answer], fill.
LOGITS = [
    [[0.0, 0.0, 0.0], [2.0, 0.5, -1.0], [0.3, 0.1, 0.2], [-1.0, 1.0, 3.0]],
    [[0.0, 0.0, 0.0], [0.0, 1.5, 0.5], [1.0, 2.0, 0.0], [0.0, 0.0, 0.0]],
]
TARGETS = [[0, 0, 1, 1], [0, 1, 0, 0]]
MASKED = [[False, True, False, True], [False, True, True, False]]
LOSS_MASK = [[False, True, True, True], [False, True, True, False]]
T = [[0.5, 0.5, 0.5, 0.25], [0.8, 0.8, 0.8, 0.0]]
DOC_IDS = [[0, 0, 0, 1], [0, 0, 0, 1]]


def ce(row, pos):
    z = LOGITS[row][pos]
    return math.log(sum(math.exp(v) for v in z)) - z[TARGETS[row][pos]]


def entropy(row, pos):
    z = LOGITS[row][pos]
    norm = sum(math.exp(v) for v in z)
    return -sum(math.exp(v) / norm * math.log(math.exp(v) / norm) for v in z)


CE = {(0, 1): ce(0, 1), (0, 3): ce(0, 3), (1, 1): ce(1, 1), (1, 2): ce(1, 2)}


def inputs(requires_grad=False):
    logits = torch.tensor(LOGITS, requires_grad=requires_grad)
    return {
        "logits": logits,
        "targets": torch.tensor(TARGETS),
        "masked": torch.tensor(MASKED),
        "t": torch.tensor(T),
        "loss_mask": torch.tensor(LOSS_MASK),
    }


@pytest.mark.parametrize(
    "loss_weight, normalize, numerator, denominator",
    [
        ("none", "masked_tokens", sum(CE.values()), 4),
        ("inverse_t", "masked_tokens", CE[0, 1] / 0.5 + CE[0, 3] / 0.25 + (CE[1, 1] + CE[1, 2]) / 0.8, 4),
        ("none", "answer_tokens", sum(CE.values()), 5),
        # LLaDA SFT: per document, weighted CE sum / its answer length; 3 documents have answer tokens
        ("inverse_t", "sequence", CE[0, 1] / 0.5 / 2 + CE[0, 3] / 0.25 / 1 + (CE[1, 1] + CE[1, 2]) / 0.8 / 2, 3),
        ("none", "sequence", CE[0, 1] / 2 + CE[0, 3] / 1 + (CE[1, 1] + CE[1, 2]) / 2, 3),
    ],
)
def test_loss_options_match_hand_computation(loss_weight, normalize, numerator, denominator):
    loss, stats = masked_diffusion_loss(
        **inputs(), doc_ids=torch.tensor(DOC_IDS), loss_weight=loss_weight, normalize=normalize
    )
    assert stats["numerator"].item() == pytest.approx(numerator, rel=1e-6)
    assert stats["denominator"].item() == denominator
    assert loss.item() == pytest.approx(numerator / denominator, rel=1e-6)
    assert stats["masked_tokens"] == 4 and stats["answer_tokens"] == 5 and stats["documents"] == 3
    assert stats["ce_sum"].item() == pytest.approx(sum(CE.values()), rel=1e-6)


def test_sequence_without_doc_ids_treats_each_row_as_one_document():
    _, stats = masked_diffusion_loss(**inputs(), normalize="sequence")
    assert stats["denominator"] == 2
    assert stats["numerator"].item() == pytest.approx((CE[0, 1] + CE[0, 3]) / 3 + (CE[1, 1] + CE[1, 2]) / 2, rel=1e-6)


def test_confidence_aware_loss_adds_beta_times_mean_entropy_of_correct_masked_tokens():
    # argmax at the masked positions: (0,1) -> 0 == target 0 (correct), (0,3) -> 2 != 1,
    # (1,1) -> 1 == target 1 (correct), (1,2) -> 1 != 0
    loss, stats = masked_diffusion_loss(**inputs(), confidence_beta=2.0)
    cap = entropy(0, 1) + entropy(1, 1)
    assert stats["correct_tokens"] == 2 and stats["cap_denominator"] == 2
    assert stats["cap_numerator"].item() == pytest.approx(cap, rel=1e-6)
    assert loss.item() == pytest.approx(sum(CE.values()) / 4 + 2.0 * cap / 2, rel=1e-6)


def test_micro_batch_sums_combine_to_the_full_batch_loss():
    full = inputs()
    doc_ids = torch.tensor(DOC_IDS)
    for normalize in ("masked_tokens", "answer_tokens", "sequence"):
        whole, _ = masked_diffusion_loss(
            **full, doc_ids=doc_ids, loss_weight="inverse_t", normalize=normalize, confidence_beta=2.0
        )
        parts = [
            masked_diffusion_loss(
                **{k: v[r : r + 1] for k, v in full.items()},
                doc_ids=doc_ids[r : r + 1],
                loss_weight="inverse_t",
                normalize=normalize,
                confidence_beta=2.0,
            )[1]
            for r in range(2)
        ]
        summed = {k: sum(p[k] for p in parts) for k in ("numerator", "denominator", "cap_numerator", "cap_denominator")}
        assert loss_from_sums(**summed, confidence_beta=2.0).item() == pytest.approx(whole.item(), rel=1e-6)


def test_gradient_reaches_only_masked_positions():
    args = inputs(requires_grad=True)
    loss, _ = masked_diffusion_loss(**args, loss_weight="inverse_t", confidence_beta=2.0)
    loss.backward()
    touched = args["logits"].grad.abs().sum(-1) > 0
    assert torch.equal(touched, torch.tensor(MASKED))


def test_no_masked_tokens_gives_zero_loss_with_a_graph():
    args = inputs(requires_grad=True)
    args["masked"] = torch.zeros_like(args["masked"])
    loss, stats = masked_diffusion_loss(**args)
    assert loss.item() == 0 and stats["denominator"] == 0
    loss.backward()


@pytest.mark.parametrize(
    "change, kwargs, message",
    [
        (
            {"masked": torch.tensor([[True, False, False, False], [False] * 4])},
            {},
            "masked has positions outside loss_mask",
        ),
        ({"t": torch.zeros(2, 4)}, {"loss_weight": "inverse_t"}, "t must be > 0 at masked positions"),
        ({}, {"loss_weight": "t"}, "loss_weight='t' is not one of none, inverse_t"),
        ({}, {"normalize": "tokens"}, "normalize='tokens' is not one of masked_tokens, answer_tokens, sequence"),
    ],
)
def test_bad_loss_inputs_are_explained(change, kwargs, message):
    with pytest.raises(ValueError, match=message):
        masked_diffusion_loss(**{**inputs(), **change}, **kwargs)


@pytest.mark.parametrize("normalize, edit_term", [("masked_tokens", ce(0, 2)), ("sequence", ce(0, 2) / 2)])
def test_edit_stream_adds_weighted_ce_at_edited_positions_with_the_same_denominator(normalize, edit_term):
    """(0, 2) is the one visible answer token: edited, it adds edit_weight * CE against its original
    token (per answer length with "sequence"); the denominator stays the M2T one."""
    edited = torch.zeros(2, 4, dtype=torch.bool)
    edited[0, 2] = True
    doc_ids = torch.tensor(DOC_IDS)
    plain, base = masked_diffusion_loss(**inputs(), doc_ids=doc_ids, normalize=normalize)
    loss, stats = masked_diffusion_loss(
        **inputs(), doc_ids=doc_ids, normalize=normalize, edited=edited, edit_weight=0.7
    )
    assert stats["numerator"].item() == pytest.approx(base["numerator"].item() + 0.7 * edit_term, rel=1e-6)
    assert stats["denominator"] == base["denominator"] and stats["edited_tokens"] == 1
    assert loss.item() == pytest.approx(plain.item() + 0.7 * edit_term / float(base["denominator"]), rel=1e-6)
    with pytest.raises(ValueError, match="edited has masked or non-answer positions"):
        masked_diffusion_loss(**inputs(), edited=torch.tensor(MASKED))
