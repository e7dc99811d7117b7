"""Generate text with a diffusion LLM (LLaDA2, LLaDA, LLaDA-MoE) by block-wise decoding (megadiff.inference).

  .venv/bin/python tools/generate.py --model DIR --prompt "What is 2 + 2?" [--output out.jsonl]
  .venv/bin/python tools/generate.py --model DIR --input-ids prompts.json      # [ids...] or [[ids...], ...]
  .venv/bin/python tools/generate.py --model DIR --chat                        # multi-turn, reads stdin

DIR is a Hugging Face model dir or a megadiff megatron-core checkpoint dir; its config.json names the
model family, whose sampler is the default (LLaDA2: the model card's threshold rule; LLaDA and
LLaDA-MoE: LLaDA's generate.py, low-confidence remasking). Text prompts are wrapped in the chat template
unless --raw. Prints tokens per forward pass and tokens/s.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from megadiff.inference.cli import (
    add_decoding_arguments,
    add_model_arguments,
    apply_family_defaults,
    command_line,
    decoding_options,
    load_decoding_model,
    prepare_decoding,
    untrained_editing_warning,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", action="append", help="a text prompt (repeat for several)")
    source.add_argument("--input-ids", help="JSON file: one list of token ids, or a list of such lists")
    source.add_argument("--chat", action="store_true", help="interactive multi-turn chat on stdin (/reset, /exit)")
    parser.add_argument(
        "--raw",
        action="store_true",
        help="do not wrap text prompts in the chat template; special-token strings in them "
        "(<role>, <|role_end|>) become special tokens (without --raw they stay text)",
    )
    parser.add_argument("--system", default=None, help="system message for --chat")
    parser.add_argument("--output", default=None, help="write one JSON line per generation to this file")
    add_decoding_arguments(parser)
    return parser


def read_input_ids(path: str) -> list[list[int]]:
    """Prompts from a JSON file holding [ids...] or [[ids...], ...]."""
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: --input-ids file not found") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    if isinstance(data, list) and data and all(isinstance(t, int) for t in data):
        data = [data]
    if not (
        isinstance(data, list)
        and data
        and all(isinstance(p, list) and all(isinstance(t, int) for t in p) for p in data)
    ):
        raise ValueError(f"{path}: expected a list of token ids or a list of such lists")
    return data


def report_speed(num_tokens: int, forwards: int, seconds: float, edits: int = 0) -> None:
    print(
        f"tokens: {num_tokens}, forward passes: {forwards}, tokens per forward pass: "
        f"{num_tokens / max(1, forwards):.2f}, edits: {edits}, tokens/s: {num_tokens / max(seconds, 1e-9):.1f}"
    )


def read_prompts(args, tokenizer) -> tuple[list[str] | None, list[list[int]]]:
    """(texts or None, token ids) of the --prompt / --input-ids prompts (none for --chat)."""
    from megadiff.inference import encode_prompt

    if args.input_ids:
        return None, read_input_ids(args.input_ids)
    if args.chat:
        return None, []
    return args.prompt, [encode_prompt(t, tokenizer, raw=args.raw) for t in args.prompt]


def run_prompts(args, model, tokenizer, mask_id, eos_id, options, out, texts, prompts) -> None:
    from megadiff.inference import decode_tokens, generate

    num_tokens = forwards = edits = 0
    start = time.perf_counter()
    for first in range(0, len(prompts), args.batch_size):
        batch = prompts[first : first + args.batch_size]
        result = generate(model, batch, options, mask_id, eos_id, row_ids=range(first, first + len(batch)))
        num_tokens += result.num_tokens
        forwards += sum(result.forward_passes)
        edits += result.num_edits
        for i, tokens in enumerate(result.tokens):
            row = first + i
            text = decode_tokens(tokens, tokenizer) if tokenizer is not None else None
            print(f"[{row}] {text if text is not None else tokens}", flush=True)
            if out:
                out.write(
                    json.dumps(
                        {
                            "row": row,
                            "prompt": texts[row] if texts else None,
                            "prompt_ids": prompts[row],
                            "generated_ids": tokens,
                            "text": text,
                        }
                    )
                    + "\n"
                )
    report_speed(num_tokens, forwards, time.perf_counter() - start, edits)


def run_chat(args, model, tokenizer, mask_id, eos_id, options, out, texts=None, prompts=None) -> None:
    from megadiff.inference import ChatSession

    session = ChatSession(model, tokenizer, options, mask_id, eos_id, system=args.system)
    interactive = sys.stdin.isatty()
    print("chat: type a message; /reset starts over, /exit (or end of input) quits", flush=True)
    num_tokens = forwards = edits = 0
    seconds = 0.0
    while True:
        if interactive:
            print("user> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() == "/exit":
            break
        user_text = line.rstrip("\n")
        if user_text.strip() == "/reset":
            session.reset()
            print("(conversation reset)", flush=True)
            continue
        if not user_text.strip():
            continue
        start = time.perf_counter()
        answer, prompt_ids, result = session.reply(user_text)
        seconds += time.perf_counter() - start
        num_tokens += result.num_tokens
        forwards += sum(result.forward_passes)
        edits += result.num_edits
        print(f"assistant> {answer}", flush=True)
        if out:
            out.write(
                json.dumps(
                    {
                        "turn": session.turns - 1,
                        "user": user_text,
                        "prompt_ids": prompt_ids,
                        "generated_ids": result.tokens[0],
                        "text": answer,
                    }
                )
                + "\n"
            )
            out.flush()
    report_speed(num_tokens, forwards, seconds, edits)


def main(argv=None) -> int:
    from megadiff.platform import install_import_hook

    install_import_hook()  # first, before anything imports megatron-core
    parser = build_parser()
    args = parser.parse_args(argv)
    apply_family_defaults(args)  # sampler flags left unset: the model family's (echoed below)
    print(command_line("tools/generate.py", parser, args), flush=True)
    from megadiff.files.outputs import check_output_file, open_output, refuse_overlaps

    try:
        options = decoding_options(args)
        # Everything that can be wrong with the inputs and the output is found before the weights load.
        inputs = prepare_decoding(args, need_tokenizer=not args.input_ids)
        warning = untrained_editing_warning(args, options)  # editing asked of a model not trained for it
        if warning:
            print(warning, file=sys.stderr, flush=True)
        named_inputs = [("--model", args.model), ("--input-ids", args.input_ids)]
        named_inputs += [("--tokenizer", path) for path in inputs.paths]
        if args.output:
            refuse_overlaps([("--output", args.output)], named_inputs)
            check_output_file(args.output, "--output")
        texts, prompts = read_prompts(args, inputs.tokenizer)
        if prompts:  # --chat checks each turn as it comes (the sampler)
            inputs.check_prompts(prompts, options, args.input_ids or "--prompt")
        model = load_decoding_model(args)
        tokenizer, mask_id, eos_id = inputs.tokenizer, inputs.mask_id, inputs.eos_id
        print(
            f"model: {args.model} ({sum(p.numel() for p in model.parameters()):,} parameters, "
            f"{args.device}), mask_id {mask_id}, eos_id {eos_id}",
            flush=True,
        )
        out = open_output(args.output, label="--output") if args.output else None
        try:
            run = run_chat if args.chat else run_prompts
            run(args, model, tokenizer, mask_id, eos_id, options, out, texts, prompts)
        finally:
            if out:
                out.close()
    except (OSError, ValueError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"generations written to {args.output}"
        if args.output
        else "done (pass --output FILE.jsonl to keep the results)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
