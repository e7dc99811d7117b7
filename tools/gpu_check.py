#!/usr/bin/env python3
"""`make gpu-check`: prove megadiff's GPU path on one CUDA GPU, and measure it, in 8 minutes.

Phases, each with its own wall-clock budget (a command still running at the end of its phase's
budget, or of the whole --budget-s, is killed with every process it started):
  1. environment: Python, torch, CUDA, GPU, megatron-core, Transformer Engine, apex, flex, nvidia-smi
  2. tests: `pytest tests/gpu` (logits and the loss in fp32 and bf16 with per-dtype tolerances,
     trainer steps on CUDA+NCCL, compiled flex vs dense in fp32 and bf16, generate CUDA == CPU);
     every test is cut at --test-timeout-s (the torchrun launcher's watchdog, and pytest-timeout
     where it is installed)
  3. end_to_end: tiny HF model -> mcore checkpoint -> --steps block-diffusion SFT steps (1 GPU,
     bf16, flex attention) -> HF -> generate; passes only if the loss went down
  4. benchmark: benchmarks/gpu_step.py --no-reference at LLaDA2-mini's expert shape, grouped vs
     sequential experts, with the GPU's utilisation sampled by nvidia-smi during each variant's
     timed steps (well below 100% with many small kernels: the step is bound by their launches)
OUTPUT/gpu_check.json is rewritten after every phase (a killed check still leaves what it did);
logs: OUTPUT/pytest.log, e2e.log, benchmark.log; models and checkpoints go to --workdir. Exit 0
only when the tests and the end to end passed (the benchmark informs). Without torch, CUDA or
megatron-core it refuses with one line and exit 2, before it writes anything.

Runs with whatever python has torch + megatron-core (`make gpu-check` takes the `make setup` venv's
when there is one):
  python3 tools/gpu_check.py --output gpu_check_out
"""

import argparse
import importlib.util
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Not a thin console script like the other tools: it runs this checkout's tests on a bare GPU machine, with
# whatever python has torch + megatron-core and megadiff perhaps not installed, so the checkout goes first.
sys.path.insert(0, REPO)
PROMPT = "Ann has 2 cups and gets 3 more. How many cups does Ann have?"
BUDGETS = {"tests": 200.0, "end_to_end": 150.0, "benchmark": 100.0}  # seconds; with the environment: 465 of 480
ENVIRONMENT_BUDGET_S = 15.0
EXPERTS = ("grouped", "sequential")  # perf.moe_experts values the benchmark compares


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default="gpu_check_out", help="report dir: gpu_check.json and the logs")
    p.add_argument("--workdir", default=None, help="models and checkpoints (default: OUTPUT/work)")
    p.add_argument("--steps", type=int, default=20, help="SFT steps of the end to end (default: %(default)s)")
    p.add_argument("--skip-tests", action="store_true", help="do not run pytest tests/gpu")
    p.add_argument("--no-benchmark", action="store_true", help="skip the benchmark phase")
    p.add_argument("--benchmark", action="store_true", help=argparse.SUPPRESS)  # the default now; kept for old commands
    p.add_argument(
        "--budget-s",
        type=float,
        default=480.0,
        help="wall-clock budget of the whole check; nothing runs past it (default: %(default)s)",
    )
    for phase, seconds in BUDGETS.items():
        p.add_argument(
            f"--{phase.replace('_', '-')}-budget-s",
            type=float,
            default=seconds,
            help=f"budget of the {phase} phase (default: %(default)s)",
        )
    p.add_argument("--test-timeout-s", type=float, default=120.0, help="per test (default: %(default)s)")
    return p.parse_args(argv)


# ---- refusals: one line, exit 2, nothing written ---------------------------------------------


def refuse(message: str):
    print(f"gpu_check: {message}", file=sys.stderr)
    raise SystemExit(2)


def refuse_without_cuda():
    """Exit 2 with one clear line where torch, a CUDA device or megatron-core is missing (checked
    before anything else is done or written)."""
    if importlib.util.find_spec("torch") is None:
        refuse(
            f"{sys.executable} has no torch; run it with a python that has torch and megatron-core "
            f"(README, 'GPU check'). CPU checks: make test"
        )
    try:
        import torch
    except Exception as e:  # a broken install: say so in one line
        refuse(f"torch does not import in {sys.executable} ({type(e).__name__}: {e})")
    if not torch.cuda.is_available():
        refuse(
            f"torch {torch.__version__} sees no CUDA device (torch.version.cuda={torch.version.cuda}, "
            f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')!r}); "
            f"run it on a GPU node (README, 'GPU check'). CPU checks: make test"
        )
    try:
        import megatron.core  # noqa: F401
    except ImportError as e:
        refuse(
            f"megatron-core is not importable ({e}); pip install megatron-core, or install the "
            f"wheels of `make gpu-wheels` (README, 'GPU check')"
        )


