"""lm-evaluation-harness on megadiff checkpoints: lm-eval's `run` command with `--model megadiff` preselected.

  .venv/bin/python tools/lm_eval.py --model_args pretrained=DIR,mc_num=32,batch_size=32 --tasks mmlu
  .venv/bin/python tools/lm_eval.py --model_args pretrained=demo_out/trained_hf,batch_size=16,mc_num=8 \\
      --include_path examples/lm_eval_tasks --tasks megadiff_arithmetic megadiff_arithmetic_mc \\
      --apply_chat_template --offline

Every flag of `lm-eval run` works as lm-eval documents it (its help follows). What this adds:
  --model              defaults to megadiff (DIR: a Hugging Face model dir of any family, or a megadiff
                       megatron-core checkpoint; model args: README "Standard benchmarks")
  --output_path        defaults to lm_eval_out (lm-eval's results JSON goes there)
  --device             defaults to cuda:LOCAL_RANK on a GPU machine, else cpu (lm-eval's: cuda:0)
  --offline            HF_DATASETS_OFFLINE=1 and HF_HUB_OFFLINE=1: local task files only, no hub
After lm-eval's table it prints one summary line per task and where the results JSON is. A bad model
arg, a missing model dir or an unsupported request type is one line on stderr (exit status 2).
`megadiff-lm-eval ls tasks` and `validate` are lm-eval's, with the megadiff model registered.
"""

from __future__ import annotations

import glob
import json
import os
import shlex
import sys
import time

DEFAULT_OUTPUT = "lm_eval_out"
PASS_THROUGH = ("ls", "validate")


def lm_eval_argv(argv: list[str]) -> list[str]:
    """The `lm-eval` command line for our arguments: `run` with --model megadiff, --output_path
    lm_eval_out and --device (this machine's) unless given."""
    if argv and argv[0] in PASS_THROUGH:
        return argv
    argv = argv[1:] if argv and argv[0] == "run" else list(argv)
    if not any(a in ("--model", "-M") or a.startswith("--model=") for a in argv):
        argv = ["--model", "megadiff", *argv]
    if not any(a in ("--output_path", "-o") or a.startswith("--output_path=") for a in argv):
        argv += ["--output_path", DEFAULT_OUTPUT]
    if not any(a == "--device" or a.startswith("--device=") for a in argv):
        from megadiff.inference.loading import default_device

        argv += ["--device", default_device()]  # lm-eval's own default is cuda:0, also on a CPU machine
    return ["run", *argv]


def output_path_of(argv: list[str]) -> str:
    for i, a in enumerate(argv):
        if a.startswith("--output_path="):
            return a.split("=", 1)[1]
        if a in ("--output_path", "-o") and i + 1 < len(argv):
            return argv[i + 1]
    return DEFAULT_OUTPUT


def newest_results_file(output_path: str, since: float) -> str | None:
    """The results JSON lm-eval wrote under `output_path` (a dir, or a .json name it timestamps) since `since`."""
    if output_path.endswith(".json"):
        stem = os.path.splitext(output_path)[0]
        candidates = glob.glob(glob.escape(stem) + "_*.json")
    else:
        candidates = glob.glob(os.path.join(glob.escape(output_path), "**", "results_*.json"), recursive=True)
    fresh = [p for p in candidates if os.path.getmtime(p) >= since]
    return max(fresh, key=os.path.getmtime) if fresh else None


def summary_lines(results: dict) -> list[str]:
    """One line per task: its metrics (± stderr where lm-eval computed one) and the number of samples."""
    lines = []
    for task, metrics in results.get("results", {}).items():
        parts = []
        for key, value in metrics.items():
            name, _, filter_name = key.partition(",")
            if (
                not filter_name or name.endswith("_stderr") or not isinstance(value, (int, float))
            ):  # metrics are "name,filter"
                continue
            stderr = metrics.get(f"{name}_stderr,{filter_name}")
            label = name if filter_name in ("", "none") else f"{name} ({filter_name})"
            parts.append(f"{label} {value:.4f}" + (f" ± {stderr:.4f}" if isinstance(stderr, (int, float)) else ""))
        samples = results.get("n-samples", {}).get(task, {}).get("effective")
        lines.append(f"{task}: {', '.join(parts) or 'no metrics'}" + (f" ({samples} samples)" if samples else ""))
    return lines


def main(argv=None) -> int:
    from megadiff.platform import install_import_hook

    install_import_hook()  # first, before anything imports megatron-core
    from megadiff.errors import UserError, user_error_exit

    argv = list(sys.argv[1:] if argv is None else argv)
    if "--offline" in argv:
        argv.remove("--offline")
        os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
    try:
        from megadiff.evaluation import register_lm_eval_model

        register_lm_eval_model()
    except ImportError as e:
        return user_error_exit(e)
    from lm_eval.__main__ import cli_evaluate

    command = lm_eval_argv(argv)
    print("+ lm-eval " + " ".join(shlex.quote(a) for a in command), flush=True)
    started = time.time()
    saved_argv, sys.argv = sys.argv, ["lm-eval", *command]
    try:
        cli_evaluate()  # lm-eval's own entry point: reads sys.argv
    except UserError as e:
        return user_error_exit(e)
    finally:
        sys.argv = saved_argv
    if command[0] != "run":
        return 0
    path = newest_results_file(output_path_of(command), started - 1.0)
    if path is None:
        print("no results JSON was written (see lm-eval's messages above)", file=sys.stderr)
        return 1
    with open(path) as f:
        results = json.load(f)
    for line in summary_lines(results):
        print(line)
    print(f"results in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
