"""torchrun worker: host reads of run-device values per training step (megadiff.platform.host_reads).

For each case ({name: [config overrides]}), a Trainer is built and run for train.steps steps under
the counter (the run device is a pretend second CPU device). A step's reads are everything from
its start to the next step's start: its own work and, on a log step, the read and logging that
follow it. Also counted: the phase timers' device synchronisations (logging.timers). Writes
{case: {"reads": [per step], "where": [per step: [read sites]], "model_reads": [...],
"model_where": [...], "syncs": [per step], "losses": [...]}}.
"""

import argparse
import json

from megadiff.platform import install_import_hook  # noqa: E402

install_import_hook()  # first, before anything imports megatron-core

import torch  # noqa: E402

from megadiff.platform import init_distributed  # noqa: E402
from megadiff.platform.host_reads import HostReadCounter  # noqa: E402
from megadiff.training import step_metrics  # noqa: E402
from megadiff.training.config import load_config  # noqa: E402
from megadiff.training.loop import Trainer  # noqa: E402


def between(marks: list[int], items: list) -> list:
    return [items[a:b] for a, b in zip(marks, marks[1:], strict=False)]


def count_case(config: str, overrides: list[str]) -> dict:
    cfg = load_config(config, overrides + ["checkpoint.save_dir=", "logging.progress_bar=false"])
    syncs = []
    step_metrics.synchronize = lambda: syncs.append(1)  # the phase timers' waits for the device
    with HostReadCounter() as reads:
        trainer = Trainer(cfg)
        reads.place(*trainer.chunks)  # the model lives on the run device (build_model's job on CUDA)
        if trainer.objective is not None and trainer.objective.reference_chunks is not None:
            reads.place(*trainer.objective.reference_chunks)
        marks, model_marks, sync_marks = [], [], []
        step = trainer.step_on_device

        def marked_step():
            marks.append(reads.count)
            model_marks.append(len(reads.model_where))
            sync_marks.append(len(syncs))
            return step()

        trainer.step_on_device = marked_step
        results = trainer.run()
        marks.append(reads.count)
        model_marks.append(len(reads.model_where))
        sync_marks.append(len(syncs))
    where, model_where = between(marks, reads.where), between(model_marks, reads.model_where)
    return {
        "reads": [len(w) for w in where],
        "where": where,
        "model_reads": [len(w) for w in model_where],
        "model_where": model_where,
        "syncs": [len(s) for s in between(sync_marks, syncs)],
        "losses": [r.loss for r in results],
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--cases", required=True, help="JSON {name: [override, ...]}")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    init_distributed()
    results = {name: count_case(args.config, overrides) for name, overrides in json.loads(args.cases).items()}
    for name, r in results.items():
        print(name, "reads per step", r["reads"], "in the model", r["model_reads"], "syncs", r["syncs"], flush=True)
    if torch.distributed.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
