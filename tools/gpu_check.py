#!/usr/bin/env python3
"""`make gpu-check`: prove megadiff's GPU path on one CUDA GPU in a few minutes.

  1. an environment report (Python, torch, CUDA, GPU, megatron-core, Transformer Engine, apex, flex)
  2. `pytest tests/gpu` (logits parity fp32/bf16, a trainer step on CUDA+NCCL, compiled flex vs
     dense, generate CUDA == CPU)
  3. a tiny end to end on CUDA: tiny HF model -> mcore checkpoint -> 20 block-diffusion SFT steps
     (1 GPU, bf16, flex attention) -> HF -> generate
and writes OUTPUT/gpu_check.json (plus OUTPUT/pytest.log, OUTPUT/e2e.log); models and checkpoints
go to --workdir. Exit 0 only when every part passed. Without CUDA it refuses (exit 2). Every
command gets what is left of --budget-s (default 8 minutes) and is killed when that runs out, so
a hang costs a lent GPU machine no more than the budget; the report then names the stage.

Runs with whatever python has torch + megatron-core (no `make setup` venv needed):
  python3 tools/gpu_check.py --output gpu_check_out
"""

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = "Ann has 2 cups and gets 3 more. How many cups does Ann have?"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default="gpu_check_out", help="report dir: gpu_check.json, pytest.log, e2e.log")
    p.add_argument("--workdir", default=None, help="models and checkpoints (default: OUTPUT/work)")
    p.add_argument("--steps", type=int, default=20, help="SFT steps of the end to end (default: %(default)s)")
    p.add_argument("--skip-tests", action="store_true", help="do not run pytest tests/gpu")
    p.add_argument(
        "--benchmark",
        action="store_true",
        help="also run benchmarks/gpu_step.py (tokens/s, TFLOP/s, MFU; not part of PASS/FAIL)",
    )
    p.add_argument(
        "--budget-s",
        type=float,
        default=480.0,
        help="wall-clock budget of the whole check; a command still running at its end is killed "
        "(default: %(default)s)",
    )
    return p.parse_args(argv)


def refuse_without_cuda():
    """Exit 2 with one clear line where torch sees no CUDA device (checked before anything else)."""
    import torch

    if not torch.cuda.is_available():
        print(
            f"gpu_check: torch {torch.__version__} sees no CUDA device (torch.version.cuda="
            f"{torch.version.cuda}, CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')!r}); "
            f"run it on a GPU node (README, 'GPU check'). CPU checks: make test",
            file=sys.stderr,
        )
        raise SystemExit(2) from None
    try:
        import megatron.core  # noqa: F401
    except ImportError as e:
        print(
            f"gpu_check: megatron-core is not importable ({e}); pip install megatron-core, or install the "
            f"wheels of `make gpu-wheels` (README, 'GPU check')",
            file=sys.stderr,
        )
        raise SystemExit(2) from None


def _version(dist):
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def environment_report() -> dict:
    import torch

    from megadiff.platform.kernels import kernel_report

    props = torch.cuda.get_device_properties(0)
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401

        flex = True
    except ImportError:
        flex = False
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "gpus": torch.cuda.device_count(),
        "gpu": props.name,
        "gpu_memory_gib": round(props.total_memory / 2**30, 1),
        "compute_capability": f"{props.major}.{props.minor}",
        "megatron_core": _version("megatron-core"),
        "transformer_engine": _version("transformer_engine") or _version("transformer-engine"),
        "apex": _version("apex"),
        "transformers": _version("transformers"),
        "triton": _version("triton"),
        "flex_attention": flex,
        **kernel_report(),
    }


def child_env() -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONWARNINGS="ignore")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))
    env.pop("MEGADIFF_DEVICE", None)  # the run device follows CUDA
    return env


DEADLINE = [float("inf")]  # time.monotonic() at which every command still running is killed


def run(cmd, log, env=None) -> dict:
    """Run one command from the repo root, print it and its output, append both to `log`; kill it
    (and its children: own process group) at the deadline."""
    line = "+ " + " ".join(shlex.quote(str(c)) for c in cmd)
    print(line, flush=True)
    start = time.perf_counter()
    left = DEADLINE[0] - time.monotonic()
    if left <= 0:
        return {"command": line[2:], "rc": None, "seconds": 0.0, "timed_out": True}
    proc = subprocess.Popen(
        [str(c) for c in cmd],
        cwd=REPO,
        env=env or child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
        start_new_session=True,
    )
    expired = threading.Event()

    def kill():
        expired.set()
        try:
            os.killpg(proc.pid, 9)
        except ProcessLookupError:  # it ended just now
            pass

    timer = threading.Timer(left, kill)
    timer.start()
    try:
        with open(log, "a") as f:
            f.write(line + "\n")
            for out in proc.stdout:
                sys.stdout.write(out)
                f.write(out)
        rc = proc.wait()
    finally:
        timer.cancel()
    result = {"command": line[2:], "rc": rc, "seconds": round(time.perf_counter() - start, 1)}
    if expired.is_set():
        print(f"gpu_check: killed at the end of the budget (--budget-s): {line[2:]}", flush=True)
        result["timed_out"] = True
    return result


