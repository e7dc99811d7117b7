"""A synthetic GSM8K-style task a tiny model can learn on a CPU in minutes.

Each problem is one short word problem over numbers 1..MAX_OPERAND whose answer is a single
addition or subtraction (so 2 * MAX_OPERAND**2 distinct sums: small enough for a 4-layer, 64-wide
model to learn in a few hundred CPU steps), written with GSM8K's `#### <answer>` ending, e.g.
  question: "Tom has 3 apples and gets 4 more. How many apples does Tom have?"
  answer:   "3 + 4 = 7\n#### 7"
"""

import random

NAMES = ["Tom", "Ann", "Bob", "Eve", "Sam", "Mia"]
ITEMS = ["apples", "books", "cats", "pens", "cups"]
MAX_OPERAND = 5


def arithmetic_problem(rng: random.Random) -> dict[str, str]:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b = rng.randint(1, MAX_OPERAND), rng.randint(1, MAX_OPERAND)
    if rng.random() < 0.5:
        question = f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have?"
        answer = f"{a} + {b} = {a + b}\n#### {a + b}"
    else:
        a, b = max(a, b), min(a, b)
        question = f"{name} has {a} {item} and gives away {b}. How many {item} does {name} have?"
        answer = f"{a} - {b} = {a - b}\n#### {a - b}"
    return {"question": question, "answer": answer}


def arithmetic_problems(n: int, seed: int = 0) -> list[dict[str, str]]:
    rng = random.Random(seed)
    return [arithmetic_problem(rng) for _ in range(n)]


def as_messages(row: dict[str, str]) -> dict:
    return {"messages": [{"role": "user", "content": row["question"]}, {"role": "assistant", "content": row["answer"]}]}
