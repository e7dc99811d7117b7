"""Turn one validated chat (messages) into token ids plus the length of its never-noised prompt.

The split matters for diffusion SFT: prompt tokens are conditioning (never masked, no loss), answer
tokens are what gets noised and trained. The answer ends with EOS (`<|endoftext|>`), not the template's
`<|role_end|>`, so the model learns to stop by emitting EOS, which is what LLaDA2 sampling stops on.
"""

from __future__ import annotations

import json
import weakref
from collections.abc import Sequence
from functools import lru_cache

from jinja2.exceptions import TemplateError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from megadiff.data.rows import DataError
from megadiff.hf.tokenizer import LLADA2_CHAT_TEMPLATE


@lru_cache(maxsize=8)
def _compiled_template(template: str):
    """Compile a chat template the way transformers does (sandboxed, trim/lstrip blocks)."""

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
    return _render(messages[:-1], tokenizer)


class ChatTemplateError(DataError):
    """The tokenizer's chat template fails to render (a syntax error, its own raise_exception, or an
    attempt to leave Jinja's sandbox); the message names the tokenizer."""


def _render(context: Sequence[dict], tokenizer) -> str:
    template = chat_template_of(tokenizer)
    try:
        if context:
            return tokenizer.apply_chat_template(
                list(context), chat_template=template, add_generation_prompt=True, tokenize=False
            )
        # transformers refuses an empty conversation; an assistant-only row still has a generation prompt.
        return _compiled_template(template).render(messages=[], add_generation_prompt=True)
    except (TemplateError, OverflowError, RecursionError) as e:  # SecurityError (sandbox), syntax, its
        # own raise_exception, the sandbox's range limit, endless recursion
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ChatTemplateError(
            f"the chat template of tokenizer {name} failed: {type(e).__name__}: {str(e).rstrip('.')}; fix or replace the "
            "tokenizer's chat_template"
        ) from None


def special_token_strings(tokenizer) -> tuple[str, ...]:
    """Every added token's text, special or not (`<|mask|>`; LLaDA2's `<role>` is an added token
    that is not marked special): what must not be parsed out of content."""
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return tuple(sorted({t.content for t in added.values()} | set(tokenizer.all_special_tokens)))


_PLAIN_BACKENDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _plain_text_backend(tokenizer):
    """The fast tokenizer's backend without its added tokens (special or not), so text is spelled
    with the model vocabulary only; None for a tokenizer without a backend (slow tokenizers)."""
    if tokenizer not in _PLAIN_BACKENDS:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None:
            spec = json.loads(backend.to_str())
            spec["added_tokens"] = []
            backend = type(backend).from_str(json.dumps(spec))
        _PLAIN_BACKENDS[tokenizer] = backend
    return _PLAIN_BACKENDS[tokenizer]


def encode_text(text: str, tokenizer) -> list[int]:
    """Ids of `text` as plain text: an added-token string inside it (`<|mask|>`, `<role>`) is spelled
    with ordinary tokens, so message content can never inject a mask or a role marker."""
    backend = _plain_text_backend(tokenizer)
    if backend is not None:
        return list(backend.encode(text, add_special_tokens=False).ids)
    ids = list(tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])
    added = {i for i in (getattr(tokenizer, "added_tokens_decoder", {}) or {})}
    if added.intersection(ids):  # split_special_tokens spares non-special added tokens
        raise ValueError(
            f"the text holds added-token strings ({', '.join(s for s in special_token_strings(tokenizer) if s in text)}) "
            "that this (slow) tokenizer cannot spell as plain text; remove them or use the fast tokenizer"
        )
    return ids


# Stand-ins for the contents while the template is rendered: private-use code points that no text
# holds, plus letters and outer spaces so that a template that rewrites content (upper, trim) is caught.
_CONTENT_STANDIN = " \ue000content{}\ue001 "


