"""The `megadiff` lm-eval model's arguments (`--model_args key=value,...`): parsed, checked and loaded.

Everything is checked before the model is loaded, and a bad value is a one-line ModelArgError that
names the argument. Decoding follows tools/generate.py: the LLaDA2.1 editing fields come from the
argument, else the model dir's generation_config.json, else off (the LLaDA2.0 threshold rule).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from megadiff.errors import UserError
from megadiff.hf.reference import family_of
from megadiff.inference.cli import EDITING_FIELDS, SAMPLER_FLAGS, generation_config_editing
from megadiff.inference.loading import (
    check_device,
    default_device,
    is_mcore_checkpoint,
    load_model,
    load_tokenizer,
    model_config,
    parse_dtype,
    special_token_ids,
)
from megadiff.inference.sampler import DecodingOptions


class ModelArgError(UserError):
    """A `--model_args` entry that the megadiff model cannot use; the message names it."""


# Decoding fields a model arg may set (temperature, top_k and top_p come with each request, from
# the task's generation_kwargs / --gen_kwargs).
DECODING_ARGS = (
    "rule",
    "remasking",
    "gen_length",
    "block_length",
    "steps",
    "threshold",
    "minimal_topk",
    "eos_early_stop",
    "use_cache",
    *EDITING_FIELDS,
)


@dataclass(frozen=True)
class ModelArgs:
    """What `--model_args` may hold. Decoding fields left None take generation_config.json's value
    (editing fields) or DecodingOptions' default."""

    pretrained: str | None = None  # HF model dir (any family) or megadiff megatron-core checkpoint dir
    tokenizer: str | None = None  # default: the model dir (an mcore checkpoint: its recorded HF source)
    iteration: int | None = None  # mcore checkpoint iteration (default: the latest)
    trust_checkpoint: bool = False  # read an mcore checkpoint's pickles unrestricted (your own only)
    dtype: str = "auto"  # auto: bfloat16 on GPU, float32 on CPU
    device: str | None = None  # default: cuda:LOCAL_RANK on a GPU, else cpu
    batch_size: int = 1  # rows per forward: MC samples (loglikelihood) or prompts (generate_until)
    max_batch_size: int | None = None  # lm-eval's, for batch_size=auto; not used
    # lm-eval's --trust_remote_code adds this (some task datasets need it); megadiff runs its own model
    # code, never the checkpoint's, so it changes nothing here
    trust_remote_code: bool = False
    mc_num: int = 128  # Monte-Carlo samples per loglikelihood request (LLaDA's default)
    check_greedy: bool = False  # compute is_greedy with the sampler (one decode per request)
    seed: int = 0  # likelihood noise and sampling
    rule: str | None = None  # threshold (LLaDA2) or low_confidence (LLaDA, LLaDA-MoE); default: the family's
    remasking: str | None = None  # low_confidence rule: low_confidence or random
    gen_length: int | None = None  # tokens to generate when a request sets no max_gen_toks
    block_length: int | None = None
    steps: int | None = None
    threshold: float | None = None
    minimal_topk: int | None = None
    eos_early_stop: bool | None = None
    use_cache: bool | None = None
    editing_threshold: float | str | None = None  # "off": the 2.0 rule even if generation_config.json says 2.1
    max_post_steps: int | None = None
    num_to_transfer: int | None = None


ARG_NAMES = tuple(f.name for f in dataclasses.fields(ModelArgs))
INT_ARGS = ("iteration", "batch_size", "max_batch_size", "mc_num", "seed", "gen_length", "block_length", "steps")
INT_ARGS += ("minimal_topk", "max_post_steps", "num_to_transfer")
BOOL_ARGS = ("trust_checkpoint", "trust_remote_code", "check_greedy", "eos_early_stop", "use_cache")


