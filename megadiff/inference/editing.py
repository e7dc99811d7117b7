"""What one iteration of a block commits: the LLaDA2.0 rule (masks only) and the LLaDA2.1 rule
(draft and edit). The canvas, the block loop, the KV cache and batching are in sampler.py, which
drives either rule through the same three calls (start_block, wants_step, step).

LLaDA2.1 draft-and-edit (the public LLaDA2.1 remote code's `generate`), for the current block:
  - each iteration predicts every position of the block: token x0 and its probability p;
  - M2T, over positions that were masks at the start of the iteration: if at least
    `num_to_transfer` of them have p > threshold, commit all of those, else commit the
    min(num_to_transfer, masks left) most confident ones;
  - T2T, over positions of the block that were committed at the start of the iteration and are not
    prompt: replace the token by x0 wherever p > editing_threshold and x0 differs from it;
  - an iteration that starts with no masks left is a post step; the block ends before the forward
    once the post steps exceed `max_post_steps`, or after an iteration that started with no masks
    and made no edit. Earlier blocks are never edited (they are also what the KV cache holds).
  - `steps` plays no part (minimal_topk only clamps it in the reference, which then ignores it).
  - After a block, with eos_early_stop, a row stops when its generated tokens hold an EOS (the block
    loop guarantees no masks are left). Without it every block is decoded, as in the reference; the
    tokens are the same either way because the result is cut at the first EOS and a finished block
    never changes, so eos_early_stop only saves forward passes.
megadiff keeps its fixes: argmax at temperature 0, the mask token is never predicted (so T2T never
writes a mask back), and confidence ties go to the earlier position.
"""

from __future__ import annotations

import torch


def select_commits(confidence: torch.Tensor, masked: torch.Tensor, quota: int, threshold: float) -> torch.Tensor:
    """[block_length] bool: the masked positions to commit (M2T): every masked position with
    confidence > threshold when there are at least `quota` of them, else the min(quota, masked)
    most confident ones (ties: the earlier position)."""
    confidence = confidence.masked_fill(~masked, float("-inf"))
    confident = confidence > threshold
    if int(confident.sum()) >= quota:
        return confident
    k = min(quota, int(masked.sum()))
    chosen = torch.zeros_like(masked)
    chosen[torch.sort(confidence, descending=True, stable=True).indices[:k]] = True
    return chosen


def select_edits(
    tokens: torch.Tensor, confidence: torch.Tensor, current: torch.Tensor, editable: torch.Tensor, threshold: float
) -> torch.Tensor:
    """[block_length] bool: the committed, non-prompt positions (`editable`) to re-write (T2T):
    the prediction is confident (> threshold) and differs from the current token."""
    return editable & (confidence > threshold) & (tokens != current)


def transfer_schedule(block_length: int, steps: int) -> list[int]:
    """Tokens to commit at each iteration of a block: block_length spread evenly, remainder first."""
    base, remainder = divmod(block_length, steps)
    return [base + 1 if i < remainder else base for i in range(steps)]


class CardRule:
    """LLaDA2.0 (model card): `steps` iterations per block with the quota schedule; masks only.
    A row's state is its iteration index; with eos_early_stop a row stops mid-block as soon as an
    iteration commits an EOS with no mask before it. After each block a row with an EOS stops."""

    def __init__(self, options, mask_id: int, eos_id: int | None):
        self.schedule = transfer_schedule(options.block_length, options.effective_steps)
        self.options, self.mask_id, self.eos_id = options, mask_id, eos_id

    def start_block(self) -> dict:
        return {"iteration": 0}

    def wants_step(self, state: dict, block: torch.Tensor) -> bool:
        return state["iteration"] < len(self.schedule) and bool((block == self.mask_id).any())

    def step(self, state, block, tokens, confidence, prompt_in_block, generated) -> tuple[int, bool]:
        """Update `block` (a view of the canvas) in place; `generated` views the row's generated
        tokens up to the block's end. Return (edits, stop the row now)."""
        commit = select_commits(
            confidence, block == self.mask_id, self.schedule[state["iteration"]], self.options.threshold
        )
        state["iteration"] += 1
        block[commit] = tokens[commit]
        stop = False
        if self.options.eos_early_stop and self.eos_id is not None and bool((tokens[commit] == self.eos_id).any()):
            first_eos = int((generated == self.eos_id).nonzero()[0, 0])
            stop = not bool((generated[:first_eos] == self.mask_id).any())
        return 0, stop

    def stop_after_block(self, generated: torch.Tensor) -> bool:
        return self.eos_id is not None and bool((generated == self.eos_id).any())


class EditRule:
    """LLaDA2.1 draft and edit (module docstring). A row's state counts its post steps and whether
    its block is finished."""

    def __init__(self, options, mask_id: int, eos_id: int | None):
        self.options, self.mask_id, self.eos_id = options, mask_id, eos_id

    def start_block(self) -> dict:
        return {"post_steps": 0, "done": False}

    def wants_step(self, state: dict, block: torch.Tensor) -> bool:
        """Called once at the start of every iteration: counts a post step when no mask is left."""
        if state["done"]:
            return False
        if not bool((block == self.mask_id).any()):
            state["post_steps"] += 1
            if state["post_steps"] > self.options.max_post_steps:
                state["done"] = True
        return not state["done"]

    def step(self, state, block, tokens, confidence, prompt_in_block, generated) -> tuple[int, bool]:
        masked = block == self.mask_id
        commit = (
            select_commits(confidence, masked, self.options.num_to_transfer, self.options.threshold)
            if bool(masked.any())
            else torch.zeros_like(masked)
        )
        edit = select_edits(tokens, confidence, block, ~masked & ~prompt_in_block, self.options.editing_threshold)
        change = commit | edit
        block[change] = tokens[change]
        edits = int(edit.sum())
        if not bool(masked.any()) and edits == 0:
            state["done"] = True
        return edits, False

    def stop_after_block(self, generated: torch.Tensor) -> bool:
        return self.options.eos_early_stop and self.eos_id is not None and bool((generated == self.eos_id).any())