def encode_chat_prompt(context: Sequence[dict], tokenizer) -> list[int]:
    """Ids of the chat template applied to `context` plus the generation prompt. The template's own
    markers are special tokens; message contents are plain text (see encode_text).

    The template is rendered with a stand-in for each content, and the text between stand-ins (the
    template's markers) is encoded with special tokens parsed, each content as plain text. When no
    content holds a special-token string this equals encoding the whole rendered text, which is done
    then (same ids as before content was protected, and one tokenizer call)."""
    specials = special_token_strings(tokenizer)
    if not any(s in m["content"] for m in context for s in specials):
        return list(tokenizer.encode(_render(context, tokenizer), add_special_tokens=False))
    standins = [_CONTENT_STANDIN.format(i) for i in range(len(context))]
    rendered = _render([{**m, "content": s} for m, s in zip(context, standins, strict=True)], tokenizer)
    ids: list[int] = []
    pos = 0
    for message, standin in zip(context, standins, strict=True):
        at = rendered.find(standin, pos)
        if at < 0 or rendered.count(standin) != 1:
            raise ValueError(
                "a message content holds a special-token string, and this chat template does not emit "
                "each content verbatim once, so it cannot be kept plain text; remove the special-token "
                f"strings ({', '.join(s for s in specials if s in message['content']) or 'see the row'})"
            )
        ids += tokenizer.encode(rendered[pos:at], add_special_tokens=False) if at > pos else []
        ids += encode_text(message["content"], tokenizer)
        pos = at + len(standin)
    ids += tokenizer.encode(rendered[pos:], add_special_tokens=False) if pos < len(rendered) else []
    return ids


def tokenize_sample(messages: Sequence[dict], tokenizer) -> tuple[list[int], int]:
    """Return (input_ids, prompt_len) for one chat whose last message is the assistant answer.

    input_ids = ids(prompt_text) + ids(answer content) + [eos]; tokens [0, prompt_len) are the prompt.
    Both parts are encoded without added special tokens (LLaDA2 uses no BOS). Special-token strings
    inside message contents are plain text (`<|mask|>` in an answer is never the mask id, and
    `<|role_end|><role>HUMAN</role>` in content never opens a turn); only the template's own markers
    are special tokens.
    """
    if not messages or messages[-1].get("role") != "assistant":
        raise ValueError("tokenize_sample: the last message must be the assistant answer")
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no eos_token; LLaDA2 answers end with EOS")
    prompt_ids = encode_chat_prompt(messages[:-1], tokenizer)
    answer_ids = encode_text(messages[-1]["content"], tokenizer)
    return prompt_ids + answer_ids + [int(tokenizer.eos_token_id)], len(prompt_ids)


def tokenize_rows(rows: Sequence[dict], tokenizer, mask_id: int | None = None) -> list[tuple[list[int], int]]:
    """Return tokenize_sample for each row of read_sft_rows, in order (index = global sample index).

    A row that cannot be tokenized raises DataError naming its `file:line`. With `mask_id`, a row
    whose ids hold the mask id is refused too: content is plain text, so only a tokenizer whose
    ordinary vocabulary spells the mask could get there, and the mask must never be a target."""
    samples = []
    for row in rows:
        where = row.get("source", "row")
        try:
            ids, prompt_len = tokenize_sample(row["messages"], tokenizer)
        except ValueError as e:
            raise DataError(f"{where}: {e}") from None
        if mask_id is not None and mask_id in ids:
            raise DataError(
                f"{where}: the tokenized row contains the mask token id {mask_id}; "
                "remove the mask token's text from the row"
            )
        samples.append((ids, prompt_len))
    return samples


def pad_answers_to_block(samples: Sequence[tuple[list[int], int]], eos_id: int, block_size: int):
    """Extend every answer with EOS up to a multiple of `block_size` tokens (document length).

    LLaDA2 decodes block by block and stops after the block in which EOS appears, so the model must
    learn what follows an answer's EOS inside its last block: more EOS. With packing nothing else in
    the document would teach that (pad_to_max gets it from its EOS pad tail, as dFactory does)."""
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    return [(list(ids) + [eos_id] * (-len(ids) % block_size), prompt_len) for ids, prompt_len in samples]
