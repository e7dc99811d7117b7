"""Command-line pieces shared by tools/generate.py and tools/eval_gsm8k.py: the model and decoding
flags, turning them into library objects, and echoing the full command a run is about to perform."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex

from megadiff.checkpoint.format import TRAINING_RECORD, read_meta, resolve_checkpoint_dir, training_record
from megadiff.hf.reference import family_of

from .loading import (
    MOE_EXPERTS,
    check_device,
    check_model_dir,
    default_device,
    is_mcore_checkpoint,
    load_model,
    load_tokenizer,
    model_config,
    parse_dtype,
    special_token_ids,
)
from .sampler import REMASKING, RULES, DecodingOptions, check_positions, check_token_ids


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        required=True,
        help="Hugging Face model dir (LLaDA2, LLaDA, LLaDA-MoE), or a megadiff megatron-core checkpoint dir",
    )
    parser.add_argument(
        "--iteration", type=int, default=None, help="mcore checkpoint iteration to load (default: the latest)"
    )
    parser.add_argument("--tokenizer", default=None, help="tokenizer dir (default: the model dir)")
    parser.add_argument("--device", default=default_device(), help="cpu or cuda[:i] (default: %(default)s)")
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="weights dtype; auto = bfloat16 on GPU, float32 on CPU",
    )
    parser.add_argument(
        "--moe-experts",
        default="auto",
        choices=MOE_EXPERTS,
        help="routed experts: grouped (torch._grouped_mm over the stacked experts), sequential (one expert "
        "at a time); auto = batched (grouped where it runs, else a gathered matmul); te is training-only "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--mask-id",
        type=int,
        default=None,
        help="mask token id (default: the model family's mask token in the tokenizer, e.g. <|mask|>)",
    )
    parser.add_argument("--eos-id", type=int, default=None, help="EOS token id (default: config.json eos_token_id)")
    parser.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="read an mcore checkpoint's pickled metadata without restriction (only for "
        "checkpoints you made: a pickle can run code)",
    )


def add_decoding_arguments(parser: argparse.ArgumentParser, batch_size: int = 1) -> None:
    d = DecodingOptions()
    family = " (default: the model family's sampler defaults; LLaDA2: %s)"
    parser.add_argument(
        "--rule",
        choices=RULES,
        default=None,
        help="threshold: LLaDA2's block rule (blocks from position 0, block-causal, KV cache); low_confidence: "
        "LLaDA's generate.py (blocks after the prompt, full attention)" + family % d.rule,
    )
    parser.add_argument("--gen-length", type=int, default=None, help="tokens to generate" + family % d.gen_length)
    parser.add_argument("--block-length", type=int, default=None, help="block size" + family % d.block_length)
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="iterations per block (threshold rule) or over the whole answer (low_confidence rule)" + family % d.steps,
    )
    parser.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="threshold rule: commit every prediction above this confidence" + family % d.threshold,
    )
    parser.add_argument(
        "--remasking",
        choices=REMASKING,
        default=d.remasking,
        help="low_confidence rule: commit the most probable predictions, or random ones (default: %(default)s)",
    )
    parser.add_argument("--temperature", type=float, default=d.temperature, help="0 = greedy (default: %(default)s)")
    parser.add_argument("--top-k", type=int, default=d.top_k, help="default: off")
    parser.add_argument("--top-p", type=float, default=d.top_p, help="default: off")
    parser.add_argument(
        "--minimal-topk",
        type=int,
        default=d.minimal_topk,
        help="steps = min(steps, gen_length // minimal_topk) (default: %(default)s)",
    )
    parser.add_argument(
        "--eos-early-stop", action="store_true", help="stop as soon as an EOS is committed with no mask before it"
    )
    parser.add_argument(
        "--editing-threshold",
        type=_threshold_or_off,
        default=None,
        help="LLaDA2.1 draft and edit: re-write a committed token when the model predicts another one "
        "with confidence above this; 'off' = the LLaDA2.0 rule (default: the model dir's "
        "generation_config.json editing_threshold, else off)",
    )
    parser.add_argument(
        "--max-post-steps",
        type=int,
        default=None,
        help=f"with editing: edit-only iterations allowed per block once its masks are filled "
        f"(default: generation_config.json, else {d.max_post_steps})",
    )
    parser.add_argument(
        "--num-to-transfer",
        type=int,
        default=None,
        help=f"with editing: masks committed per iteration when fewer clear --threshold "
        f"(default: generation_config.json, else {d.num_to_transfer})",
    )
    parser.add_argument(
        "--no-cache", action="store_true", help="recompute finished blocks every step (slow; for checks)"
    )
    parser.add_argument("--seed", type=int, default=d.seed, help="sampling seed (default: %(default)s)")
    parser.add_argument(
        "--batch-size", type=int, default=batch_size, help="prompts per generate call (default: %(default)s)"
    )


EDITING_FIELDS = ("editing_threshold", "max_post_steps", "num_to_transfer")


def _threshold_or_off(text: str) -> float | str:
    return "off" if text.lower() in ("off", "none") else float(text)


def generation_config_editing(model_dir: str) -> dict:
    """The LLaDA2.1 decoding fields (EDITING_FIELDS) that <model_dir>/generation_config.json carries,
    checked; {} when there is no such file. A LLaDA2.1 dir that sets editing_threshold there decodes
    with editing unless the command line says otherwise."""
    path = os.path.join(model_dir, "generation_config.json")
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read it as JSON ({e}); fix or remove the file") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    fields = {k: data[k] for k in EDITING_FIELDS if k in data}
    try:
        DecodingOptions(**fields)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: {e}; fix the field or override it on the command line") from None
    return fields


def edit_training(model_dir: str, iteration: int | None = None) -> tuple[bool | None, str]:
    """(was the model trained for token editing?, the record that says so). True: its
    generation_config.json sets editing_threshold (its makers decode with editing: LLaDA2.1) or
    megadiff trained it with diffusion.edit_ratio > 0; False: a megadiff record shows edit_ratio 0;
    None: no record either way (e.g. a LLaDA2.0 download)."""
    if generation_config_editing(model_dir).get("editing_threshold") is not None:
        return True, f"{model_dir}/generation_config.json sets editing_threshold"
    record, where = None, os.path.join(model_dir, TRAINING_RECORD)
    try:
        if is_mcore_checkpoint(model_dir):
            ckpt = resolve_checkpoint_dir(model_dir, iteration)
            where = os.path.join(ckpt, "megadiff.json")
            record = (training_record(read_meta(ckpt)) or {}).get("diffusion")
        elif os.path.isfile(where):
            with open(where) as f:
                record = json.load(f).get("diffusion")
    except (OSError, ValueError, AttributeError):  # an unreadable record is no record
        record = None
    if not isinstance(record, dict) or not isinstance(record.get("edit_ratio"), (int, float)):
        return None, f"no generation_config.json editing_threshold and no megadiff training record ({where})"
    return record["edit_ratio"] > 0, f"{where}: diffusion.edit_ratio={record['edit_ratio']}"


def untrained_editing_warning(args: argparse.Namespace, options: DecodingOptions) -> str | None:
    """A warning line when the command line turns editing on for a model whose records do not show
    edit (T2T) training: an untrained model's confident re-writes damage answers."""
    if options.editing_threshold is None or args.editing_threshold in (None, "off"):
        return None  # editing off, or on by the model dir's own generation_config.json
    trained, evidence = edit_training(args.model, getattr(args, "iteration", None))
    if trained:
        return None
    return (
        f"warning: --editing-threshold {args.editing_threshold} on a model not trained for token editing "
        f"({evidence}); its edits can turn right answers wrong. LLaDA2.1 models and megadiff runs with "
        "diffusion.edit_ratio > 0 are trained for it"
    )


