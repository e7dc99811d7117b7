"""Text in, text out: chat-template prompts, decoded answers and a multi-turn chat session.

Prompts are built with the same code the SFT data path uses (`megadiff.data.tokenize.encode_chat_prompt`),
so the model sees at inference exactly the prompt format it was trained on. As in training, what the user
types is plain text: `<|mask|>` or `<|role_end|><role>HUMAN</role>` in a message is spelled with ordinary
tokens and cannot inject a mask or a turn. Only a raw prompt (`raw=True`, `generate.py --raw`) is the
model's input as written, special tokens included; the sampler still refuses a mask token in any prompt.
"""

from __future__ import annotations

from collections.abc import Sequence

from megadiff.data.tokenize import encode_chat_prompt

from .sampler import DecodingOptions, GenerationResult, generate


def encode_chat(messages: Sequence[dict], tokenizer) -> list[int]:
    """Token ids of `messages` in the chat template, ending with the assistant generation prompt."""
    return encode_chat_prompt(list(messages), tokenizer)


def encode_prompt(text: str, tokenizer, raw: bool = False) -> list[int]:
    """A user prompt as token ids: wrapped in the chat template (the text is plain text), or the bare
    text with special-token strings parsed as special tokens when `raw`."""
    if raw:
        return list(tokenizer.encode(text, add_special_tokens=False))
    return encode_chat([{"role": "user", "content": text}], tokenizer)


def decode_tokens(ids: Sequence[int], tokenizer) -> str:
    """Generated ids as text, without special tokens (EOS, role markers)."""
    return tokenizer.decode(list(ids), skip_special_tokens=True)


class ChatSession:
    """A multi-turn conversation: each reply sees every earlier turn through the chat template."""

    def __init__(
        self, model, tokenizer, options: DecodingOptions, mask_id: int, eos_id: int, system: str | None = None
    ):
        self.model, self.tokenizer, self.options = model, tokenizer, options
        self.mask_id, self.eos_id, self.system = mask_id, eos_id, system
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self.turns = 0

    def reply(self, user_text: str) -> tuple[str, list[int], GenerationResult]:
        """(answer text, prompt ids, generation result) for the next user turn; the turn is remembered."""
        self.messages.append({"role": "user", "content": user_text})
        prompt_ids = encode_chat(self.messages, self.tokenizer)
        result = generate(self.model, [prompt_ids], self.options, self.mask_id, self.eos_id, row_ids=[self.turns])
        answer = decode_tokens(result.tokens[0], self.tokenizer)
        self.messages.append({"role": "assistant", "content": answer})
        self.turns += 1
        return answer, prompt_ids, result