# ---- the report ------------------------------------------------------------------------------


def write_report(out_dir: str, report: dict) -> str:
    """gpu_check.json, replaced atomically: a reader (or a kill) never sees half a file."""
    path = os.path.join(out_dir, "gpu_check.json")
    with open(path + ".tmp", "w") as f:
        json.dump(report, f, indent=2)
    os.replace(path + ".tmp", path)
    return path


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
        "pytest_timeout": _version("pytest-timeout"),
        "nvidia_smi": shutil.which("nvidia-smi"),
        "grouped_mm": hasattr(torch, "_grouped_mm"),
        "flex_attention": flex,
        **kernel_report(),
    }


# ---- running commands under a deadline -------------------------------------------------------


def child_env(**extra) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONWARNINGS="ignore", **extra)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))
    env.pop("MEGADIFF_DEVICE", None)  # the run device follows CUDA
    return env


DEADLINE = [float("inf")]  # time.monotonic() at which every command still running is killed


def run(cmd, log, env=None) -> dict:
    """Run one command from the repo root, print it and its output, append both to `log`; at the
    deadline kill it and every process it started (torchrun's workers have sessions of their own)."""
    from megadiff.platform.child_processes import kill_process_tree

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
        kill_process_tree(proc.pid)

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
        print(f"gpu_check: killed at the end of the budget: {line[2:]}", flush=True)
        result["timed_out"] = True
    return result


class Phase:
    """`with Phase(report, "tests", budget, out_dir) as phase:` sets the deadline to this phase's
    budget (never past the whole check's), records its time, and rewrites the report after it."""

    def __init__(self, report: dict, name: str, budget_s: float, out_dir: str, check_deadline: float):
        self.report, self.name, self.budget_s, self.out_dir = report, name, budget_s, out_dir
        self.check_deadline = check_deadline
        self.result: dict = {}

    def __enter__(self):
        print(f"== {self.name} (budget {self.budget_s:.0f} s)", flush=True)
        self.start = time.monotonic()
        DEADLINE[0] = min(self.start + self.budget_s, self.check_deadline)
        return self

    def __exit__(self, exc_type, exc, tb):
        self.result.setdefault("ok", False)
        self.result.update(budget_s=self.budget_s, seconds=round(time.monotonic() - self.start, 1))
        if exc is not None:
            self.result["error"] = f"{exc_type.__name__}: {exc}"
        self.report[self.name] = self.result
        self.report["phases_done"].append(self.name)
        write_report(self.out_dir, self.report)
        return False


# ---- phase 2: pytest tests/gpu ---------------------------------------------------------------


def junit_cases(junit: str) -> dict:
    """{test name: {"seconds", "outcome"}} from pytest's junit XML."""
    cases = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        outcome = "passed"
        for kind in ("failure", "error", "skipped"):
            if case.find(kind) is not None:
                outcome = kind
        cases[case.get("name")] = {"seconds": round(float(case.get("time", 0)), 1), "outcome": outcome}
    return cases


