"""Lay tokenized samples out in fixed-length rows of `max_seq_len` tokens.

Two modes:
- `pack` (default): several whole documents per row, placed best-fit-decreasing (longest first, each into
  the fullest row that still has room; ties -> lowest row index), which fills rows to ~99% on SFT length
  mixes. The leftover tail of a row ("fill") is pad tokens forming their own document: own doc id,
  positions 0..k-1, no loss, sample id -1, so it attends only to itself and never affects real tokens.
- `pad_to_max` (dFactory): one sample per row, padded with pad (= EOS) tokens that belong to the
  sample's document and COUNT as answer tokens: dFactory trains on them so the model learns to stop.

Samples longer than a row: `truncation="truncate"` keeps the prompt and cuts the answer (a prompt that
alone fills the row is dropped, it would have no answer token); `truncation="drop"` drops them.

A row is a dict of [S] tensors:
    input_ids    long  clean tokens x_0; fill = pad id
    position_ids long  0.. restarting at each document (and at the pack-mode fill)
    doc_ids      long  0, 1, 2, ... per document in the row; pack-mode fill gets the next id
    loss_mask    bool  answer tokens incl. their EOS (pad_to_max: also the pad tail); False elsewhere
    sample_ids   long  global sample index (position in `samples`) per token; -1 for pack-mode fill
Planning (which samples go in which row) is separate from building rows, so a dataset can keep only
the plan in memory and build rows on demand.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Sequence

import torch

PACK = "pack"
PAD_TO_MAX = "pad_to_max"
MODES = (PACK, PAD_TO_MAX)
TRUNCATE = "truncate"
DROP = "drop"
TRUNCATIONS = (TRUNCATE, DROP)
ROW_KEYS = ("input_ids", "position_ids", "doc_ids", "loss_mask", "sample_ids")

Sample = tuple[Sequence[int], int]  # (input_ids, prompt_len), as returned by tokenize_sample
RowPlan = tuple[tuple[int, int], ...]  # ((sample index, tokens kept), ...) in row order


def _kept_lengths(samples: Sequence[Sample], max_seq_len: int, truncation: str, stats: dict) -> dict[int, int]:
    """Return {sample index: tokens kept} after truncating/dropping over-long samples (counted in stats)."""
    kept = {}
    for i, (ids, prompt_len) in enumerate(samples):
        length = len(ids)
        if not 0 <= prompt_len < length:
            raise ValueError(
                f"sample {i}: prompt_len={prompt_len} but {length} tokens; a sample needs >= 1 answer token (its EOS)"
            )
        if length <= max_seq_len:
            kept[i] = length
        elif truncation == DROP:
            stats["dropped_too_long"] += 1
        elif prompt_len >= max_seq_len:
            stats["dropped_prompt_too_long"] += 1
        else:
            kept[i] = max_seq_len
            stats["truncated"] += 1
            stats["truncated_tokens"] += length - max_seq_len
    return kept


def _best_fit_decreasing(lengths: dict[int, int], max_seq_len: int) -> list[list[tuple[int, int]]]:
    """Place samples longest first, each into the row with the least room that still fits it."""
    rows: list[list[tuple[int, int]]] = []
    free_rows: list[tuple[int, int]] = []  # sorted (free tokens, row index)
    for i in sorted(lengths, key=lambda i: (-lengths[i], i)):
        n = lengths[i]
        j = bisect_left(free_rows, (n, -1))
        if j < len(free_rows):
            free, r = free_rows.pop(j)
            rows[r].append((i, n))
            free -= n
        else:
            r, free = len(rows), max_seq_len - n
            rows.append([(i, n)])
        if free > 0:
            insort(free_rows, (free, r))
    return rows


def plan_packed_rows(
    samples: Sequence[Sample], max_seq_len: int, mode: str = PACK, truncation: str = TRUNCATE
) -> tuple[list[RowPlan], dict]:
    """Return (row plans, stats): which samples (and how many of their tokens) fill each row.

    Deterministic: depends only on the samples' lengths and order. stats: samples, dropped_too_long,
    dropped_prompt_too_long, truncated, truncated_tokens, rows, tokens, real_tokens, answer_tokens
    (real ones), loss_tokens (incl. pad_to_max pad tail), real_token_fraction, answer_token_fraction.
    """
    if mode not in MODES:
        raise ValueError(f"packing mode {mode!r} is not one of {', '.join(MODES)}")
    if truncation not in TRUNCATIONS:
        raise ValueError(f"truncation {truncation!r} is not one of {', '.join(TRUNCATIONS)}")
    if max_seq_len < 2:
        raise ValueError(f"max_seq_len={max_seq_len} is too small; need >= 2 (one prompt + one answer token)")
    stats = {
        "samples": len(samples),
        "dropped_too_long": 0,
        "dropped_prompt_too_long": 0,
        "truncated": 0,
        "truncated_tokens": 0,
    }
    lengths = _kept_lengths(samples, max_seq_len, truncation, stats)
    if mode == PACK:
        plans = [tuple(row) for row in _best_fit_decreasing(lengths, max_seq_len)]
    else:
        plans = [((i, n),) for i, n in lengths.items()]

    real = sum(lengths.values())
    answer = sum(n - samples[i][1] for i, n in lengths.items())
    tokens = len(plans) * max_seq_len
    stats.update(
        rows=len(plans),
        tokens=tokens,
        real_tokens=real,
        answer_tokens=answer,
        loss_tokens=answer + (tokens - real if mode == PAD_TO_MAX else 0),
        real_token_fraction=real / tokens if tokens else 0.0,
        answer_token_fraction=answer / tokens if tokens else 0.0,
    )
    return plans, stats


def build_row(plan: RowPlan, samples: Sequence[Sample], max_seq_len: int, pad_id: int, mode: str = PACK) -> dict:
    """Return the row dict (see module docstring) of [max_seq_len] tensors for one row plan."""
    ids, pos, doc, loss, sid = [], [], [], [], []
    for d, (i, n) in enumerate(plan):
        tokens, prompt_len = samples[i]
        ids += tokens[:n]
        pos += range(n)
        doc += [d] * n
        loss += [False] * prompt_len + [True] * (n - prompt_len)
        sid += [i] * n
    fill = max_seq_len - len(ids)
    if fill < 0:
        raise ValueError(f"row plan {plan} holds {len(ids)} tokens > max_seq_len={max_seq_len}")
    if fill:
        ids += [pad_id] * fill
        if mode == PACK:  # the fill is its own document, attending only to itself, with no loss
            pos += range(fill)
            doc += [len(plan)] * fill
            loss += [False] * fill
            sid += [-1] * fill
        else:  # pad_to_max: the pad tail continues the (single) sample and is trained on
            pos += range(len(pos), max_seq_len)
            doc += [0] * fill
            loss += [True] * fill
            sid += [plan[0][0]] * fill
    return {
        "input_ids": torch.tensor(ids, dtype=torch.long),
        "position_ids": torch.tensor(pos, dtype=torch.long),
        "doc_ids": torch.tensor(doc, dtype=torch.long),
        "loss_mask": torch.tensor(loss, dtype=torch.bool),
        "sample_ids": torch.tensor(sid, dtype=torch.long),
    }


def collate_rows(rows: Sequence[dict]) -> dict:
    """Stack row dicts into a batch dict of [B, S] tensors (same keys)."""
    return {key: torch.stack([row[key] for row in rows]) for key in rows[0]}


def pack_samples(
    samples: Sequence[Sample], max_seq_len: int, pad_id: int, mode: str = PACK, truncation: str = TRUNCATE
) -> tuple[list[dict], dict]:
    """Return (rows, stats): plan_packed_rows followed by build_row for every row."""
    plans, stats = plan_packed_rows(samples, max_seq_len, mode, truncation)
    return [build_row(plan, samples, max_seq_len, pad_id, mode) for plan in plans], stats
