"""torchrun worker: host reads of run-device values per training step (megadiff.platform.host_reads).

For each case (a name and config overrides), a Trainer is built and run for train.steps steps under
the counter (the run device is a pretend second CPU device). Writes {case: {"reads": [per step],
"where": [per step: [read sites]], "syncs": [timer synchronisations per step], "losses": [...]}}.
A step's reads are everything from its start to the next step's start: its own work and, on a log
step, the logging that follows it.
"""

import argparse
import json

from megadiff.platform import install_import_hook  # noqa: E402

install_import_hook()  # first, before anything imports megatron-core

import torch  # noqa: E402

from megadiff.platform import init_distributed  # noqa: E402
from megadiff.platform.host_reads import HostReadCounter  # noqa: E402
from megadiff.training.config import load_config  # noqa: E402
from megadiff.training.loop import Trainer  # noqa: E402


def count_case(config: str, overrides: list[str]) -> dict:
    cfg = load_config(config, overrides + ["checkpoint.save_dir=", "logging.progress_bar=false"])
    with HostReadCounter() as reads:
        trainer = Trainer(cfg)
        reads.place(*trainer.chunks)  # the model lives on the run device (build_model's job on CUDA)
        if trainer.objective is not None and trainer.objective.reference_chunks is not None:
            reads.place(*trainer.objective.reference_chunks)
        marks, model_marks = [], []
        step = trainer.step_on_device

        def marked_step():
            marks.append(reads.count)
            model_marks.append(len(reads.model_where))
            return step()

        trainer.step_on_device = marked_step
        results = trainer.run()
        marks.append(reads.count)
        model_marks.append(len(reads.model_where))
    per_step = [reads.where[a:b] for a, b in zip(marks, marks[1:], strict=False)]
    model = [reads.model_where[a:b] for a, b in zip(model_marks, model_marks[1:], strict=False)]
    return {
        "reads": [len(w) for w in per_step],
        "where": per_step,
        "model_reads": [len(w) for w in model],
        "model_where": model,
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
        print(name, "reads per step", r["reads"], "inside the model", r["model_reads"], flush=True)
    if torch.distributed.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
