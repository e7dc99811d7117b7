"""A synthetic preference task for the tiny model: the same arithmetic prompts answered in two styles.

chosen:   "The answer is 7."  (a sentence)
rejected: "7"                 (the bare number)
Both answers are right, so only the style is preferred: after DPO, greedy answers should start with
"The answer is" more often. `style_sft_rows` gives both styles as SFT rows (the starting point)."""

from megadiff.data.synthetic import arithmetic_problems

CHOSEN_PREFIX = "The answer is"


def _result(row: dict) -> str:
    return row["answer"].rsplit("#### ", 1)[1]


def style_pairs(n: int, seed: int = 0) -> list[dict]:
    """n preference rows in TRL's conversational format (every other one in the plain-string form)."""
    out = []
    for i, row in enumerate(arithmetic_problems(n, seed)):
        chosen, rejected = f"{CHOSEN_PREFIX} {_result(row)}.", _result(row)
        if i % 2:
            out.append({"prompt": row["question"], "chosen": chosen, "rejected": rejected})
        else:
            out.append(
                {
                    "prompt": [{"role": "user", "content": row["question"]}],
                    "chosen": [{"role": "assistant", "content": chosen}],
                    "rejected": [{"role": "assistant", "content": rejected}],
                }
            )
    return out


def style_sft_rows(n: int, seed: int = 0) -> list[dict]:
    """n SFT rows answering in either style (alternating), so an SFT'd model uses both."""
    rows = []
    for i, row in enumerate(arithmetic_problems(n, seed)):
        answer = f"{CHOSEN_PREFIX} {_result(row)}." if i % 2 else _result(row)
        rows.append(
            {"messages": [{"role": "user", "content": row["question"]}, {"role": "assistant", "content": answer}]}
        )
    return rows
