#!/usr/bin/env python3
"""Does draft-and-edit decoding repair corrupted answers? (LLaDA2.1 editing, issue 17's measurement.)

For each test question: the gold answer as the model was trained on it (its chat-template tokens up to the
role end, then EOS up to gen_length), with a fraction of its tokens before the EOS replaced by uniformly random ordinary
(non-special) tokens. The corrupted answer is handed to the sampler as a draft (`drafts=`) and
decoded without editing (the LLaDA2.0 rule: committed tokens never change, so the draft stays) and
with editing at several thresholds. Reports GSM8K-style accuracy and the fraction of answers restored
token for token, plus the accuracy of ordinary decoding from masks with and without editing.

  benchmarks/edit_repair.py --model CKPT_OR_HF_DIR --tokenizer HF_DIR --data test.jsonl
"""

import argparse
import json
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megadiff.inference import (
    DecodingOptions,
    decode_tokens,
    encode_chat,
    encode_prompt,
    generate,
    load_model,
    load_tokenizer,
    special_token_ids,
)
from megadiff.inference.gsm8k import answers_match, extract_answer, gold_answer, read_gsm8k_rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--limit", type=int, default=100)
    p.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.25])
    p.add_argument("--editing-thresholds", type=float, nargs="+", default=[0.5, 0.7, 0.9])
    p.add_argument("--gen-length", type=int, default=32)
    p.add_argument("--block-length", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-from-masks", action="store_true", help="only the corrupted-draft cases")
    args = p.parse_args(argv)

    tokenizer = load_tokenizer(args.tokenizer)
    model = load_model(args.model)
    mask_id, eos_id = special_token_ids(model, tokenizer, None, None)
    rows = read_gsm8k_rows(args.data)[: args.limit]
    specials = set(tokenizer.all_special_ids) | {mask_id, eos_id}
    prompts, answers, golds = [], [], []
    for row in rows:
        prompt = encode_prompt(row["question"], tokenizer)
        full = encode_chat(
            [{"role": "user", "content": row["question"]}, {"role": "assistant", "content": row["answer"]}], tokenizer
        )
        assert full[: len(prompt)] == prompt, "the chat template does not extend the prompt"
        answer = []
        for t in full[len(prompt) :]:  # the content, up to the template's role-end token
            if t in specials:
                break
            answer.append(t)
        answer = answer[: args.gen_length - 1]
        prompts.append(prompt)
        answers.append(answer)
        golds.append(gold_answer(row["answer"]))
    ordinary = [t for t in range(len(tokenizer)) if t not in specials and t < model.config.vocab_size]
    rng = random.Random(args.seed)

    def score(tokens_list, name, result=None):
        correct = sum(
            answers_match(extract_answer(decode_tokens(t, tokenizer)), g)
            for t, g in zip(tokens_list, golds, strict=True)
        )
        restored = sum(t[: len(a)] == a for t, a in zip(tokens_list, answers, strict=True))
        out = {"case": name, "accuracy": correct / len(rows), "restored": restored / len(rows)}
        if result is not None:
            out.update(edits=result.num_edits, forward_passes=sum(result.forward_passes))
        print(json.dumps(out), flush=True)
        return out

    base = dict(gen_length=args.gen_length, block_length=args.block_length, steps=args.block_length)
    results = []
    for editing in [] if args.skip_from_masks else [None, *args.editing_thresholds]:
        options = DecodingOptions(**base, editing_threshold=editing)
        result = generate(model, prompts, options, mask_id, eos_id)
        results.append(score(result.tokens, f"from masks, editing {editing}", result))
    for fraction in args.fractions:
        drafts = []
        for answer in answers:
            draft = list(answer)
            for i in rng.sample(range(len(answer)), max(1, round(fraction * len(answer)))):
                draft[i] = rng.choice([t for t in ordinary if t != answer[i]])
            drafts.append(draft + [eos_id] * (args.gen_length - len(draft)))
        for editing in [None, *args.editing_thresholds]:
            options = DecodingOptions(**base, editing_threshold=editing)
            result = generate(model, prompts, options, mask_id, eos_id, drafts=drafts)
            results.append(score(result.tokens, f"corrupted {fraction:.0%}, editing {editing}", result))
    print(json.dumps({"rows": len(rows), "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
