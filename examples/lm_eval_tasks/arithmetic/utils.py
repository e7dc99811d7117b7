"""Scoring and choices of the demo's arithmetic tasks (lm-eval loads this file by path, `!function`)."""

import re

from megadiff.inference.gsm8k import answers_match, extract_answer, gold_answer

# The demo's answers (megadiff.data.synthetic): "a + b = c\n#### c" or "a - b = c\n#### c".
ANSWER = re.compile(r"(\d+) ([+-]) (\d+) = (\d+)\n#### (\d+)")
CHOICES = 4


def process_results(doc, results):
    """exact_match as tools/eval_gsm8k.py scores a row (megadiff.inference.gsm8k)."""
    return {"exact_match": float(answers_match(extract_answer(results[0]), gold_answer(doc["answer"])))}


def _answer_parts(doc):
    match = ANSWER.fullmatch(doc["answer"])
    if match is None:
        raise ValueError(f"answer {doc['answer']!r} is not in the demo's 'a + b = c\\n#### c' form")
    a, op, b, c, _ = match.groups()
    return a, op, b, int(c)


def _candidates(c):
    """c and its CHOICES - 1 nearest non-negative neighbours (c-1, c+1, c-2, ...), ascending."""
    near = [c + sign * d for d in range(1, CHOICES + 1) for sign in (-1, 1) if c + sign * d >= 0]
    return sorted([c] + near[: CHOICES - 1])


def answer_choices(doc):
    a, op, b, c = _answer_parts(doc)
    return [f"{a} {op} {b} = {v}\n#### {v}" for v in _candidates(c)]


def answer_index(doc):
    c = _answer_parts(doc)[3]
    return _candidates(c).index(c)
