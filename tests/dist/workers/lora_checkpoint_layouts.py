"""torchrun worker: at each layout a LoRA trainer trains one step and saves an adapter-only
checkpoint; read back in one process (megadiff.lora.adapter_checkpoint.read_lora_checkpoint: torch
DCP alone, no megatron-core), it must equal the full adapter state the model holds
(megadiff.lora.state.full_adapter_state, gathered over TP/EP/PP) bit for bit.
Writes {layout: {"keys": n, "only_in_model": [...], "only_in_checkpoint": [...], "max_abs_diff": x}}.
"""

import argparse
import json
import os

from megadiff.platform import install_import_hook  # noqa: E402

install_import_hook()  # first, before anything imports megatron-core

import torch  # noqa: E402

from megadiff.lora.adapter_checkpoint import read_lora_checkpoint  # noqa: E402
from megadiff.lora.state import full_adapter_state  # noqa: E402
from megadiff.training.config import load_config  # noqa: E402
from megadiff.training.loop import Trainer  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--layouts", required=True, help="tp,ep,pp;...")
    parser.add_argument("--save-root", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    results = {}
    for layout in filter(None, args.layouts.split(";")):
        tp, ep, pp = layout.split(",")
        save_dir = os.path.join(args.save_root, layout.replace(",", "_"))
        overrides = [
            *args.overrides,
            f"parallel.tp={tp}",
            f"parallel.ep={ep}",
            f"parallel.pp={pp}",
            f"checkpoint.save_dir={save_dir}",
            "train.steps=1",
            "logging.progress_bar=false",
        ]
        trainer = Trainer(load_config(args.config, overrides))
        trainer.train_step()
        trainer.save()
        model = full_adapter_state(trainer.chunks)
        trainer.close()
        torch.distributed.barrier()
        if torch.distributed.get_rank() == 0:
            saved = read_lora_checkpoint(save_dir).adapters
            common = sorted(model.keys() & saved.keys())
            results[layout] = {
                "keys": len(common),
                "only_in_model": sorted(model.keys() - saved.keys()),
                "only_in_checkpoint": sorted(saved.keys() - model.keys()),
                "max_abs_diff": max(float((model[k] - saved[k]).abs().max()) for k in common),
                "max_abs": max(float(model[k].abs().max()) for k in common if ".lora_B." in k),
            }
            print(layout, results[layout], flush=True)
    if torch.distributed.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
