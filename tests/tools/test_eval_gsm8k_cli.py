"""tools/eval_gsm8k.py end to end on a tiny random model dir and three GSM8K rows."""

import importlib.util
import json
import os
import subprocess
import sys

from megadiff.hf.tiny import write_tiny_model_dir
from megadiff.inference import DecodingOptions, decode_tokens, encode_prompt, generate, load_model, load_tokenizer
from megadiff.inference.gsm8k import extract_answer
from tests.dist.launch import worker_env

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENV = worker_env()  # one thread, CPU only, as tests/conftest.py pins in-process
QUESTIONS = [
    "What is 1 + 2?",
    "Natalia sold 48 clips in April and half as many in May. How many in total?",
    "Weng earns $12 an hour. How much for 50 minutes?",
]


def test_eval_gsm8k_cli_scores_three_rows_and_writes_results(tmp_path):
    model_dir = write_tiny_model_dir(str(tmp_path / "model"), seed=0)
    tokenizer, model = load_tokenizer(model_dir), load_model(model_dir)
    outputs = generate(
        model,
        [encode_prompt(q, tokenizer) for q in QUESTIONS],
        DecodingOptions(gen_length=32, block_length=16, steps=8),
        tokenizer.convert_tokens_to_ids("<|mask|>"),
        tokenizer.eos_token_id,
    ).tokens
    predictions = [extract_answer(decode_tokens(t, tokenizer)) for t in outputs]
    right = next(i for i, p in enumerate(predictions) if p is not None)  # the random model wrote a number
    golds = [predictions[i] if i == right else "987654" for i in range(3)]
    data = tmp_path / "test.jsonl"
    data.write_text(
        "".join(
            json.dumps({"question": q, "answer": f"work\n#### {g}"}) + "\n"
            for q, g in zip(QUESTIONS, golds, strict=True)
        )
    )
    data_with_extra = tmp_path / "more.jsonl"
    data_with_extra.write_text(data.read_text() + json.dumps({"question": "x", "answer": "#### 1"}) + "\n")

    out_dir = tmp_path / "eval"
    proc = subprocess.run(
        [
            sys.executable,
            "tools/eval_gsm8k.py",
            "--model",
            model_dir,
            "--data",
            str(data_with_extra),
            "--limit",
            "3",
            "--output-dir",
            str(out_dir),
            "--gen-length",
            "32",
            "--block-length",
            "16",
            "--steps",
            "8",
            "--batch-size",
            "2",
            "--device",
            "cpu",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env=ENV,
    )
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out_dir / "summary.json").read_text())
    assert (summary["correct"], summary["total"]) == (1, 3) and abs(summary["accuracy"] - 1 / 3) < 1e-12
    samples = [json.loads(line) for line in (out_dir / "samples.jsonl").read_text().splitlines()]
    assert [s["prediction"] for s in samples] == predictions
    assert [s["correct"] for s in samples] == [i == right for i in range(3)]
    assert [s["gold"] for s in samples] == golds
    assert "accuracy: 0.3333 (1/3)" in proc.stdout.strip().splitlines()[-1]


def test_eval_gsm8k_cli_refuses_rows_without_a_final_answer(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("eval_gsm8k_tool", os.path.join(REPO, "tools", "eval_gsm8k.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"question": "q", "answer": "no mark"}) + "\n")
    assert (
        tool.main(["--model", str(tmp_path / "missing"), "--data", str(data), "--output-dir", str(tmp_path / "o")]) == 2
    )
    assert "bad.jsonl:1: answer has no '####" in capsys.readouterr().err
