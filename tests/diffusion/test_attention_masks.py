import random
import warnings

import pytest
import torch
from torch.nn.attention.flex_attention import (
    create_block_mask,
    create_mask,
    flex_attention,
)

from megadiff.data.packing import collate_rows, pack_samples
from megadiff.diffusion.masks import (
    block_diffusion_mask,
    block_diffusion_mask_mod,
    full_attention_mask,
    full_attention_mask_mod,
)


def packed_batch(seed, n=12, max_seq_len=32, mode="pack"):
    rng = random.Random(seed)
    samples = [([0] * (p + a), p) for p, a in ((rng.randint(1, 9), rng.randint(1, 14)) for _ in range(n))]
    rows, _ = pack_samples(samples, max_seq_len=max_seq_len, pad_id=0, mode=mode)
    return collate_rows(rows[:4])


def brute_force_block_diffusion(doc_ids, position_ids, block_size):
    """BD3-LM rule written pair by pair: index i < S is x_t[i], i >= S is x_0[i - S]."""
    B, S = doc_ids.shape
    allowed = torch.zeros(B, 2 * S, 2 * S, dtype=torch.bool)
    for b in range(B):
        for qi in range(2 * S):
            for ki in range(2 * S):
                q_clean, q = divmod(qi, S)
                k_clean, k = divmod(ki, S)
                if doc_ids[b, q] != doc_ids[b, k]:
                    continue
                qb, kb = int(position_ids[b, q]) // block_size, int(position_ids[b, k]) // block_size
                if not q_clean and not k_clean:
                    allowed[b, qi, ki] = qb == kb  # noisy block sees itself, bidirectionally
                elif not q_clean and k_clean:
                    allowed[b, qi, ki] = kb < qb  # noisy block sees the clean past
                elif q_clean and k_clean:
                    allowed[b, qi, ki] = kb <= qb  # clean tokens: block-causal
                # clean queries never see noisy keys
    return allowed


def brute_force_full(doc_ids):
    B, S = doc_ids.shape
    return torch.tensor(
        [[[bool(doc_ids[b, q] == doc_ids[b, k]) for k in range(S)] for q in range(S)] for b in range(B)]
    )


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("mode", ["pack", "pad_to_max"])
def test_full_attention_mask_matches_bruteforce_for_packed_docs(seed, mode):
    batch = packed_batch(seed, mode=mode)
    assert torch.equal(full_attention_mask(batch["doc_ids"]), brute_force_full(batch["doc_ids"]))


@pytest.mark.parametrize("block_size", [1, 3, 4, 8, 64])  # docs shorter and longer than a block
@pytest.mark.parametrize("seed", [0, 1])
def test_bd_mask_matches_bruteforce_for_packed_docs(seed, block_size):
    batch = packed_batch(seed)
    doc_ids, position_ids = batch["doc_ids"], batch["position_ids"]
    assert (doc_ids.max(dim=1).values >= 1).all()  # several documents per row
    expected = brute_force_block_diffusion(doc_ids, position_ids, block_size)
    assert torch.equal(block_diffusion_mask(doc_ids, position_ids, block_size), expected)


def test_bd_mask_small_example_by_hand():
    # one row: doc 0 = 3 tokens, doc 1 = 1 token; block size 2 -> blocks: doc0 [0,0,1], doc1 [0]
    doc_ids = torch.tensor([[0, 0, 0, 1]])
    position_ids = torch.tensor([[0, 1, 2, 0]])
    rows = [
        # x_t keys  | x_0 keys
        "1100 0000",  # x_t 0 (doc0 blk0)
        "1100 0000",  # x_t 1 (doc0 blk0)
        "0010 1100",  # x_t 2 (doc0 blk1): own block + clean block 0
        "0001 0000",  # x_t 3 (doc1 blk0)
        "0000 1100",  # x_0 0
        "0000 1100",  # x_0 1
        "0000 1110",  # x_0 2
        "0000 0001",  # x_0 3
    ]
    expected = torch.tensor([[c == "1" for c in r.replace(" ", "")] for r in rows])[None]
    assert torch.equal(block_diffusion_mask(doc_ids, position_ids, 2), expected)


def test_mask_mods_equal_dense_masks():
    batch = packed_batch(3)
    doc_ids, position_ids = batch["doc_ids"], batch["position_ids"]
    B, S = doc_ids.shape
    for block_size in (1, 4, 7):
        mod = block_diffusion_mask_mod(doc_ids, position_ids, block_size, S)
        dense = create_mask(mod, B, 1, 2 * S, 2 * S, device="cpu")[:, 0]
        assert torch.equal(dense, block_diffusion_mask(doc_ids, position_ids, block_size))
    dense = create_mask(full_attention_mask_mod(doc_ids), B, 1, S, S, device="cpu")[:, 0]
    assert torch.equal(dense, full_attention_mask(doc_ids))


def test_flex_attention_with_block_mask_equals_sdpa_with_dense_mask():
    batch = packed_batch(4)
    doc_ids, position_ids = batch["doc_ids"], batch["position_ids"]
    B, S = doc_ids.shape
    block_mask = create_block_mask(
        block_diffusion_mask_mod(doc_ids, position_ids, 4, S), B, None, 2 * S, 2 * S, device="cpu", BLOCK_SIZE=16
    )
    q, k, v = torch.randn(3, B, 2, 2 * S, 8, generator=torch.Generator().manual_seed(0)).unbind(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = flex_attention(q, k, v, block_mask=block_mask)
    dense = block_diffusion_mask(doc_ids, position_ids, 4)[:, None]
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=dense)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_mask_mod_rejects_mismatched_seq_len():
    with pytest.raises(ValueError, match=r"must both be \[B, seq_len=5\]"):
        block_diffusion_mask_mod(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long), 2, 5)