def run_gpu_tests(out_dir, work, test_timeout_s: float) -> dict:
    junit = os.path.join(work, "junit.xml")
    if os.path.exists(junit):
        os.remove(junit)
    cmd = [sys.executable, "-m", "pytest", "tests/gpu", "-q", "-rs", "-p", "no:cacheprovider", "--junitxml", junit]
    watch = "torchrun launches: the launcher's watchdog (tests/dist/launch.py)"
    if importlib.util.find_spec("pytest_timeout") is not None:
        cmd += ["--timeout", str(int(test_timeout_s))]
        watch += "; every test: pytest-timeout"
    env = child_env(MEGADIFF_TEST_TIMEOUT_S=str(int(test_timeout_s)))
    result = run(cmd, os.path.join(out_dir, "pytest.log"), env)
    result["per_test_timeout"] = {"seconds": test_timeout_s, "enforced_by": watch}
    if os.path.isfile(junit):
        suite = ET.parse(junit).getroot()
        suite = suite.find("testsuite") if suite.tag == "testsuites" else suite
        result.update({k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")})
        result["cases"] = junit_cases(junit)
    result["ok"] = result["rc"] == 0 and result.get("tests", 0) > result.get("skipped", 0)
    return result


# ---- phase 3: the end to end -----------------------------------------------------------------


def loss_went_down(losses: list[float]) -> dict:
    """The mean loss of the last quarter of the steps against the first quarter's (at least 3
    steps each): the noise of single steps (random mask ratios) cannot fake a trend."""
    n = max(3, len(losses) // 4)
    if len(losses) < 2 * n:
        return {"ok": False, "why": f"{len(losses)} losses; need at least {2 * n}"}
    first, last = statistics.fmean(losses[:n]), statistics.fmean(losses[-n:])
    return {"ok": last < first, "first_mean": first, "last_mean": last, "steps_each": n}


def end_to_end_stages(work, steps) -> list[tuple[str, list]]:
    py = sys.executable
    hf, data, init = f"{work}/tiny_hf", f"{work}/data", f"{work}/mcore_init"
    ckpt, trained, metrics, chat = f"{work}/ckpt", f"{work}/trained_hf", f"{work}/metrics.jsonl", f"{work}/chat.jsonl"
    train = [
        *(py, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1", "tools/train.py"),
        "examples/configs/tiny_bd_sft.yaml",
        *(f"model.hf_dir={hf}", f"model.init_from_mcore={init}", "model.dtype=bf16", "model.attention_backend=flex"),
        *(f"data.train_files={data}/train.jsonl", "parallel.ep=1", f"train.steps={steps}", "train.warmup_steps=2"),
        *(f"checkpoint.save_dir={ckpt}", "checkpoint.save_interval=0", f"logging.metrics_file={metrics}"),
        "logging.progress_bar=false",
    ]
    return [
        ("tiny_model", [py, "tools/make_tiny_model.py", "--output", hf, "--overwrite"]),
        ("data", [py, "tools/make_synthetic_data.py", "--output", f"{data}/synthetic.jsonl", "--rows", "400"]),
        ("sft_rows", [py, "tools/build_gsm8k_dataset.py", "--input", f"{data}/synthetic.jsonl",
                      "--output-dir", data, "--test-fraction", "0.05"]),
        ("hf_to_mcore", [py, "tools/convert_hf_to_mcore.py", "--hf-dir", hf, "--output", init, "--dtype", "bf16",
                         "--overwrite", "--no-progress"]),
        ("train", train),
        ("mcore_to_hf", [py, "tools/convert_mcore_to_hf.py", "--mcore-dir", ckpt, "--output", trained,
                         "--overwrite", "--no-progress"]),
        ("generate", [py, "tools/generate.py", "--model", trained, "--device", "cuda", "--prompt", PROMPT,
                      "--gen-length", "32", "--block-length", "32", "--steps", "32", "--output", chat]),
    ]  # fmt: skip


def run_end_to_end(out_dir, work, steps) -> dict:
    log = os.path.join(out_dir, "e2e.log")
    metrics, chat = f"{work}/metrics.jsonl", f"{work}/chat.jsonl"
    for stale in (metrics, chat):
        if os.path.exists(stale):
            os.remove(stale)
    result = {"stages": {}}
    for name, cmd in end_to_end_stages(work, steps):
        result["stages"][name] = stage = run(cmd, log)
        if stage["rc"] != 0:
            result["failed_stage"] = name
            break
    losses = []
    if os.path.isfile(metrics):
        records = [json.loads(line) for line in open(metrics) if line.strip()]
        losses = [r["loss"] for r in records]
        if records:
            result.update(
                steps=records[-1]["step"],
                first_loss=records[0]["loss"],
                final_loss=records[-1]["loss"],
                tokens_per_s_last=records[-1]["tokens_per_s"],
            )
    result["losses"] = losses
    result["loss_went_down"] = loss_went_down(losses)
    if os.path.isfile(chat):
        answer = json.loads(open(chat).readline())
        result.update(prompt=PROMPT, generated_ids=answer.get("generated_ids"), generated_text=answer.get("text"))
    result["ok"] = (
        "failed_stage" not in result
        and result.get("steps") == steps
        and result["loss_went_down"]["ok"]
        and bool(result.get("generated_ids"))
    )
    return result


# ---- phase 4: the benchmark, with the GPU's utilisation --------------------------------------


class UtilisationSampler:
    """nvidia-smi's GPU utilisation (percent of time a kernel ran) every `interval_ms`, each sample
    stamped with time.time() on arrival; `between(t0, t1)` gives those of a time window."""

    def __init__(self, interval_ms: int = 100, gpu: str | None = None):
        self.interval_ms, self.samples, self.proc, self.reader = interval_ms, [], None, None
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
        self.gpu = gpu or visible or "0"  # the physical GPU behind cuda:0

    def __enter__(self):
        smi = shutil.which("nvidia-smi")
        if smi is None:
            return self
        self.proc = subprocess.Popen(
            [smi, "-i", self.gpu, "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
             "-lms", str(self.interval_ms)],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )  # fmt: skip
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        return self

    def _read(self):
        for line in self.proc.stdout:
            try:
                self.samples.append((time.time(), float(line.strip())))
            except ValueError:
                continue  # "[N/A]" or a header

    def __exit__(self, *exc):
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
            self.reader.join(timeout=5)
        return False

    def between(self, start: float, end: float) -> dict | None:
        values = [v for t, v in self.samples if start <= t <= end]
        if not values:
            return None
        return {"mean": round(statistics.fmean(values), 1), "median": statistics.median(values),
                "min": min(values), "samples": len(values)}  # fmt: skip


def benchmark_command(out_path: str) -> list[str]:
    """gpu_step.py at LLaDA2-mini's expert shape (256 experts, top-8, expert hidden 512, hidden
    2048): 2 layers, 4096 tokens through the experts ([x_t ; x_0] of 2048), one micro-batch."""
    return [
        *(sys.executable, "benchmarks/gpu_step.py", "--no-reference", "--layers", "2", "--seq-len", "2048"),
        *("--batch", "1", "--attention", "dense", "--warmup", "1", "--steps", "3", "--moe-experts", *EXPERTS),
        *("--out", out_path),
    ]


def run_benchmark(out_dir, work) -> dict:
    """benchmarks/gpu_step.py's numbers (its log: benchmark.log) and the GPU's utilisation during
    each variant's timed steps; informative, not part of PASS/FAIL."""
    path = os.path.join(work, "gpu_step.json")
    if os.path.exists(path):
        os.remove(path)
    with UtilisationSampler() as sampler:
        result = run(benchmark_command(path), os.path.join(out_dir, "benchmark.log"))
    result["utilisation_samples"] = len(sampler.samples)
    if os.path.isfile(path):
        with open(path) as f:
            result["results"] = json.load(f)
        for variant in result["results"].get("variants", {}).values():
            if "window" in variant:
                variant["gpu_utilisation_pct"] = sampler.between(*variant["window"])
        result["summary"] = benchmark_summary(result["results"])
    result["ok"] = result["rc"] == 0 and "results" in result
    return result


def benchmark_summary(results: dict) -> dict:
    """Step time of each experts choice, their ratio, and the GPU's utilisation."""
    summary = {}
    for name, variant in results.get("variants", {}).items():
        if "step_s" in variant:
            util = variant.get("gpu_utilisation_pct") or {}
            summary[name] = {"step_s": variant["step_s"], "mfu": variant.get("mfu"), "gpu_util_mean": util.get("mean"),
                             "experts": variant.get("experts")}  # fmt: skip
    steps = {name.rsplit("/", 1)[-1]: v["step_s"] for name, v in summary.items()}
    if all(e in steps for e in EXPERTS):
        summary["sequential_over_grouped_step_time"] = steps["sequential"] / steps["grouped"]
    return summary


# ---- main ------------------------------------------------------------------------------------


def main(argv=None) -> int:
    args = parse_args(argv)
    refuse_without_cuda()
    out_dir = os.path.abspath(args.output)
    work = os.path.abspath(args.workdir or os.path.join(out_dir, "work"))
    os.makedirs(out_dir, exist_ok=True)
    os.makedirs(work, exist_ok=True)
    for name in ("pytest.log", "e2e.log", "benchmark.log"):
        open(os.path.join(out_dir, name), "w").close()
    start = time.monotonic()
    check_deadline = start + args.budget_s
    report = {"ok": None, "budget_s": args.budget_s, "phases_done": []}
    with Phase(report, "environment", ENVIRONMENT_BUDGET_S, out_dir, check_deadline) as phase:
        phase.result = {"ok": True, **environment_report()}
        print(json.dumps(phase.result, indent=1), flush=True)
    if not args.skip_tests:
        with Phase(report, "tests", args.tests_budget_s, out_dir, check_deadline) as phase:
            phase.result = run_gpu_tests(out_dir, work, args.test_timeout_s)
    with Phase(report, "end_to_end", args.end_to_end_budget_s, out_dir, check_deadline) as phase:
        phase.result = run_end_to_end(out_dir, work, args.steps)
    if not args.no_benchmark:
        with Phase(report, "benchmark", args.benchmark_budget_s, out_dir, check_deadline) as phase:
            phase.result = run_benchmark(out_dir, work)
    report["ok"] = report["end_to_end"]["ok"] and report.get("tests", {"ok": True})["ok"]
    report["wall_time_s"] = round(time.monotonic() - start, 1)
    path = write_report(out_dir, report)
    e2e = report["end_to_end"]
    bench = report.get("benchmark", {}).get("summary", {})
    print(
        f"\ngpu_check: {'PASS' if report['ok'] else 'FAIL'} in {report['wall_time_s']:.0f} s; tests "
        f"{report.get('tests', {}).get('rc', 'skipped')}, end to end "
        f"{'ok' if e2e['ok'] else 'failed at ' + e2e.get('failed_stage', 'checks')}, "
        f"loss {e2e.get('first_loss')} -> {e2e.get('final_loss')}; sequential/grouped step time "
        f"{bench.get('sequential_over_grouped_step_time', 'n/a')}; report: {path}"
    )
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
