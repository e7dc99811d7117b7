"""torchrun worker: the family-generic tools and LoRA for every model family, in one launch.

- `--runs`: a JSON list of tools/compare_logits.py command lines (strings); the tool's main() runs
  once per line inside this process group (one model and layout each).
- `--lora-jobs`: a JSON list of {"hf_dir", "tp", "ep", "pp", "experts"}: the family's megatron model
  with the HF weights and megadiff's LoRA adapters (random, non-zero, loaded whole with
  load_full_adapter_state) against the family's reference with the same adapters merged
  (W + alpha/r * B @ A, mapped by the mapping objects): fp32 logits max |diff|, and the adapters
  gathered back from the layout (full_adapter_state) must equal those loaded, bit for bit.
Rank 0 writes {"codes": {command line: exit code}, "lora": {job: {check: value}}} to --out.
"""

import argparse
import json
import os
import shlex
import sys

# the repo root: the worker imports the tool (tools.*) and test helpers, with its own dir as sys.path[0]
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))))

from megadiff.platform import install_import_hook  # noqa: E402

install_import_hook()  # first, before anything imports megatron-core

import torch  # noqa: E402

from megadiff.hf.checkpoint_reader import HFCheckpointReader, read_hf_config  # noqa: E402
from megadiff.lora.apply import apply_lora  # noqa: E402
from megadiff.lora.state import full_adapter_state, load_full_adapter_state  # noqa: E402
from megadiff.models.common.hf_weights import load_hf_into_model  # noqa: E402
from megadiff.models.common.logits import full_logits  # noqa: E402
from megadiff.models.registry import family_for_config  # noqa: E402
from megadiff.platform import init_distributed, initialize_parallel  # noqa: E402
from megadiff.platform.parallel_layout import ParallelLayout  # noqa: E402
from tests.lora.peft_reference import merged_reference, random_full_adapter  # noqa: E402
from tools import compare_logits  # noqa: E402

TARGETS = ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]


def lora_job(job: dict) -> dict:
    hf_config = read_hf_config(job["hf_dir"])
    family = family_for_config(hf_config)
    cfg = family.config_from_hf(hf_config)
    layout = ParallelLayout(tp=job["tp"], ep=job["ep"], pp=job["pp"])
    initialize_parallel(layout)
    lora = dict(rank=4, alpha=8.0, dropout=0.0, target_modules=TARGETS, experts=job["experts"], init="kaiming", seed=3)
    chunks = family.build_model(cfg, layout, moe_experts="sequential")  # LoRA adapts SequentialMLP experts
    load_hf_into_model(chunks, HFCheckpointReader(job["hf_dir"]).get, family.mapping, cfg)
    apply_lora(chunks, **lora)
    full = random_full_adapter(lora, hf_config, seed=5)
    load_full_adapter_state(chunks, full)
    back = full_adapter_state(chunks)
    ids = torch.randint(0, cfg.vocab_size, (1, 16), generator=torch.Generator().manual_seed(7))
    pos = torch.arange(16).unsqueeze(0)
    ours = full_logits(chunks, ids, pos)
    out = {
        "adapters_not_exact": float(back.keys() != full.keys() or any(not torch.equal(back[k], full[k]) for k in full))
    }
    if torch.distributed.get_rank() == 0:
        with torch.no_grad():
            merged = merged_reference(job["hf_dir"], full, lora, hf_config)(ids, position_ids=pos).logits
            base = merged_reference(job["hf_dir"], full, dict(lora, target_modules=[]), hf_config)(
                ids, position_ids=pos
            ).logits
        out.update(logits=float((ours - merged).abs().max()), adapters_effect=float((merged - base).abs().max()))
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--runs", required=True, help="JSON file: a list of compare_logits command lines")
    p.add_argument("--lora-jobs", help="JSON file: a list of LoRA jobs (module docstring)")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    init_distributed()  # the tool keeps a process group it did not create
    with open(args.runs) as f:
        runs = json.load(f)
    codes = {run: compare_logits.main(shlex.split(run)) for run in runs}
    lora = {}
    if args.lora_jobs:
        with open(args.lora_jobs) as f:
            for job in json.load(f):
                lora[json.dumps(job, sort_keys=True)] = lora_job(job)
    if torch.distributed.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump({"codes": codes, "lora": lora}, f)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
