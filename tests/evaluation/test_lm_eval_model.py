"""The `megadiff` lm-eval model through lm-eval itself (tools/lm_eval.py, in this process) on a tiny random
model and the shipped example tasks (examples/lm_eval_tasks/arithmetic, pointed at rows made here):
exact match equals tools/eval_gsm8k.py's on the same rows, lm-eval's log-likelihoods equal the direct
estimate, an mcore checkpoint scores like its HF dir, and bad input is one line naming the argument.
Offline: HF_DATASETS_OFFLINE / HF_HUB_OFFLINE, and the datasets cache in a temporary dir."""

import glob
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest
from elbo_reference import direct_loglikelihood

from megadiff.data.synthetic import arithmetic_problems
from megadiff.hf.tiny import write_tiny_model_dir
from megadiff.inference import DecodingOptions, decode_tokens, encode_prompt, generate, load_model, load_tokenizer
from megadiff.inference.gsm8k import extract_answer
from tests.dist.launch import worker_env

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("lm_eval") is None, reason="lm-eval is not installed (pip install -e '.[eval]')"
)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TASKS = os.path.join(REPO, "examples", "lm_eval_tasks", "arithmetic")
DECODING = ["--gen-length", "32", "--block-length", "32", "--steps", "32"]  # the shipped task's max_gen_toks: 32
MC_NUM, SEED = 4, 3
ROLLING_TASK = """task: megadiff_rolling
dataset_path: json
dataset_kwargs: {data_files: {test: DATA}}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{question}}"
metric_list: [{metric: word_perplexity}]
"""


@pytest.fixture(scope="module")
def offline(tmp_path_factory):
    """No hub; lm-eval's datasets cache in a temporary dir (datasets reads these when first imported)."""
    cache = tmp_path_factory.mktemp("hf_home")
    with pytest.MonkeyPatch.context() as mp:
        for name, value in (("HF_HOME", cache), ("HF_DATASETS_CACHE", cache / "datasets")):
            mp.setenv(name, str(value))
        for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
            mp.setenv(name, "1")
        if "datasets.config" in sys.modules:  # imported earlier in this session: point it there too
            mp.setattr(sys.modules["datasets.config"], "HF_DATASETS_CACHE", str(cache / "datasets"))
            mp.setattr(sys.modules["datasets.config"], "HF_DATASETS_OFFLINE", True)
        from lm_eval.utils import setup_logging

        # lm-eval logs to the sys.stderr of its first setup_logging(): make that pytest's session-long
        # stream, not one test's capsys (closed after that test)
        setup_logging()
        yield


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, offline):
    """A tiny model, 8 arithmetic rows whose gold answers are what the random model writes for half of
    them (so exact match is neither 0 nor 1), and the example tasks reading those rows."""
    root = tmp_path_factory.mktemp("lm_eval")
    hf = write_tiny_model_dir(str(root / "hf"), seed=0, num_hidden_layers=2)
    model, tokenizer = load_model(hf), load_tokenizer(hf)
    rows = arithmetic_problems(8, seed=11)
    outputs = generate(
        model,
        [encode_prompt(r["question"], tokenizer) for r in rows],
        DecodingOptions(gen_length=32, block_length=32, steps=32),
        tokenizer.convert_tokens_to_ids("<|mask|>"),
        tokenizer.eos_token_id,
    ).tokens
    predictions = [extract_answer(decode_tokens(t, tokenizer)) for t in outputs]
    matched = 0
    for row, prediction in zip(rows, predictions, strict=True):
        if matched < 4 and prediction is not None and prediction.isdigit():
            sum_text = row["answer"].split(" = ")[0]
            row["answer"] = f"{sum_text} = {prediction}\n#### {prediction}"
            matched += 1
    assert matched >= 1, predictions  # the random model wrote a number somewhere
    data = root / "test.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tasks = root / "tasks"
    shutil.copytree(TASKS, tasks, ignore=shutil.ignore_patterns("__pycache__"))
    for yaml in tasks.glob("*.yaml"):
        yaml.write_text(yaml.read_text().replace("demo_out/data/test.jsonl", str(data)))
    (tasks / "megadiff_rolling.yaml").write_text(ROLLING_TASK.replace("DATA", str(data)))
    return {"root": root, "hf": hf, "model": model, "tokenizer": tokenizer, "data": data, "tasks": tasks}


def run_lm_eval(argv, capsys):
    from tools import lm_eval

    code = lm_eval.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def read_samples(out_dir, task):
    (path,) = glob.glob(os.path.join(out_dir, "*", f"samples_{task}_2*.jsonl"))
    return [json.loads(line) for line in open(path)]


