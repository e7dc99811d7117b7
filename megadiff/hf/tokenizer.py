"""A tiny LLaDA2-style tokenizer built on the spot, so tests and demos need no download.

LLaDA2's real tokenizer has 157k tokens; everything megadiff does with a tokenizer (chat template,
special-token ids, EOS/pad handling, the `<|mask|>` id) is exercised just as well by a byte-level BPE
of under 500 tokens trained in-process on a fixed corpus. Byte-level means any text round-trips
(digits, whitespace, newlines, punctuation, even non-ASCII), and the fixed corpus makes the vocabulary
identical on every build.

The files written are the plain `PreTrainedTokenizerFast` trio (`tokenizer.json`,
`tokenizer_config.json`, `special_tokens_map.json`), which `AutoTokenizer.from_pretrained` loads on
transformers 4.5x and 5.x alike.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PretrainedConfig, PreTrainedTokenizerFast

from megadiff.errors import UserError
from megadiff.files.inside import check_links_inside, file_inside

# The files of a tokenizer directory; a directory with none of them holds no tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


class TokenizerError(UserError):
    """A tokenizer that cannot be loaded or lacks a token megadiff needs."""


# Special tokens, spelled as in LLaDA2.0's tokenizer. pad == eos, as in the real model.
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = EOS_TOKEN
MASK_TOKEN = "<|mask|>"
ROLE_OPEN_TOKEN = "<role>"
ROLE_CLOSE_TOKEN = "</role>"
ROLE_END_TOKEN = "<|role_end|>"
SPECIAL_TOKENS = (EOS_TOKEN, MASK_TOKEN, ROLE_OPEN_TOKEN, ROLE_CLOSE_TOKEN, ROLE_END_TOKEN)

# One turn per message: <role>NAME</role>{content}<|role_end|>; system/user/assistant map to
# SYSTEM/HUMAN/ASSISTANT; add_generation_prompt opens an assistant turn. Any other role is an error.
LLADA2_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{%- set role_name = 'SYSTEM' -%}"
    "{%- elif message['role'] == 'user' -%}{%- set role_name = 'HUMAN' -%}"
    "{%- elif message['role'] == 'assistant' -%}{%- set role_name = 'ASSISTANT' -%}"
    "{%- else -%}{{- raise_exception('unknown chat role: ' ~ message['role']) -}}"
    "{%- endif -%}"
    "{{- '<role>' ~ role_name ~ '</role>' ~ message['content'] ~ '<|role_end|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<role>ASSISTANT</role>' -}}{%- endif -%}"
)

# Base BPE vocabulary size (256 byte symbols + merges); the 5 special tokens come on top, so the total
# stays under the 500 the tests promise.
TINY_BPE_VOCAB_SIZE = 490

# Fixed training corpus: common English words, GSM8K-ish arithmetic, chat-like text. Only the merge
# table depends on it; round-tripping never does (byte-level BPE can spell anything).
_TINY_CORPUS = [
    "the of and to in is was that for on are with as his they be at one have this from or had by",
    "word but what some we can out other were all there when up use your how said an each she which",
    "do their time if will way about many then them write would like so these her long make thing see",
    "him two has look more day could go come did number sound no most people my over know water than",
    "call first who may down side been now find any new work part take get place made live where after",
    "back little only round man year came show every good me give our under name very through just form",
    "question answer solve step total each cost price apples books students hours minutes days dollars",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
    "How many clips did Natalia sell altogether in April and May? 48 / 2 = 24. 48 + 24 = 72. #### 72",
    "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting.",
    "x = 3 * (4 + 5) - 7 / 2; y = x ** 2 % 10; if x >= y and y != 0: print(x, y)",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 20 25 30 40 50 60 75 100 1000 2024 3.14 0.5 -1 +2 = <= >= == !=",
    "Hello, world! What is 2 + 2? The answer is 4. Let's think step by step.\nFirst, we add.\n",
    "def add(a, b):\n    return a + b\n\nfor i in range(10):\n    total += i\n",
    "Q: What is the capital of France? A: Paris. Q: Who wrote Hamlet? A: Shakespeare.",
    "(a) [b] {c} <d> 'e' \"f\" `g` ~h @i #j $k %l ^m &n *o _p |q \\r /s ?t !u :v ;w ,x .y -z",
]


def build_tiny_tokenizer(out_dir: str | Path, facts=None) -> PreTrainedTokenizerFast:
    """Train the tiny byte-level BPE, write it to `out_dir` and return it loaded from there.

    `facts` (a model family's megadiff.models.family.TokenizerFacts) names the special tokens
    (mask, EOS = pad, the rest), and the chat template; default: LLaDA2.0's.
    Returning the tokenizer loaded back from disk (not the in-memory one) means callers always use
    exactly what `AutoTokenizer.from_pretrained(out_dir)` will see.
    """
    if facts is None:
        eos, mask, specials, template = EOS_TOKEN, MASK_TOKEN, SPECIAL_TOKENS, LLADA2_CHAT_TEMPLATE
    else:
        eos, mask, template = facts.eos_token, facts.mask_token, facts.chat_template
        specials = tuple(dict.fromkeys((*facts.special_tokens, eos, mask, facts.end_of_turn)))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_BPE_VOCAB_SIZE,
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_TINY_CORPUS, trainer=trainer)
    # Specials are appended after the BPE vocabulary (high ids, as in the real model), so an
    # accidental id 0 is never mistaken for the mask or pad token.
    bpe.add_special_tokens(list(specials))
    bpe.save(str(out_dir / "tokenizer.json"))

    special_map = {"eos_token": eos, "pad_token": eos, "mask_token": mask}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special_map,
        "additional_special_tokens": [t for t in specials if t not in (eos, mask)],
        "model_max_length": 32768,
        "clean_up_tokenization_spaces": False,
        "chat_template": template,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    special_map_file = {**special_map, "additional_special_tokens": config["additional_special_tokens"]}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special_map_file, indent=2) + "\n")

    return PreTrainedTokenizerFast.from_pretrained(str(out_dir))


def load_local_tokenizer(tokenizer_dir: str):
    """The tokenizer of a local dir, without ever running (or offering to run) Python code from it.

    transformers loads a tokenizer whose tokenizer_config.json / config.json names its own code
    (`auto_map`) by importing that code when `trust_remote_code=True`, and otherwise asks `Do you
    wish to run the custom code? [y/N]` on stdin, where a `y` runs it. megadiff passes
    `trust_remote_code=False` (no question, no code) and `local_files_only=True` (a name that is not
    a local dir is never looked up on the hub), reads no file that a link leads outside the dir to,
    and refuses such a tokenizer with one line (TokenizerError)."""
    check_links_inside(tokenizer_dir, "tokenizer directory")
    try:
        return AutoTokenizer.from_pretrained(
            tokenizer_dir, config=_plain_config(tokenizer_dir), trust_remote_code=False, local_files_only=True
        )
    except ValueError as e:
        if "trust_remote_code" not in str(e) and "custom code" not in str(e):
            raise
        raise TokenizerError(
            f"{tokenizer_dir}: its tokenizer needs Python code from the model directory (an auto_map entry in "
            f"tokenizer_config.json or config.json); megadiff never runs code from a model directory. Use a "
            f'tokenizer that transformers loads by itself (tokenizer.json with "tokenizer_class": '
            f'"PreTrainedTokenizerFast" in tokenizer_config.json)'
        ) from None


def _plain_config(tokenizer_dir: str) -> PretrainedConfig | None:
    """An empty config for AutoTokenizer when tokenizer_config.json names the tokenizer class, so
    that config.json is not read at all; None (AutoTokenizer reads config.json, without its code)
    when the class must come from there.

    Given no config, AutoTokenizer (transformers 5) loads config.json through AutoConfig first; a
    released LLaDA2 config.json names its own configuration code (auto_map), so AutoConfig asks `Do
    you wish to run the custom code?` unless told not to and, told not to, warns that `llada2_moe` is
    an unknown model type."""
    path = file_inside(tokenizer_dir, "tokenizer_config.json", "tokenizer_config.json")
    try:
        with open(path, encoding="utf-8") as f:
            names_class = isinstance(json.load(f).get("tokenizer_class"), str)
    except (OSError, ValueError, AttributeError):
        return None  # no (usable) tokenizer_config.json: AutoTokenizer says what is wrong
    return PretrainedConfig() if names_class else None


def mask_token_id(tokenizer, override: int | None = None, token: str = MASK_TOKEN) -> int:
    """Return the id of the diffusion mask `token` (LLaDA2's `<|mask|>`; a model family's
    TokenizerFacts.mask_token), or `override` when given.

    LLaDA2's config.json does not carry the mask id (156895 in the real vocabulary), so it is read
    from the tokenizer; the override exists for tokenizers that spell it differently.
    """
    if override is not None:
        return int(override)
    vocab = tokenizer.get_vocab()
    if token in vocab:
        return int(vocab[token])
    raise TokenizerError(
        f"tokenizer {getattr(tokenizer, 'name_or_path', '') or type(tokenizer).__name__} has no "
        f"{token!r} token; pass the mask token id explicitly (mask_token_id override)"
    )