SAMPLER_FLAGS = ("rule", "gen_length", "block_length", "steps", "threshold")  # their defaults: the family's


def apply_family_defaults(args: argparse.Namespace) -> str | None:
    """Fill the sampler flags left unset (SAMPLER_FLAGS) with the defaults of the model's family
    (ModelFamily.sampler: LLaDA2's threshold rule, LLaDA / LLaDA-MoE's low_confidence rule, their
    lengths); return the family's name. When the model's config cannot be read yet, the flags stay
    unset (DecodingOptions' defaults apply) and the error is reported where the model is loaded."""
    try:
        config = model_config(args.model, getattr(args, "iteration", None))
        family = family_of(config, os.path.join(args.model, "config.json"))
    except (OSError, ValueError):  # ConfigError and CheckpointError are ValueErrors
        return None
    sampler = family.sampler
    for name in SAMPLER_FLAGS:
        if getattr(args, name, None) is None and getattr(sampler, name, None) is not None:
            setattr(args, name, getattr(sampler, name))
    return family.name


def decoding_options(args: argparse.Namespace) -> DecodingOptions:
    """DecodingOptions from parsed flags (ValueError names the bad one, in its library spelling).
    The editing fields come from the flags, else the model dir's generation_config.json, else the
    library defaults."""
    if args.batch_size <= 0:
        raise ValueError(f"--batch-size must be a positive integer, got {args.batch_size}")
    editing = generation_config_editing(args.model)
    for name in EDITING_FIELDS:
        if getattr(args, name) is not None:
            editing[name] = getattr(args, name)
    if editing.get("editing_threshold") == "off":
        editing["editing_threshold"] = None
    defaults = DecodingOptions()
    given = {name: getattr(args, name, None) for name in SAMPLER_FLAGS}
    return DecodingOptions(
        **editing,
        **{name: getattr(defaults, name) if value is None else value for name, value in given.items()},
        remasking=args.remasking,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        minimal_topk=args.minimal_topk,
        eos_early_stop=args.eos_early_stop,
        use_cache=not args.no_cache,
        seed=args.seed,
    )


