"""Turn one validated chat (messages) into token ids plus the length of its never-noised prompt.

The split matters for diffusion SFT: prompt tokens are conditioning (never masked, no loss), answer
tokens are what gets noised and trained. The answer ends with EOS (`<|endoftext|>`), not the template's
`<|role_end|>`, so the model learns to stop by emitting EOS, which is what LLaDA2 sampling stops on.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

from megadiff.hf.tokenizer import LLADA2_CHAT_TEMPLATE


@lru_cache(maxsize=8)
def _compiled_template(template: str):
    """Compile a chat template the way transformers does (sandboxed, trim/lstrip blocks)."""
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise ValueError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template)


def chat_template_of(tokenizer) -> str:
    """Return the tokenizer's chat template, or LLaDA2's when the tokenizer has none."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # named templates: use the default one
        template = template.get("default")
    return template or LLADA2_CHAT_TEMPLATE


def prompt_text(messages: Sequence[dict], tokenizer) -> str:
    """Return the chat-template text of every message before the final assistant turn, plus the
    generation prompt (`<role>ASSISTANT</role>` for LLaDA2): exactly what the model sees at inference.
    """
    template = chat_template_of(tokenizer)
    context = list(messages[:-1])
    if context:
        return tokenizer.apply_chat_template(
            context, chat_template=template, add_generation_prompt=True, tokenize=False
        )
    # transformers refuses an empty conversation; an assistant-only row still has a generation prompt.
    return _compiled_template(template).render(messages=[], add_generation_prompt=True)


def tokenize_sample(messages: Sequence[dict], tokenizer) -> tuple[list[int], int]:
    """Return (input_ids, prompt_len) for one chat whose last message is the assistant answer.

    input_ids = ids(prompt_text) + ids(answer content) + [eos]; tokens [0, prompt_len) are the prompt.
    Both parts are encoded without added special tokens (LLaDA2 uses no BOS). Special-token strings
    inside message contents are parsed as special tokens, as the chat template would do.
    """
    if not messages or messages[-1].get("role") != "assistant":
        raise ValueError("tokenize_sample: the last message must be the assistant answer")
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no eos_token; LLaDA2 answers end with EOS")
    prompt_ids = tokenizer.encode(prompt_text(messages, tokenizer), add_special_tokens=False)
    answer_ids = tokenizer.encode(messages[-1]["content"], add_special_tokens=False)
    return list(prompt_ids) + list(answer_ids) + [int(tokenizer.eos_token_id)], len(prompt_ids)


def tokenize_rows(rows: Sequence[dict], tokenizer) -> list[tuple[list[int], int]]:
    """Return tokenize_sample for each row of read_sft_rows, in order (index = global sample index)."""
    return [tokenize_sample(row["messages"], tokenizer) for row in rows]


def pad_answers_to_block(samples: Sequence[tuple[list[int], int]], eos_id: int, block_size: int):
    """Extend every answer with EOS up to a multiple of `block_size` tokens (document length).

    LLaDA2 decodes block by block and stops after the block in which EOS appears, so the model must
    learn what follows an answer's EOS inside its last block: more EOS. With packing nothing else in
    the document would teach that (pad_to_max gets it from its EOS pad tail, as dFactory does)."""
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    return [(list(ids) + [eos_id] * (-len(ids) % block_size), prompt_len) for ids, prompt_len in samples]
