"""torchrun worker: a LoRA run, its exports through tools/convert_mcore_to_hf.py, and a second run
that starts from the exported PEFT adapter (lora.init_from_peft).

1. Train LoRA adapters (routed experts too) for a few steps at the given layout; the trainer saves
   its adapter-only checkpoint at the end. The trainer's model then gives `trained` logits.
2. Rank 0 exports that checkpoint twice with the tool: merged weights (--output) and a PEFT
   adapter (--peft-adapter).
3. A new run with lora.init_from_peft=<the PEFT dir> builds its model; before any step its logits
   (`from_peft`) must be those of step 1.
Writes {"trained", "from_peft", "ids"} (torch.save) to --out on rank 0; the test compares.
"""

import argparse
import os
import subprocess
import sys

# the repo root: the worker imports shared test code (tests.*) and runs with its own dir as sys.path[0]
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))))

from megadiff.platform import install_import_hook  # noqa: E402

install_import_hook()  # first, before anything imports megatron-core

import torch  # noqa: E402

from megadiff.models.common.logits import full_logits  # noqa: E402
from megadiff.training.config import load_config  # noqa: E402
from megadiff.training.loop import Trainer  # noqa: E402
from tests.dist.launch import REPO  # noqa: E402

S = 16


def lora_overrides(layout: str, save_dir: str) -> list[str]:
    tp, ep, pp = layout.split(",")
    return [
        f"parallel.tp={tp}",
        f"parallel.ep={ep}",
        f"parallel.pp={pp}",
        "lora.enabled=true",
        "lora.experts=true",
        "lora.rank=4",
        "lora.alpha=16.0",
        "train.lr=0.005",  # logits move by ~0.8; at 0.02 (~4x more) fp32 rounding of merged vs unmerged passed 1e-5
        "train.steps=3",
        f"checkpoint.save_dir={save_dir}",
        "logging.progress_bar=false",
        "perf.xt_only_logits=false",  # logits of every position (the model's x_t-only head is for training)
    ]


def logits_of(trainer, ids) -> torch.Tensor:
    pos = torch.arange(S).expand(1, S)
    return torch.cat([full_logits(trainer.chunks, ids[i : i + 1], pos) for i in range(ids.shape[0])])


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    p.add_argument("--layout", default="1,1,1")
    p.add_argument("--work", required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    rank = int(os.environ.get("RANK", "0"))
    ckpt, merged, peft_dir = (os.path.join(args.work, n) for n in ("lora_ckpt", "merged_hf", "peft_adapter"))

    trainer = Trainer(load_config(args.config, lora_overrides(args.layout, ckpt)))
    trainer.run()
    ids = torch.randint(0, trainer.model_cfg.vocab_size, (2, S), generator=torch.Generator().manual_seed(5))
    trained = logits_of(trainer, ids)
    trainer.close()

    if rank == 0:
        tool = os.path.join(REPO, "tools", "convert_mcore_to_hf.py")
        for flags in (["--output", merged], ["--peft-adapter", peft_dir]):
            cmd = [sys.executable, tool, "--mcore-dir", ckpt, *flags, "--no-progress"]
            proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}")
            print(proc.stdout, flush=True)
    torch.distributed.barrier()

    again = lora_overrides(args.layout, "") + [f"lora.init_from_peft={peft_dir}"]
    trainer = Trainer(load_config(args.config, again))
    from_peft = logits_of(trainer, ids)
    trainer.close()
    if rank == 0:
        torch.save({"trained": trained, "from_peft": from_peft, "ids": ids}, args.out)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
