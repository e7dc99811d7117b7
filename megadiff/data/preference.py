"""Preference pairs for DPO: read and validate rows, tokenize them, serve pairs as micro-batches.

Row formats (TRL's preference formats), in .jsonl or .parquet, other fields ignored:
- conversational: `{"prompt": [messages], "chosen": [assistant message(s)], "rejected": [...]}`; the
  prompt's last turn is not the assistant's, and each response is one or more assistant messages
  (several are joined with a newline into one answer).
- plain strings: `{"prompt": str, "chosen": str, "rejected": str}`; the prompt becomes one user turn.
Every row is checked up front, like SFT rows (megadiff.data.rows): a problem is `{file}:{line}: reason`.

Layout (the trainer relies on it): a pair is served as `mc_samples` rows; row k holds two packed
documents, prompt + chosen and prompt + rejected (then fill), each a document of its own
(document-level attention masks). Their global sample ids, which seed their noise, are
`(pair * mc_samples + k) * 2 + c` (c = 0 chosen, 1 rejected), so every Monte Carlo sample of every
response draws its own t and mask, whatever rank or micro-batch the pair lands in. A pair never
spans micro-batches: the logistic of the DPO loss couples its two responses, and keeping them in one
micro-batch makes each pair's loss complete there (so the loss does not depend on the layout).
The order contract (shuffle per epoch, global batch of G pairs, DP slices) is SFTDataset's.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from megadiff.data.dataset import SFTDataset, check_batch_split, too_little_data
from megadiff.data.packing import PACK, build_row, collate_rows
from megadiff.data.rows import ROLES, SKIP_HINT, DataError, messages_problem, read_valid_rows
from megadiff.data.tokenize import encode_chat_prompt, encode_text

PREFERENCE_FIELDS = ("prompt", "chosen", "rejected")


def _messages_problem(value, field: str, *, responses: bool) -> str | None:
    roles = ("assistant",) if responses else ROLES
    problem = messages_problem(value, field, roles, expected="a string or a list of messages")
    if problem is None and not responses and value[-1]["role"] == "assistant":
        return f"the last message of '{field}' is the assistant's; the prompt must end with a user (or system) turn"
    return problem


def preference_row_problem(row) -> str | None:
    """Why `row` (a decoded JSON value) is not a valid preference row, or None when it is."""
    if not isinstance(row, dict):
        return f"row is a {type(row).__name__}, expected a JSON object with 'prompt', 'chosen' and 'rejected'"
    for field in PREFERENCE_FIELDS:
        if field not in row:
            if field == "prompt" and any(k in row for k in ("messages", "conversations", "completion")):
                return "this is an SFT row, not a preference pair; DPO needs TRL's 'prompt', 'chosen' and 'rejected'"
            return f"missing field '{field}'"
    kinds = {type(row[f]) for f in PREFERENCE_FIELDS}
    if len(kinds) > 1:
        return "'prompt', 'chosen' and 'rejected' mix strings and message lists; use one form for all three"
    for field in PREFERENCE_FIELDS:
        value = row[field]
        if isinstance(value, str):
            if field != "prompt" and not value.strip():
                return f"field '{field}' is an empty answer; nothing to compare"
            continue
        problem = _messages_problem(value, field, responses=field != "prompt")
        if problem:
            return problem
        if field != "prompt" and not "\n".join(m["content"] for m in value).strip():
            return f"field '{field}' is an empty answer; nothing to compare"
    if _answer(row["chosen"]) == _answer(row["rejected"]):
        return "'chosen' and 'rejected' are the same answer; the pair prefers nothing"
    return None


def _answer(value) -> str:
    return value if isinstance(value, str) else "\n".join(m["content"] for m in value)


def read_preference_rows(
    source: str | Path | Iterable[str | Path], skip_bad_rows: bool = False
) -> tuple[list[dict], dict]:
    """Read and validate every preference row; return (rows, stats) like read_sft_rows.

    rows: `[{"prompt": [messages], "chosen": str, "rejected": str, "source": "file:line"}, ...]`, the
    index in this list being the global pair index."""
    return read_valid_rows(
        source,
        preference_row_problem,
        _preference_row,
        skip_bad_rows,
        kind="preference",
        skip_hint=SKIP_HINT,
    )


def _preference_row(row: dict, where: str) -> dict:
    prompt = row["prompt"]
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    return {
        "prompt": [{"role": m["role"], "content": m["content"]} for m in prompt],
        "chosen": _answer(row["chosen"]),
        "rejected": _answer(row["rejected"]),
        "source": where,
    }


Pair = tuple[tuple[list[int], int], tuple[list[int], int]]  # ((ids, prompt_len) chosen, ... rejected)


def tokenize_pairs(rows: Sequence[dict], tokenizer, mask_id: int | None = None, block_size: int | None = None):
    """Return [(chosen sample, rejected sample)] with samples as tokenize_sample's (ids, prompt_len):
    prompt ids + answer ids + EOS, the answer padded with EOS to a multiple of `block_size` if given."""
    if tokenizer.eos_token_id is None:
        raise DataError(f"tokenizer {tokenizer.name_or_path!r} has no eos_token; LLaDA2 answers end with EOS")
    eos = int(tokenizer.eos_token_id)
    pairs = []
    for row in rows:
        where = row.get("source", "row")
        try:
            prompt = encode_chat_prompt(row["prompt"], tokenizer)
        except ValueError as e:
            raise DataError(f"{where}: {e}") from None
        pair = []
        for field in ("chosen", "rejected"):
            answer = encode_text(row[field], tokenizer) + [eos]
            if block_size:
                answer += [eos] * (-len(answer) % block_size)
            ids = prompt + answer
            if mask_id is not None and mask_id in ids:
                raise DataError(
                    f"{where}: the tokenized '{field}' contains the mask token id {mask_id}; "
                    "remove the mask token's text from the row"
                )
            pair.append((ids, len(prompt)))
        pairs.append(tuple(pair))
    return pairs


def fit_pair(pair: Pair, max_seq_len: int, truncation: str) -> Pair | None:
    """The pair cut to fit one row (both documents together <= max_seq_len), or None to drop it.

    truncate: each answer is cut to at most half a row, prompts kept (a prompt of half a row or more
    leaves no room: dropped); drop: pairs that do not fit are dropped."""
    if sum(len(ids) for ids, _ in pair) <= max_seq_len:
        return pair
    if truncation == "drop":
        return None
    half = max_seq_len // 2
    if any(prompt_len >= half for _, prompt_len in pair):
        return None
    return tuple((ids[:half], prompt_len) for ids, prompt_len in pair)


class _PairSamples(Sequence):
    """Samples indexed by the global sample id `(pair * mc + k) * 2 + c` (module docstring)."""

    def __init__(self, pairs: Sequence[Pair], mc_samples: int):
        self.pairs, self.mc = pairs, mc_samples

    def __len__(self):
        return len(self.pairs) * self.mc * 2

    def __getitem__(self, sample_id):
        return self.pairs[sample_id // (2 * self.mc)][sample_id % 2]


class PreferenceDataset(SFTDataset):
    """Preference pairs served like SFTDataset's rows (same order, DP slices, state), a pair in
    `mc_samples` rows (module docstring). `global_batch_size` and `micro_batch_size` count pairs.

    A micro-batch adds to the row keys: `pair_ids` [B] (global pair index), `response_slot` [B*mc, S]
    (local pair j's chosen tokens 2j, rejected 2j + 1, fill -1) and `epoch` [B*mc]."""

    def __init__(
        self,
        pairs: Sequence[Pair],
        *,
        max_seq_len: int,
        pad_id: int,
        global_batch_size: int,
        micro_batch_size: int,
        mc_samples: int = 1,
        dp_size: int = 1,
        dp_rank: int = 0,
        seed: int = 0,
        truncation: str = "truncate",
    ):
        check_batch_split(global_batch_size, micro_batch_size, dp_size, dp_rank)
        fitted = [fit_pair(p, max_seq_len, truncation) for p in pairs]
        # A pair whose two responses are the same tokens (often once cut to half a row) prefers
        # nothing: its logistic only adds noise. Dropped and counted.
        identical = [f is not None and f[0] == f[1] for f in fitted]
        self.pairs = [f for f, same in zip(fitted, identical, strict=True) if f is not None and not same]
        too_long = sum(f is None for f in fitted)
        self.stats = {
            "pairs": len(pairs),
            "dropped_too_long": too_long,
            "dropped_identical_pairs": sum(identical),
            "truncated": sum(f is not None and f is not p for f, p in zip(fitted, pairs, strict=True)),
        }
        self.samples = _PairSamples(self.pairs, mc_samples)
        self.mc_samples = mc_samples
        self.max_seq_len, self.pad_id, self.mode = max_seq_len, pad_id, PACK
        self.global_batch_size, self.micro_batch_size = global_batch_size, micro_batch_size
        self.dp_size, self.dp_rank, self.seed = dp_size, dp_rank, seed
        self.accumulation_steps = global_batch_size // (micro_batch_size * dp_size)
        self.plans = list(range(len(self.pairs)))  # one "plan" per pair: what SFTDataset shuffles
        if len(self.plans) < global_batch_size:
            why_long = (
                "too long for a row (data.truncation=drop)" if truncation == "drop" else "whose prompt fills half a row"
            )
            dropped = {
                why_long: too_long,
                "whose chosen and rejected are the same tokens after truncation": sum(identical),
            }
            raise too_little_data(
                f"{len(self.plans)} preference pairs of max_seq_len={max_seq_len}",
                len(pairs),
                "pairs",
                dropped,
                global_batch_size,
            )
        self.epoch, self.consumed_rows = 0, 0
        self._order_cache = None

    def rows_batch(self, row_indices: Sequence[int], epoch: int) -> dict:
        rows, slots = [], []
        for j, pair in enumerate(row_indices):
            for k in range(self.mc_samples):
                first = (pair * self.mc_samples + k) * 2
                plan = tuple((first + c, len(self.samples[first + c][0])) for c in (0, 1))
                row = build_row(plan, self.samples, self.max_seq_len, self.pad_id, PACK)
                sid = row["sample_ids"]
                slots.append(torch.where(sid >= 0, 2 * j + sid % 2, -1))
                rows.append(row)
        batch = collate_rows(rows)
        batch["response_slot"] = torch.stack(slots)
        batch["pair_ids"] = torch.tensor(list(row_indices), dtype=torch.long)
        batch["epoch"] = torch.full((len(rows),), epoch, dtype=torch.long)
        return batch