def run_gpu_tests(out_dir, work) -> dict:
    junit = os.path.join(work, "junit.xml")
    result = run(
        [sys.executable, "-m", "pytest", "tests/gpu", "-q", "-rs", "-p", "no:cacheprovider", "--junitxml", junit],
        os.path.join(out_dir, "pytest.log"),
    )
    if os.path.isfile(junit):
        suite = ET.parse(junit).getroot()
        suite = suite.find("testsuite") if suite.tag == "testsuites" else suite
        result.update({k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")})
    result["ok"] = result["rc"] == 0 and result.get("tests", 0) > result.get("skipped", 0)
    return result


def run_benchmark(out_dir, work) -> dict:
    """benchmarks/gpu_step.py's numbers (its log: benchmark.log); informative, not a check."""
    path = os.path.join(work, "gpu_step.json")
    result = run(
        [sys.executable, "benchmarks/gpu_step.py", "--out", path], os.path.join(out_dir, "benchmark.log"), child_env()
    )
    if result["rc"] == 0 and os.path.isfile(path):
        with open(path) as f:
            result["results"] = json.load(f)
    return result


def run_end_to_end(out_dir, work, steps) -> dict:
    py, log = sys.executable, os.path.join(out_dir, "e2e.log")
    hf, data, init = f"{work}/tiny_hf", f"{work}/data", f"{work}/mcore_init"
    ckpt, trained, metrics = f"{work}/ckpt", f"{work}/trained_hf", f"{work}/metrics.jsonl"
    chat = f"{work}/chat.jsonl"
    stages = [
        ("tiny_model", [py, "tools/make_tiny_model.py", "--output", hf, "--overwrite"]),
        ("data", [py, "tools/make_synthetic_data.py", "--output", f"{data}/synthetic.jsonl", "--rows", "400"]),
        (
            "sft_rows",
            [
                py,
                "tools/build_gsm8k_dataset.py",
                "--input",
                f"{data}/synthetic.jsonl",
                "--output-dir",
                data,
                "--test-fraction",
                "0.05",
            ],
        ),
        (
            "hf_to_mcore",
            [
                py,
                "tools/convert_hf_to_mcore.py",
                "--hf-dir",
                hf,
                "--output",
                init,
                "--dtype",
                "bf16",
                "--overwrite",
                "--no-progress",
            ],
        ),
        (
            "train",
            [
                py,
                "-m",
                "torch.distributed.run",
                "--nproc-per-node",
                "1",
                "--master-port",
                "29517",
                "tools/train.py",
                "examples/configs/tiny_bd_sft.yaml",
                f"model.hf_dir={hf}",
                f"model.init_from_mcore={init}",
                "model.dtype=bf16",
                "model.attention_backend=flex",
                f"data.train_files={data}/train.jsonl",
                "parallel.ep=1",
                f"train.steps={steps}",
                "train.warmup_steps=2",
                f"checkpoint.save_dir={ckpt}",
                "checkpoint.save_interval=0",
                f"logging.metrics_file={metrics}",
                "logging.progress_bar=false",
            ],
        ),
        (
            "mcore_to_hf",
            [
                py,
                "tools/convert_mcore_to_hf.py",
                "--mcore-dir",
                ckpt,
                "--output",
                trained,
                "--overwrite",
                "--no-progress",
            ],
        ),
        (
            "generate",
            [
                py,
                "tools/generate.py",
                "--model",
                trained,
                "--device",
                "cuda",
                "--prompt",
                PROMPT,
                "--gen-length",
                "32",
                "--block-length",
                "32",
                "--steps",
                "32",
                "--output",
                chat,
            ],
        ),
    ]
    result = {"stages": {}}
    for name, cmd in stages:
        result["stages"][name] = stage = run(cmd, log)
        if stage["rc"] != 0:
            result["failed_stage"] = name
            break
    if os.path.isfile(metrics):
        records = [json.loads(line) for line in open(metrics) if line.strip()]
        if records:
            result.update(
                steps=records[-1]["step"],
                first_loss=records[0]["loss"],
                final_loss=records[-1]["loss"],
                tokens_per_s_last=records[-1]["tokens_per_s"],
            )
    if os.path.isfile(chat):
        answer = json.loads(open(chat).readline())
        result.update(prompt=PROMPT, generated_ids=answer.get("generated_ids"), generated_text=answer.get("text"))
    result["ok"] = "failed_stage" not in result and result.get("steps") == steps and bool(result.get("generated_ids"))
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    refuse_without_cuda()
    sys.path.insert(0, REPO)
    out_dir = os.path.abspath(args.output)
    work = os.path.abspath(args.workdir or os.path.join(out_dir, "work"))
    os.makedirs(out_dir, exist_ok=True)
    os.makedirs(work, exist_ok=True)
    for name in ("pytest.log", "e2e.log"):
        open(os.path.join(out_dir, name), "w").close()
    start = time.perf_counter()
    DEADLINE[0] = time.monotonic() + args.budget_s
    report = {"budget_s": args.budget_s, "environment": environment_report()}
    print("== environment\n" + json.dumps(report["environment"], indent=1), flush=True)
    if not args.skip_tests:
        print("== pytest tests/gpu", flush=True)
        report["tests"] = run_gpu_tests(out_dir, work)
    print("== end to end on CUDA", flush=True)
    report["end_to_end"] = run_end_to_end(out_dir, work, args.steps)
    report["ok"] = report["end_to_end"]["ok"] and report.get("tests", {"ok": True})["ok"]
    if args.benchmark:
        print("== benchmarks/gpu_step.py", flush=True)
        report["benchmark"] = run_benchmark(out_dir, work)
    report["wall_time_s"] = round(time.perf_counter() - start, 1)
    path = os.path.join(out_dir, "gpu_check.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
    e2e = report["end_to_end"]
    print(
        f"\ngpu_check: {'PASS' if report['ok'] else 'FAIL'} in {report['wall_time_s']:.0f} s; tests "
        f"{report.get('tests', {}).get('rc', 'skipped')}, end to end "
        f"{'ok' if e2e['ok'] else 'failed at ' + e2e.get('failed_stage', 'checks')}, "
        f"loss {e2e.get('first_loss')} -> {e2e.get('final_loss')}; report: {path}"
    )
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
