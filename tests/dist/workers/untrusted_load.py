"""torchrun worker (1 process): train resume and model.init_from_mcore refuse a checkpoint with
code planted in its pickles without running it, and load it with checkpoint.trust_checkpoint.
Then what a resume takes from its checkpoint and what from its config (resume_config): a new LR
applies, new data is refused unless checkpoint.allow_new_data (then read from its beginning), and a
checkpoint whose common.pt is gone is named before megatron-core reads it.

Trains one step to get a trainer-made checkpoint, plants payloads in copies of it and of the
converter-made checkpoint --converted, and builds a Trainer on each. Writes {case: outcome}.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))))

from megadiff.platform import install_import_hook  # noqa: E402

install_import_hook()  # first, before anything imports megatron-core

import torch  # noqa: E402

from megadiff.errors import CheckpointError  # noqa: E402
from megadiff.training.config import load_config  # noqa: E402
from megadiff.training.loop import Trainer  # noqa: E402
from tests import hostile_checkpoints as hostile  # noqa: E402


def outcome(cfg_path, overrides, marker=None):
    """'loaded' / 'refused: <message>', and whether the marker file exists afterwards."""
    try:
        Trainer(load_config(cfg_path, overrides))
        result = "loaded"
    except CheckpointError as e:
        result = f"refused: {e}"
    return {"result": result, "marker": bool(marker and os.path.exists(marker))}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    p.add_argument("--converted", required=True)
    p.add_argument("--work", required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    w = args.work
    trained = os.path.join(w, "trained")
    Trainer(load_config(args.config, ["train.steps=1", f"checkpoint.save_dir={trained}"])).run()
    report = {}
    report["resume_real"] = outcome(args.config, ["train.steps=2", f"checkpoint.save_dir={trained}"])
    report["init_real_trained"] = outcome(args.config, [f"model.init_from_mcore={trained}"])
    report["init_real_converted"] = outcome(args.config, [f"model.init_from_mcore={args.converted}"])
    plants = {"metadata": hostile.plant_in_metadata, "extra_state": hostile.plant_in_extra_state}
    for name, plant in plants.items():
        for use in ("resume", "init"):
            ckpt, marker = os.path.join(w, f"{use}_{name}"), os.path.join(w, f"MARKER_{use}_{name}")
            hostile.copy_checkpoint(trained if use == "resume" else args.converted, ckpt)
            plant(ckpt, marker)
            base = (
                [f"checkpoint.save_dir={ckpt}", "train.steps=2"]
                if use == "resume"
                else [f"model.init_from_mcore={ckpt}"]
            )
            report[f"{use}_{name}"] = outcome(args.config, base, marker)
            report[f"{use}_{name}_trusted"] = outcome(args.config, base + ["checkpoint.trust_checkpoint=true"], marker)
    resumed = []  # the trainers that loaded, for what they resumed with
    memorise = os.path.join(os.path.dirname(args.config), "memorise.jsonl")
    resume_cases = {
        "resume_same": [],
        "resume_lr": ["train.lr=3e-3"],
        "resume_new_data": [f"data.train_files={memorise}"],
        "resume_new_data_allowed": [f"data.train_files={memorise}", "checkpoint.allow_new_data=true"],
        "resume_no_common": [],
    }
    for case, overrides in resume_cases.items():
        ckpt = hostile.copy_checkpoint(trained, os.path.join(w, case))
        if case == "resume_no_common":
            common = os.path.join(ckpt, "iter_0000001", "common.pt")
            if not os.path.exists(common):  # megatron-core 0.17+ keeps the common state inside the DCP files
                report[case] = {"result": "no common.pt in this megatron-core's checkpoints"}
                continue
            os.remove(common)
        try:
            resumed.append(
                Trainer(load_config(args.config, [f"checkpoint.save_dir={ckpt}", "train.steps=2", *overrides]))
            )
            trainer = resumed[-1]
            report[case] = {
                "result": "loaded",
                "max_lr": trainer.scheduler.max_lr,
                "consumed_rows": trainer.dataset.state_dict()["consumed_rows"],
            }
        except CheckpointError as e:
            report[case] = {"result": f"refused: {e}"}
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
