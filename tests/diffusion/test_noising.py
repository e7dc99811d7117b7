import itertools
import random

import pytest
import torch

from megadiff.data.dataset import SFTDataset
from megadiff.data.packing import collate_rows, pack_samples
from megadiff.diffusion.noising import document_noise, noise_batch

MASK = 77
PAD = 5


def make_samples(n, seed=0, prompt=(2, 10), answer=(1, 25)):
    rng = random.Random(seed)
    lengths = [(rng.randint(*prompt), rng.randint(*answer)) for _ in range(n)]
    return [([10 + (i + j) % 50 for j in range(p + a)], p) for i, (p, a) in enumerate(lengths)]


SAMPLES = make_samples(120)


def packed(mode="pack", max_seq_len=48):
    rows, _ = pack_samples(SAMPLES, max_seq_len=max_seq_len, pad_id=PAD, mode=mode)
    return collate_rows(rows)


def noise_by_token(batch, noisy):
    """{(sample id, position): (masked, t)} for every answer token of real samples."""
    out = {}
    keep = batch["loss_mask"] & (batch["sample_ids"] >= 0)
    for b, s in keep.nonzero().tolist():
        sid, pos = int(batch["sample_ids"][b, s]), int(batch["position_ids"][b, s])
        if pos < len(SAMPLES[sid][0]):  # real tokens only (not the pad_to_max tail)
            out[(sid, pos)] = (bool(noisy["masked"][b, s]), float(noisy["t"][b, s]))
    return out


def test_masked_tokens_become_mask_id_and_only_answer_tokens_are_masked():
    batch = packed()
    noisy = noise_batch(batch, MASK, seed=1, epoch=0)
    masked = noisy["masked"]
    assert masked.dtype == torch.bool and noisy["t"].dtype == torch.float32 and noisy["noisy_ids"].dtype == torch.long
    assert not (masked & ~batch["loss_mask"]).any()  # prompt and fill never masked
    assert torch.equal(noisy["noisy_ids"], torch.where(masked, MASK, batch["input_ids"]))
    assert masked.any() and (batch["loss_mask"] & ~masked).any()
    assert torch.equal(noisy["input_ids"], batch["input_ids"])  # x_0 kept for the targets


def test_masking_follows_the_per_document_uniforms_exactly():
    batch = packed()
    noisy = noise_batch(batch, MASK, seed=3, epoch=2, t_low=0.2, t_high=0.9)
    for b, s in itertools.product(range(batch["input_ids"].shape[0]), range(48)):
        sid = int(batch["sample_ids"][b, s])
        if sid < 0:
            assert noisy["t"][b, s] == 0 and not noisy["masked"][b, s]
            continue
        pos = int(batch["position_ids"][b, s])
        t, u = document_noise(3, sid, 2, pos + 1, 0.2, 0.9)
        assert noisy["t"][b, s] == pytest.approx(t)
        assert bool(noisy["masked"][b, s]) == (bool(batch["loss_mask"][b, s]) and bool(u[pos] < t))


def test_t_is_per_document_and_within_bounds():
    batch = packed()
    noisy = noise_batch(batch, MASK, seed=0, epoch=0, t_low=0.3, t_high=0.8)
    real = batch["sample_ids"] >= 0
    assert ((noisy["t"][real] >= 0.3) & (noisy["t"][real] <= 0.8)).all()
    assert (noisy["t"][~real] == 0).all()
    for sid in range(len(SAMPLES)):
        assert len(noisy["t"][batch["sample_ids"] == sid].unique()) == 1
    ts = torch.tensor([noisy["t"][batch["sample_ids"] == sid][0] for sid in range(len(SAMPLES))])
    assert ts.min() < 0.4 and ts.max() > 0.7  # spread over the range, not a constant


def test_noise_of_a_sample_does_not_depend_on_row_batch_mode_or_dp_layout():
    reference = noise_by_token(packed(), noise_batch(packed(), MASK, seed=9, epoch=1))
    padded = packed("pad_to_max")
    assert noise_by_token(padded, noise_batch(padded, MASK, seed=9, epoch=1)) == reference
    for dp_size, micro in [(1, 4), (2, 1)]:
        got = {}
        for rank in range(dp_size):
            ds = SFTDataset(
                SAMPLES,
                max_seq_len=64,
                pad_id=PAD,
                global_batch_size=4,
                micro_batch_size=micro,
                dp_size=dp_size,
                dp_rank=rank,
                seed=123,
            )
            ds.load_state_dict({"epoch": 1, "consumed_rows": 0})
            for batch in itertools.islice(iter(ds), ds.steps_per_epoch * ds.accumulation_steps):
                assert (batch["epoch"] == 1).all()
                got.update(noise_by_token(batch, noise_batch(batch, MASK, seed=9, epoch=int(batch["epoch"][0]))))
        assert got == {key: reference[key] for key in got}
        assert len(got) > 0.8 * len(reference)


