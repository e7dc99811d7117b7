"""megadiff end to end on a built-in tiny LLaDA2, CPU only, nothing downloaded (`make demo`).

  1. tiny LLaDA2 HF dir (tokenizer, chat template, config, remote code, random weights)
  2. synthetic GSM8K-style task -> train/test jsonl (messages and question/answer forms), and
     preference pairs for the DPO example (data/pairs.jsonl, examples/configs/tiny_dpo.yaml)
  3. HF -> megatron checkpoint
  4. accuracy of the untrained model
  5. block-diffusion SFT with packing, 2 CPU processes at EP=2 (examples/pretrain_llada2_sft.sh)
  6. last checkpoint -> HF
  7. accuracy of the trained model, and one chat answer
  8. OUT/loss.png and OUT/summary.json

Every step prints its command line, so it can be copied for a real model.

--family llada|lladamoe runs the same stages on a tiny model of that family, trained from its HF
dir with the family's own diffusion recipe (examples/configs/tiny_family_sft.yaml: LLaDA's
full-attention masked diffusion; the dense LLaDA trains data-parallel instead of at EP=2), with
the test questions as validation data (--rows >= 1000). --train-only stops after training (stages 1, 2, 5, 8).
"""

import argparse
import json
import os
import re
import resource
import shlex
import subprocess
import sys
import time

LAUNCHER = "examples/pretrain_llada2_sft.sh"
PY = sys.executable
CHAT_PROMPT = "Ann has 2 cups and gets 3 more. How many cups does Ann have?"
SFT_CONFIG = "examples/configs/tiny_bd_sft.yaml"
FAMILY_SFT_CONFIG = "examples/configs/tiny_family_sft.yaml"  # --family: the family's recipe
FAMILY_STEPS = 1500
# --family's default steps: tiny LLaDA scores 97% on the test questions after 1500 (29% after 600),
# tiny LLaDA-MoE 100% (76% after 600) on the 2-core CPU VM (README, "Other model families")
DPO_PAIRS = 256  # preference pairs for examples/configs/tiny_dpo.yaml (README, "Preference tuning")
# Python's warnings.formatwarning: `file:line: SomeWarning: message`, then (indented) the source line.
WARNING_LINE = re.compile(r"^\S.*:\d+: \w*Warning: ")


def without_warnings(lines):
    """A command's output lines without third-party warnings: each warning's first line and the
    indented source lines Python prints under it (`  warnings.warn(`), so no fragment is left."""
    in_warning = False
    for line in lines:
        if WARNING_LINE.match(line):
            in_warning = True
            continue
        if in_warning and line[:1] in (" ", "\t") and line.strip():
            continue
        in_warning = False
        yield line


def checkout_dir() -> str:
    """The megadiff checkout the demo runs in (it uses tools/ and examples/): this file's
    (megadiff/cli/demo.py), or the current directory for `megadiff-demo` from a non-editable install."""
    for d in (os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), os.getcwd()):
        if os.path.isfile(os.path.join(d, LAUNCHER)):
            return d
    raise SystemExit(f"demo: needs a checkout of megadiff ({LAUNCHER} not found); run it from one")