@dataclasses.dataclass
class DecodingInputs:
    """What decoding needs besides the weights, known before they are loaded: the model's HF
    config (vocabulary size, position range), the tokenizer (None without one), the special ids."""

    config: dict
    tokenizer: object
    mask_id: int
    eos_id: int

    @property
    def paths(self) -> list[str]:
        """Where the tokenizer was read from (an input no output may overwrite)."""
        return [self.tokenizer.name_or_path] if getattr(self.tokenizer, "name_or_path", None) else []

    def check_prompts(self, prompts, options: DecodingOptions, where: str = "prompts") -> None:
        """Token ids inside the vocabulary, no mask token, and positions that fit: before any weight
        is loaded (the sampler checks the same again)."""
        try:
            check_token_ids(self.config["vocab_size"], self.mask_id, self.eos_id, prompts)
            check_positions(self.config.get("max_position_embeddings"), prompts, options)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None


def prepare_decoding(args: argparse.Namespace, need_tokenizer: bool = True) -> DecodingInputs:
    """Device, model dir, config, tokenizer and special ids from the model flags, without loading
    any weight. Without need_tokenizer a missing tokenizer is allowed when --mask-id is given."""
    check_device(args.device)
    check_model_dir(args.model)  # before the tokenizer, so a wrong --model is reported as such
    config = model_config(args.model, args.iteration)
    try:
        tokenizer = load_tokenizer(args.model, args.tokenizer, args.iteration)
    except FileNotFoundError:
        if need_tokenizer or args.mask_id is None:
            raise
        tokenizer = None
    mask_id, eos_id = special_token_ids(config, tokenizer, args.mask_id, args.eos_id)
    return DecodingInputs(config, tokenizer, mask_id, eos_id)


def load_decoding_model(args: argparse.Namespace):
    """The model of the model flags, in eval mode on --device (the expensive step: last)."""
    return load_model(
        args.model,
        dtype=parse_dtype(args.dtype, args.device),
        device=args.device,
        iteration=args.iteration,
        trust_checkpoint=args.trust_checkpoint,
        moe_experts=args.moe_experts,
    )


def load_for_decoding(args: argparse.Namespace, need_tokenizer: bool = True):
    """(model, tokenizer or None, mask_id, eos_id) from the model flags (`prepare_decoding`, then
    `load_decoding_model`)."""
    inputs = prepare_decoding(args, need_tokenizer)
    return load_decoding_model(args), inputs.tokenizer, inputs.mask_id, inputs.eos_id


def command_line(prog: str, parser: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    """The full command equivalent to `args`, defaults spelled out, for the log."""
    parts = [prog]
    for action in parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        value = getattr(args, action.dest, None)
        flag = action.option_strings[-1]
        if isinstance(action, argparse._StoreTrueAction):
            parts += [flag] if value else []
        elif isinstance(action, argparse._AppendAction):  # --prompt a --prompt b
            for item in value or []:
                parts += [flag, str(item)]
        elif isinstance(value, list):  # nargs="+": --data a b
            parts += [flag, *map(str, value)]
        elif value is not None:
            parts += [flag, str(value)]
    return " ".join(shlex.quote(p) for p in parts)
