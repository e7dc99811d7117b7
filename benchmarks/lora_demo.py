"""Does a tiny LLaDA2 learn the demo task with LoRA alone? Accuracy before and after, steps and time.

The demo's pipeline (tools/demo.py) with the base frozen: a random-init tiny LLaDA2, the synthetic
GSM8K-style task, accuracy of the base, block-diffusion SFT of LoRA adapters only (1 CPU process,
adapter-only checkpoints), the merged export (tools/convert_mcore_to_hf.py on the LoRA checkpoint:
W + alpha/r * B @ A), accuracy of the merged model. Several CPU minutes, not in CI:

    .venv/bin/python benchmarks/lora_demo.py [--out /tmp/lora_demo] [--steps 400] [--rank 32]
"""

import argparse
import json
import os
import shlex
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
DECODE = ["--gen-length", "32", "--block-length", "32", "--steps", "32", "--batch-size", "16"]


def run(*cmd, env=None):
    print("\n+ " + " ".join(shlex.quote(str(c)) for c in cmd), flush=True)
    full_env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1", **(env or {}))
    subprocess.run([str(c) for c in cmd], cwd=REPO, env=full_env, check=True)


def accuracy(eval_dir: str) -> float:
    with open(os.path.join(eval_dir, "summary.json")) as f:
        return json.load(f)["accuracy"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="/tmp/lora_demo", help="output directory (default: %(default)s)")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--alpha", type=float, default=64.0)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--experts", action="store_true", help="also adapt the routed experts")
    p.add_argument("--rows", type=int, default=2000)
    p.add_argument("--eval-limit", type=int, default=100)
    p.add_argument("--train-args", nargs="*", default=[], help="more training overrides (section.key=value)")
    args = p.parse_args(argv)
    out = os.path.abspath(args.out)
    if os.path.exists(out):
        raise SystemExit(f"lora_demo: {out} exists; remove it or pass another --out")
    os.makedirs(out)
    hf, data, ckpt, merged = f"{out}/tiny_hf", f"{out}/data", f"{out}/ckpt", f"{out}/merged_hf"
    run(PY, "tools/make_tiny_model.py", "--output", hf)
    run(PY, "tools/make_synthetic_data.py", "--output", f"{data}/all.jsonl", "--rows", args.rows)
    run(
        PY,
        "tools/build_gsm8k_dataset.py",
        "--input",
        f"{data}/all.jsonl",
        "--output-dir",
        data,
        "--test-fraction",
        "0.05",
    )
    evaluate = ["--data", f"{data}/test.jsonl", "--limit", args.eval_limit, *DECODE]
    run(PY, "tools/eval_gsm8k.py", "--model", hf, "--output-dir", f"{out}/eval_before", *evaluate)
    start = time.time()
    run(
        PY,
        "tools/train.py",
        "examples/configs/tiny_bd_sft.yaml",
        f"model.hf_dir={hf}",
        f"data.train_files={data}/train.jsonl",
        f"train.steps={args.steps}",
        f"train.lr={args.lr}",
        "parallel.ep=1",
        f"checkpoint.save_dir={ckpt}",
        "checkpoint.save_interval=0",
        f"logging.metrics_file={out}/metrics.jsonl",
        "logging.progress_bar=false",
        "lora.enabled=true",
        f"lora.rank={args.rank}",
        f"lora.alpha={args.alpha}",
        f"lora.experts={str(args.experts).lower()}",
        *args.train_args,
        env={"CUDA_VISIBLE_DEVICES": "", "MEGADIFF_DEVICE": "cpu"},
    )
    train_s = time.time() - start
    run(PY, "tools/convert_mcore_to_hf.py", "--mcore-dir", ckpt, "--output", merged)  # W + alpha/r * B @ A
    run(PY, "tools/eval_gsm8k.py", "--model", merged, "--output-dir", f"{out}/eval_after", *evaluate)
    records = [json.loads(line) for line in open(f"{out}/metrics.jsonl")]
    summary = {
        "steps": records[-1]["step"],
        "first_loss": records[0]["loss"],
        "final_loss": records[-1]["loss"],
        "accuracy_before": accuracy(f"{out}/eval_before"),
        "accuracy_after": accuracy(f"{out}/eval_after"),
        "eval_questions": args.eval_limit,
        "lora": {"rank": args.rank, "alpha": args.alpha, "experts": args.experts, "lr": args.lr},
        "train_s": round(train_s, 1),
        "checkpoint_bytes": sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(ckpt) for f in files),
    }
    with open(f"{out}/summary.json", "w") as f:
        json.dump(summary, f, indent=2)
    print(json.dumps(summary, indent=2))
    print(
        f"LoRA only: loss {summary['first_loss']:.3f} -> {summary['final_loss']:.3f} in {summary['steps']} steps "
        f"({train_s:.0f} s); accuracy {summary['accuracy_before']:.1%} before, {summary['accuracy_after']:.1%} after"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
