"""Megatron-LM flags typed out of habit reach the trainer as megadiff's dotted keys with a note each,
or are refused naming the key (never argparse's bare "unrecognized arguments"); the converters take
Megatron's parallel-size spellings as aliases."""

import subprocess
import sys

import pytest

from megadiff.training.config import TrainingConfigError, load_config
from megadiff.training.megatron_flags import overrides_from_megatron_flags
from tests.dist.launch import worker_env

MEGATRON = [
    ("--tensor-model-parallel-size 2", "parallel.tp=2"),
    ("--pipeline-model-parallel-size 2", "parallel.pp=2"),
    ("--expert-model-parallel-size 4", "parallel.ep=4"),
    ("--expert-tensor-parallel-size 1", "parallel.etp=1"),
    ("--virtual-pipeline-model-parallel-size 2", "parallel.vpp=2"),
    ("--micro-batch-size 2", "train.micro_batch_size=2"),
    ("--global-batch-size=16", "train.global_batch_size=16"),
    ("--lr 3e-4", "train.lr=3e-4"),
    ("--min-lr 1e-6", "train.min_lr=1e-6"),
    ("--train-iters 50", "train.steps=50"),
    ("--lr-warmup-iters 5", "train.warmup_steps=5"),
    ("--seq-length 512", "data.max_seq_len=512"),
    ("--save ckpt", "checkpoint.save_dir=ckpt"),
    ("--save-interval 10", "checkpoint.save_interval=10"),
    ("--seed 7", "train.seed=7"),
    ("--bf16", "model.dtype=bf16"),
    ("--use-distributed-optimizer", "parallel.use_distributed_optimizer=true"),
    ("--overlap-grad-reduce", "perf.overlap_grad_reduce=true"),
    ("--no-gradient-accumulation-fusion", "perf.gradient_accumulation_fusion=false"),
]


@pytest.mark.parametrize("flag, override", MEGATRON, ids=[m[0].split()[0].split("=")[0] for m in MEGATRON])
def test_megatron_flags_become_the_key_they_mean_with_a_note(flag, override):
    rest, overrides, notes = overrides_from_megatron_flags(["c.yaml", *flag.split(), "train.lr=1"])
    assert rest == ["c.yaml", "train.lr=1"] and overrides == [override]
    assert notes == [f"note: {flag} read as {override}"]
    load_config(None, ["model.hf_dir=m", "data.train_files=d", "checkpoint.save_dir=c", override])  # a real key


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--load", "ckpt"], r"--load: megadiff has no such setting; .* model\.init_from_mcore=DIR"),
        (["--fp16"], r"--fp16: .* model\.dtype=bf16"),
        (["--moe-grouped-gemm"], r"--moe-grouped-gemm: .* perf\.moe_experts \(auto \| te \| grouped \| sequential\)"),
        (["--num-layers", "4"], r"--num-layers: .* config\.json"),
        (["--seq-len", "4"], r"unknown flag --seq-len: .* did you mean data\.max_seq_len\?"),
        (["--lr"], r"--lr needs a value \(train\.lr=\.\.\.\)"),
    ],
)
def test_flags_without_a_setting_are_refused_naming_what_to_use(argv, message):
    with pytest.raises(TrainingConfigError, match=message):
        overrides_from_megatron_flags(["c.yaml", *argv])


@pytest.mark.repeat  # stack-independent: argument handling
def test_train_cli_notes_the_mapping_and_refuses_by_key(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("model: {hf_dir: m}\ndata: {train_files: d.jsonl}\n")

    def train(*args):
        return subprocess.run(
            [sys.executable, "tools/train.py", str(config), *args], capture_output=True, text=True, env=worker_env()
        )

    proc = train("--tensor-model-parallel-size", "0")  # the mapped value reaches the config's own check
    assert proc.returncode == 2 and "note: --tensor-model-parallel-size 0 read as parallel.tp=0" in proc.stdout
    assert proc.stderr.strip().splitlines()[-1] == "error: override 'parallel.tp=0': parallel.tp must be >= 1, got 0"
    proc = train("--load", "ckpt")
    assert proc.returncode == 2 and "unrecognized arguments" not in proc.stderr
    assert proc.stderr.strip().startswith("error: --load: megadiff has no such setting")


def test_converters_take_megatron_parallel_size_spellings():
    from tools.convert_hf_to_mcore import parse_args

    long = ["--tensor-model-parallel-size", "2", "--expert-model-parallel-size", "4", "--pipeline-model-parallel-size"]
    args = parse_args(["--hf-dir", "h", "--output", "o", *long, "2", "--virtual-pipeline-model-parallel-size", "2"])
    assert (args.tp, args.ep, args.pp, args.vpp) == (2, 4, 2, 2)