def test_generate_until_equals_eval_gsm8k_and_loglikelihood_equals_the_direct_estimate(workspace, capsys):
    w = workspace
    out_dir = w["root"] / "lm_eval_out"
    code, out, err = run_lm_eval(
        [
            "--model_args",
            f"pretrained={w['hf']},batch_size=8,mc_num={MC_NUM},seed={SEED}",
            *("--include_path", str(w["tasks"]), "--tasks", "megadiff_arithmetic", "megadiff_arithmetic_mc"),
            *("--apply_chat_template", "--offline", "--output_path", str(out_dir), "--log_samples"),
        ],
        capsys,
    )
    assert code == 0, err[-3000:]
    summary = {line.split(":")[0]: line for line in out.splitlines() if line.startswith("megadiff_arithmetic")}
    assert (
        set(summary) == {"megadiff_arithmetic", "megadiff_arithmetic_mc"}
        and "(8 samples)" in summary["megadiff_arithmetic"]
    )
    assert "results in " + str(out_dir) in out
    (results_path,) = glob.glob(str(out_dir / "*" / "results_*.json"))
    results = json.load(open(results_path))["results"]

    from tools import eval_gsm8k

    assert eval_gsm8k.main(["--model", w["hf"], "--data", str(w["data"]), "--output-dir", str(w["root"] / "gsm8k"), *DECODING, "--batch-size", "8", "--device", "cpu"]) == 0  # fmt: skip
    capsys.readouterr()
    gsm8k = json.load(open(w["root"] / "gsm8k" / "summary.json"))
    assert 0 < gsm8k["accuracy"] < 1
    assert results["megadiff_arithmetic"]["exact_match,none"] == gsm8k["accuracy"]
    by_row = {s["index"]: s["output"] for s in map(json.loads, open(w["root"] / "gsm8k" / "samples.jsonl"))}
    assert {s["doc_id"]: s["resps"][0][0] for s in read_samples(out_dir, "megadiff_arithmetic")} == by_row

    # every choice's log-likelihood, recomputed from the text lm-eval sent (chat template applied)
    encode = lambda text: w["tokenizer"].encode(text, add_special_tokens=False)
    mask_id = w["tokenizer"].convert_tokens_to_ids("<|mask|>")
    samples = read_samples(out_dir, "megadiff_arithmetic_mc")
    assert len(samples) == 8 and samples[0]["arguments"]["gen_args_0"]["arg_0"].startswith("<role>HUMAN</role>")
    for sample in samples:
        for args, resp in zip(sample["arguments"].values(), sample["resps"], strict=True):
            context = encode(args["arg_0"])
            continuation = encode(args["arg_0"] + args["arg_1"])[len(context) :]
            want = direct_loglikelihood(
                w["model"], context, continuation, mask_id=mask_id, mc_num=MC_NUM, block_length=32, seed=SEED
            )
            assert abs(float(resp[0][0]) - want) < 1e-5 and resp[0][1] == "False"


def test_mcore_checkpoint_gives_the_results_of_its_hf_dir(workspace):
    from lm_eval.api.instance import Instance

    from megadiff.evaluation import register_lm_eval_model

    w = workspace
    mcore = w["root"] / "mcore"
    convert = [sys.executable, "tools/convert_hf_to_mcore.py", "--hf-dir", w["hf"], "--output", str(mcore)]
    proc = subprocess.run(convert, cwd=REPO, env=worker_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    megadiff_lm = register_lm_eval_model()
    questions = [r["question"] for r in map(json.loads, open(w["data"]))][:4]
    results = []
    for pretrained in (w["hf"], str(mcore)):
        lm = megadiff_lm(pretrained=pretrained, mc_num=3, batch_size=4, block_length=8, check_greedy=True)
        contexts = [lm.apply_chat_template([{"role": "user", "content": q}]) for q in questions]
        likelihoods = [Instance("loglikelihood", {}, (c, f"{i} + 1 = {i + 1}"), 0) for i, c in enumerate(contexts)]
        generations = [Instance("generate_until", {}, (c, {"until": ["#"], "max_gen_toks": 20}), 0) for c in contexts]
        results.append((contexts, lm.loglikelihood(likelihoods), lm.generate_until(generations)))
    assert results[0] == results[1]
    assert len({score for score, _ in results[0][1]}) == 4 and all(results[0][2])


BAD_MODEL_ARGS = [
    ("pretrained={root}/no_such_dir", "model arg pretrained={root}/no_such_dir: directory not found"),
    ("pretrained={hf},colour=red", "model arg 'colour' is unknown to the megadiff model"),
    ("pretrained={hf},mc_num=0", "model arg mc_num=0 must be a positive integer"),
    ("pretrained={hf},mc_num=-2", "model arg mc_num=-2 must be a positive integer"),
    ("pretrained={hf},batch_size=auto", "model arg batch_size=auto: 'auto' is not supported"),
]


@pytest.mark.parametrize(
    "model_args, message", BAD_MODEL_ARGS, ids=["missing_dir", "unknown", "mc_num_0", "mc_num_neg", "auto"]
)
def test_bad_model_args_are_one_line_errors_naming_the_argument(workspace, model_args, message):
    """Through create_from_arg_string, as lm-eval builds the model from --model_args (with its own
    --batch_size and --device), before anything is loaded."""
    from megadiff.evaluation import register_lm_eval_model
    from megadiff.evaluation.model_args import ModelArgError

    fill = dict(root=workspace["root"], hf=workspace["hf"])
    with pytest.raises(ModelArgError) as error:
        register_lm_eval_model().create_from_arg_string(model_args.format(**fill), {"batch_size": 1, "device": "cpu"})
    assert message.format(**fill) in str(error.value) and "\n" not in str(error.value)


@pytest.mark.repeat  # the CLI's error path is lm-eval's and megadiff's alone: the same on both stacks
def test_a_task_that_needs_loglikelihood_rolling_is_one_line_naming_it(workspace, capsys):
    """Through the CLI: the error rises from inside lm-eval's evaluation and still prints as one line."""
    out_dir = workspace["root"] / "rolling"
    code, _, err = run_lm_eval(
        [
            *("--model_args", f"pretrained={workspace['hf']}", "--include_path", str(workspace["tasks"])),
            *("--tasks", "megadiff_rolling", "--offline", "--output_path", str(out_dir)),
        ],
        capsys,
    )
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2 and len(errors) == 1, err[-2000:]
    assert errors[0].startswith("error: task megadiff_rolling needs loglikelihood_rolling")
    assert "Traceback" not in err and not out_dir.exists()