def test_noise_changes_with_seed_and_epoch():
    batch = packed()
    base = noise_batch(batch, MASK, seed=0, epoch=0)["masked"]
    assert not torch.equal(base, noise_batch(batch, MASK, seed=1, epoch=0)["masked"])
    assert not torch.equal(base, noise_batch(batch, MASK, seed=0, epoch=1)["masked"])
    assert torch.equal(base, noise_batch(batch, MASK, seed=0, epoch=0)["masked"])


def test_masked_fraction_tracks_t_on_a_long_answer():
    rows, _ = pack_samples([(list(range(4000)), 10)], max_seq_len=4000, pad_id=PAD)
    batch = collate_rows(rows)
    noisy = noise_batch(batch, MASK, seed=0, epoch=0)
    t = float(noisy["t"][0, 0])
    assert abs(noisy["masked"].sum().item() / 3990 - t) < 0.03


def test_complementary_masks_partition_answer_tokens():
    batch = packed()
    B = batch["input_ids"].shape[0]
    single = noise_batch(batch, MASK, seed=4, epoch=0)
    double = noise_batch(batch, MASK, seed=4, epoch=0, complementary=True)
    assert double["noisy_ids"].shape == (2 * B, 48)
    for key in ("input_ids", "position_ids", "doc_ids", "loss_mask", "sample_ids"):
        assert torch.equal(double[key], torch.cat([batch[key], batch[key]]))
    first, second = double["masked"][:B], double["masked"][B:]
    assert torch.equal(first, single["masked"])
    assert not (first & second).any()
    assert torch.equal(first | second, batch["loss_mask"])
    real = batch["sample_ids"] >= 0
    torch.testing.assert_close(double["t"][B:][real], 1 - single["t"][real])
    assert (double["t"][B:][~real] == 0).all()
    assert torch.equal(double["noisy_ids"][B:], torch.where(second, MASK, batch["input_ids"]))


def test_bad_t_range_is_rejected():
    with pytest.raises(ValueError, match="need 0 < t_low <= t_high <= 1, got t_low=0.9, t_high=0.1"):
        noise_batch(packed(), MASK, seed=0, epoch=0, t_low=0.9, t_high=0.1)


@pytest.mark.parametrize("complementary", [False, True])
def test_edit_stream_corrupts_exactly_the_chosen_positions(complementary):
    """Seeded: the corrupted positions and their tokens are the ones the per-document draws choose
    (v < edit_ratio at a visible answer token, replaced by the answer token the w draw picks, unless
    that equals the original); everything else in x_t is the mask or the clean token."""
    batch = packed()
    ratio = 0.4
    noisy = noise_batch(batch, MASK, seed=5, epoch=1, complementary=complementary, edit_ratio=ratio)
    rows = batch["input_ids"].shape[0]
    expected_edited = torch.zeros_like(noisy["edited"])
    expected_ids = noisy["input_ids"].clone()
    for copy in range(2 if complementary else 1):
        for b in range(rows):
            for doc in batch["doc_ids"][b].unique().tolist():
                span = (batch["doc_ids"][b] == doc).nonzero()[:, 0]
                sid = int(batch["sample_ids"][b, span[0]])
                if sid < 0:
                    continue
                pos = batch["position_ids"][b, span]
                _, _, v, w = document_noise(5, sid, 1, int(pos.max()) + 1, 0.3, 0.8, with_edits=True)
                answer = [
                    (int(p), int(batch["input_ids"][b, s]))
                    for s, p in zip(span, pos, strict=True)
                    if batch["loss_mask"][b, s]
                ]
                pool = [token for _, token in sorted(answer)]
                for s, p in zip(span.tolist(), pos.tolist(), strict=True):
                    row = copy * rows + b
                    if not batch["loss_mask"][b, s] or noisy["masked"][row, s]:
                        continue
                    drawn = pool[min(int(float(w[p]) * len(pool)), len(pool) - 1)]
                    if float(v[p]) < ratio and drawn != int(batch["input_ids"][b, s]):
                        expected_edited[row, s] = True
                        expected_ids[row, s] = drawn
    assert torch.equal(noisy["edited"], expected_edited)
    visible = noisy["loss_mask"] & ~noisy["masked"]
    assert 0.3 < expected_edited.sum() / visible.sum() <= 0.45  # ~ratio, less the draws equal to the original
    assert torch.equal(noisy["noisy_ids"], torch.where(noisy["masked"], MASK, expected_ids))
    assert torch.equal(noisy["input_ids"][:rows], batch["input_ids"])  # x_0 stays clean


def test_edit_stream_leaves_the_mask_noise_unchanged():
    batch = packed()
    plain = noise_batch(batch, MASK, seed=2, epoch=0)
    edited = noise_batch(batch, MASK, seed=2, epoch=0, edit_ratio=0.3)
    assert torch.equal(plain["masked"], edited["masked"]) and torch.equal(plain["t"], edited["t"])
    assert not plain["edited"].any() and edited["edited"].any()
    with pytest.raises(ValueError, match="edit_ratio"):
        noise_batch(batch, MASK, seed=2, epoch=0, edit_ratio=1.5)