def parse_model_args(values: dict) -> ModelArgs:
    """ModelArgs from lm-eval's parsed `--model_args` (values already typed by lm-eval: 'true' is True,
    '8' is 8); ModelArgError naming the first bad argument."""
    unknown = [name for name in values if name not in ARG_NAMES]
    if unknown:
        raise ModelArgError(f"model arg {unknown[0]!r} is unknown to the megadiff model; known: {', '.join(ARG_NAMES)}")
    values = dict(values)
    if isinstance(values.get("batch_size"), str):
        text = values["batch_size"]
        if text.startswith("auto"):
            raise ModelArgError(
                f"model arg batch_size={text}: 'auto' is not supported by the megadiff model; pass a number"
            )
        values["batch_size"] = _int_from_text("batch_size", text)
    for name in INT_ARGS:
        value = values.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise ModelArgError(f"model arg {name}={value!r} must be an integer")
    for name in BOOL_ARGS:
        value = values.get(name)
        if value is not None and not isinstance(value, bool):
            raise ModelArgError(f"model arg {name}={value!r} must be true or false")
    for name in ("mc_num", "batch_size"):
        if name in values and values[name] <= 0:
            raise ModelArgError(f"model arg {name}={values[name]} must be a positive integer")
    args = ModelArgs(**values)
    if args.pretrained is None:
        raise ModelArgError(
            "model arg pretrained is missing; pass pretrained=DIR (an HF model dir or a megadiff checkpoint)"
        )
    if not os.path.isdir(args.pretrained):
        raise ModelArgError(
            f"model arg pretrained={args.pretrained}: directory not found (expected a Hugging Face model dir "
            f"or a megadiff megatron-core checkpoint dir)"
        )
    if args.iteration is not None and not is_mcore_checkpoint(args.pretrained):
        raise ModelArgError(
            f"model arg iteration={args.iteration}: pretrained={args.pretrained} is not an mcore checkpoint"
        )
    if args.dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise ModelArgError(f"model arg dtype={args.dtype!r} is not one of auto, float32, bfloat16, float16")
    decoding_options(args)  # the decoding fields' checks, before anything loads
    return args


def model_family(pretrained: str, iteration: int | None = None):
    """The model family of `pretrained` (its config.json / recorded HF config); None when that cannot
    be read yet (the loader reports why)."""
    try:
        return family_of(model_config(pretrained, iteration), os.path.join(pretrained, "config.json"))
    except (OSError, ValueError):  # ConfigError and CheckpointError are ValueErrors
        return None


def family_sampler(pretrained: str, iteration: int | None = None):
    family = model_family(pretrained, iteration)
    return family.sampler if family is not None else None


def _int_from_text(name: str, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ModelArgError(f"model arg {name}={text!r} must be an integer") from None


def decoding_options(args: ModelArgs) -> DecodingOptions:
    """The base DecodingOptions of the model args (each request then sets its length and sampling)."""
    try:
        fields = generation_config_editing(args.pretrained)
    except ValueError as e:
        raise ModelArgError(f"model arg pretrained: {e}") from None
    for name in DECODING_ARGS:
        if getattr(args, name) is not None:
            fields[name] = getattr(args, name)
    sampler = family_sampler(args.pretrained, args.iteration)
    for name in SAMPLER_FLAGS:  # unset: the model family's sampler defaults (generate.py's rule)
        if name not in fields and sampler is not None and getattr(sampler, name) is not None:
            fields[name] = getattr(sampler, name)
    if isinstance(fields.get("editing_threshold"), str):
        if fields["editing_threshold"].lower() != "off":
            raise ModelArgError(
                f"model arg editing_threshold={fields['editing_threshold']!r}: use a number in [0, 1] or off"
            )
        fields["editing_threshold"] = None
    try:
        return DecodingOptions(**fields, seed=args.seed)
    except ValueError as e:
        raise ModelArgError(f"model arg {e}") from None


@dataclass
class LoadedModel:
    """What evaluation needs from the model dir."""

    model: object
    tokenizer: object
    mask_id: int
    eos_id: int
    options: DecodingOptions
    family: object = None  # megadiff.models.family.ModelFamily of the model


def load_for_evaluation(args: ModelArgs) -> LoadedModel:
    """The reference model (generate.py's loader: HF dir or mcore checkpoint), its tokenizer, the special
    ids and the base decoding options."""
    device = args.device or default_device()
    try:
        check_device(device)
    except ValueError as e:
        raise ModelArgError(f"model arg device: {e}".replace("--device ", "")) from None
    options = decoding_options(args)
    try:
        tokenizer = load_tokenizer(args.pretrained, args.tokenizer, args.iteration)
    except FileNotFoundError as e:
        raise ModelArgError(f"model arg tokenizer: {e}".replace("pass --tokenizer DIR", "pass tokenizer=DIR")) from None
    model = load_model(
        args.pretrained,
        dtype=parse_dtype(args.dtype, device),
        device=device,
        iteration=args.iteration,
        trust_checkpoint=args.trust_checkpoint,
    )
    mask_id, eos_id = special_token_ids(model, tokenizer)
    family = family_of(model.hf_config) if isinstance(getattr(model, "hf_config", None), dict) else None
    return LoadedModel(model=model, tokenizer=tokenizer, mask_id=mask_id, eos_id=eos_id, options=options, family=family)