def children_cpu_s() -> float:
    """CPU seconds (user + sys) of every finished child process so far, torchrun's workers included."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run(cmd, env=None, log=None, stages=None):
    """Print the command, run it from the repo root, fail loudly; tee output to `log`; append its
    wall and CPU seconds to `stages`."""
    print("\n+ " + " ".join(shlex.quote(str(c)) for c in cmd), flush=True)
    wall0, cpu0 = time.time(), children_cpu_s()
    full_env = dict(os.environ, **(env or {}))
    proc = subprocess.Popen(
        [str(c) for c in cmd],
        cwd=checkout_dir(),
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
    )
    lines = []
    for line in without_warnings(proc.stdout):  # third-party deprecation noise
        sys.stdout.write(line)
        lines.append(line)
    if proc.wait() != 0:
        raise SystemExit(f"demo: step failed (exit {proc.returncode}): {' '.join(map(str, cmd))}")
    if log:
        with open(log, "w") as f:
            f.writelines(lines)
    if stages is not None:
        stages.append(
            {
                "command": os.path.basename(str(cmd[0] if cmd[0] != PY else cmd[1])),
                "wall_s": round(time.time() - wall0, 1),
                "cpu_s": round(children_cpu_s() - cpu0, 1),
            }
        )
    return "".join(lines)


def config_warmup_steps(config: str = SFT_CONFIG) -> int:
    import yaml

    with open(os.path.join(checkout_dir(), config)) as f:
        return int(yaml.safe_load(f)["train"].get("warmup_steps", 0))


def accuracy_of(eval_dir):
    with open(os.path.join(eval_dir, "summary.json")) as f:
        return json.load(f)["accuracy"]


def plot_losses(metrics_file, png, title="tiny LLaDA2, block-diffusion SFT (CPU, EP=2)"):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in (json.loads(line) for line in open(metrics_file)) if "loss" in r]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in records], [r["loss"] for r in records], lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("masked-diffusion loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    return records


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default="demo_out", help="output directory (default: %(default)s)")
    p.add_argument(
        "--steps", type=int, default=None, help="training steps (default: 600; with --family llada|lladamoe 1500)"
    )
    p.add_argument("--rows", type=int, default=2000, help="synthetic problems (default: %(default)s)")
    p.add_argument("--eval-limit", type=int, default=100, help="test questions to score (default: %(default)s)")
    p.add_argument("--family", default="llada2", help="model family: llada2 (default), llada, lladamoe")
    p.add_argument("--train-only", action="store_true", help="stop after training (no conversion, scoring, chat)")
    args = p.parse_args(argv)
    family = args.family
    if family not in ("llada2", "llada", "lladamoe"):
        raise SystemExit(f"demo: --family {family}: expected llada2, llada or lladamoe")
    if args.steps is None:  # LLaDA's recipe (t down to 1e-3, 1/t weights) needs more steps on this task
        args.steps = 600 if family == "llada2" else FAMILY_STEPS
    checkout_dir()  # before anything is written
    out = os.path.abspath(args.output)
    if os.path.exists(out):
        raise SystemExit(f"demo: {out} exists; run `make demo-clean` (or pass another --output) first")
    os.makedirs(out)
    start = time.time()
    stages = []  # one entry per command: what it cost

    def run_stage(cmd, **kwargs):
        return run(cmd, stages=stages, **kwargs)

    hf, data = f"{out}/tiny_hf", f"{out}/data"
    mcore_init, ckpt, trained = f"{out}/mcore_init", f"{out}/ckpt", f"{out}/trained_hf"
    metrics = f"{out}/metrics.jsonl"
    decode = ["--gen-length", "32", "--block-length", "32", "--steps", "32", "--batch-size", "16"]

    if family == "llada2":
        print("== 1. a tiny LLaDA2 model directory", flush=True)
        run_stage([PY, "tools/make_tiny_model.py", "--output", hf, "--layers", "2"])
    else:
        print(f"== 1. a tiny {family} model directory", flush=True)
        run_stage([PY, "tools/make_tiny_model.py", "--family", family, "--output", hf])
    print("== 2. a synthetic GSM8K-style task", flush=True)
    run_stage([PY, "tools/make_synthetic_data.py", "--output", f"{data}/gsm8k_synthetic.jsonl", "--rows", args.rows])
    run_stage(  # preference pairs for the README's DPO example (examples/configs/tiny_dpo.yaml)
        [PY, "tools/make_synthetic_data.py", "--preference", "--output", f"{data}/pairs.jsonl", "--rows", DPO_PAIRS]
    )
    run_stage(
        [
            PY,
            "tools/build_gsm8k_dataset.py",
            "--input",
            f"{data}/gsm8k_synthetic.jsonl",
            "--output-dir",
            data,
            "--test-fraction",
            "0.05",
        ]
    )
    eval_args = ["--data", f"{data}/test.jsonl", "--limit", args.eval_limit, *decode]
    if family == "llada2":
        print("== 3. HF -> megatron checkpoint", flush=True)
        run_stage([PY, "tools/convert_hf_to_mcore.py", "--hf-dir", hf, "--output", mcore_init, "--ep", "2"])
    if not args.train_only:
        print("== 4. accuracy before training", flush=True)
        run_stage([PY, "tools/eval_gsm8k.py", "--model", hf, "--output-dir", f"{out}/eval_before", *eval_args])
    train_log = f"{out}/train.log"
    if family == "llada2":
        print("== 5. block-diffusion SFT with packing on 2 CPU processes (EP=2)", flush=True)
        config, start_from = SFT_CONFIG, [f"model.init_from_mcore={mcore_init}"]
    else:  # from the HF dir, with the family's recipe; the test questions as validation data
        dense = family == "llada"
        print(f"== 5. {family} SFT (its recipe) with packing on 2 CPU processes ({'DP=2' if dense else 'EP=2'})")
        config = FAMILY_SFT_CONFIG
        start_from = ["parallel.ep=1"] if dense else []
        if args.rows >= 1000:  # a smaller run's test split packs into fewer rows than a global batch
            start_from += [f"data.valid_files={data}/test.jsonl", f"train.eval_interval={max(args.steps // 6, 1)}"]
    run_stage(
        [
            LAUNCHER,
            config,
            f"model.hf_dir={hf}",
            *start_from,
            f"data.train_files={data}/train.jsonl",
            f"train.steps={args.steps}",
            f"train.warmup_steps={min(args.steps, config_warmup_steps(config))}",  # a short --steps run keeps warmup <= steps
            f"checkpoint.save_dir={ckpt}",
            f"logging.metrics_file={metrics}",
            "logging.progress_bar=false",
        ],
        env={"GPUS_PER_NODE": "2", "PYTHON": PY},
        log=train_log,
    )
    if args.train_only:
        records = plot_losses(metrics, f"{out}/loss.png", f"tiny {family} SFT (CPU, 2 processes)")
        summary = {
            "family": family,
            "steps": records[-1]["step"],
            "first_loss": records[0]["loss"],
            "final_loss": records[-1]["loss"],
            "wall_time_s": round(time.time() - start, 1),
            "stages": stages,
        }
        with open(f"{out}/summary.json", "w") as f:
            json.dump(summary, f, indent=2)
        print(
            f"\nloss {summary['first_loss']:.3f} -> {summary['final_loss']:.3f} in {summary['steps']} steps (train only)"
        )
        return 0
    print("== 6. megatron checkpoint -> HF", flush=True)
    run_stage([PY, "tools/convert_mcore_to_hf.py", "--mcore-dir", ckpt, "--output", trained])
    print("== 7. accuracy after training, and a chat answer", flush=True)
    run_stage([PY, "tools/eval_gsm8k.py", "--model", trained, "--output-dir", f"{out}/eval_after", *eval_args])
    run_stage(
        [
            PY,
            "tools/generate.py",
            "--model",
            trained,
            "--prompt",
            CHAT_PROMPT,
            *decode[:6],
            "--output",
            f"{out}/chat.jsonl",
        ]
    )

    print("== 8. loss curve and summary", flush=True)
    title = None if family == "llada2" else f"tiny {family} SFT (CPU, 2 processes)"
    records = plot_losses(metrics, f"{out}/loss.png", *([title] if title else []))
    answer = json.loads(open(f"{out}/chat.jsonl").readline())
    summary = {
        **({} if family == "llada2" else {"family": family}),
        "steps": records[-1]["step"],
        "first_loss": records[0]["loss"],
        "final_loss": records[-1]["loss"],
        "accuracy_before": accuracy_of(f"{out}/eval_before"),
        "accuracy_after": accuracy_of(f"{out}/eval_after"),
        "eval_questions": args.eval_limit,
        "chat_prompt": CHAT_PROMPT,
        "chat_answer": answer.get("text"),
        "layout": {"tp": 1, "ep": 1 if family == "llada" else 2, "pp": 1, "processes": 2},
        "wall_time_s": round(time.time() - start, 1),
        # user + sys of this process and every command: the wall time a quiet machine needs is
        # about this over the cores the commands keep busy (training: 2, the rest: 1)
        "cpu_time_s": round(children_cpu_s() + sum(resource.getrusage(resource.RUSAGE_SELF)[:2]), 1),
        "stages": stages,
    }
    with open(f"{out}/summary.json", "w") as f:
        json.dump(summary, f, indent=2)
    print(f"chat: {CHAT_PROMPT!r} -> {summary['chat_answer']!r}", flush=True)
    print(
        f"\nloss {summary['first_loss']:.3f} -> {summary['final_loss']:.3f} in {summary['steps']} steps; "
        f"accuracy {summary['accuracy_before']:.1%} before, {summary['accuracy_after']:.1%} after training "
        f"({summary['wall_time_s']:.0f} s wall, {summary['cpu_time_s']:.0f} CPU-s)"
    )
    print(f"demo outputs in {out} (summary.json, loss.png, trained_hf/)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
