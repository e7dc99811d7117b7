"""One plain process (a 1-process group, as the converters use): an autoregressive Ling-2.0 start, and
checkpoint averaging (issue 27). Writes a JSON of what it found to --out.

ling: a tiny Ling-2.0 dir (model_type bailing_moe_v2, causal remote code, a tokenizer without
    `<|mask|>`, one multi-token-prediction layer) as model.hf_dir: without model.mask_token_id the
    trainer stops before any process group; with it, the weights loaded equal the dir's (MTP left
    out), two steps train, and the checkpoint records a LLaDA2 config with the mask id. The dir also
    converts with tools/convert_hf_to_mcore.py's library.
sft_validation: SFT rows with data.valid_files and train.eval_interval=1 for 2 steps: the valid_loss
    logged at steps 1 and 2, the one megadiff.json records, and a second measurement of the last weights.
average: three tiny models (seeds) as iterations 10, 20, 30 of one root with valid_loss 3, 1, 2;
    tools/average_checkpoints.py --top-k 2 averages 20 and 30: its HF export against the fp32 mean of
    the two iterations' exports (max rel. difference), and the weights a run with
    model.init_from_mcore=AVG starts from against that export. A checkpoint of another config
    (iteration 40) is refused, with the message kept.
"""

import argparse
import json
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))))

from megadiff.platform import install_import_hook  # noqa: E402

install_import_hook()

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from checkpoint_converters.average import average_checkpoints, pick_iterations  # noqa: E402
from checkpoint_converters.hf_to_mcore import convert_hf_to_mcore  # noqa: E402
from checkpoint_converters.mcore_to_hf import convert_mcore_to_hf  # noqa: E402
from megadiff.checkpoint.format import read_meta, resolve_checkpoint_dir, write_json_atomic  # noqa: E402
from megadiff.errors import UserError  # noqa: E402
from megadiff.hf.checkpoint_reader import HFCheckpointReader  # noqa: E402
from megadiff.hf.reference import build_reference_model, save_reference_model  # noqa: E402
from megadiff.hf.tiny import write_tiny_model_dir  # noqa: E402
from megadiff.models.llada2.hf_mapping import gather_hf_state  # noqa: E402
from megadiff.models.llada2.presets import preset  # noqa: E402
from megadiff.training.config import load_config  # noqa: E402
from megadiff.training.loop import Trainer  # noqa: E402
from tools.average_checkpoints import main as average_main  # noqa: E402

QUIET = dict(progress=False, log=lambda *a: None)
LING_AUTO_MAP = {
    "AutoConfig": "configuration_bailing_moe_v2.BailingMoeV2Config",
    "AutoModelForCausalLM": "modeling_bailing_moe_v2.BailingMoeV2ForCausalLM",
}


def write_tiny_ling_dir(out: str, seed: int) -> str:
    """A Ling-2.0-style dir of the tiny model: bailing_moe_v2 config, MTP layer, no mask token."""
    write_tiny_model_dir(out, seed=seed)
    with open(os.path.join(out, "config.json")) as f:
        config = json.load(f)
    layers = config["num_hidden_layers"]
    config.update(
        model_type="bailing_moe_v2",
        architectures=["BailingMoeV2ForCausalLM"],
        auto_map=LING_AUTO_MAP,
        num_nextn_predict_layers=1,
    )
    config.pop("mask_token_id", None)
    write_json_atomic(os.path.join(out, "config.json"), config)
    for name in ("configuration_llada2_moe.py", "modeling_llada2_moe.py"):
        os.unlink(os.path.join(out, name))
    weights = load_file(os.path.join(out, "model.safetensors"))
    hidden = config["hidden_size"]
    g = torch.Generator().manual_seed(seed)
    weights.update(  # a multi-token-prediction layer's own tensors (and one of its decoder tensors)
        {
            f"model.layers.{layers}.eh_proj.weight": torch.randn(hidden, 2 * hidden, generator=g),
            f"model.layers.{layers}.enorm.weight": torch.ones(hidden),
            f"model.layers.{layers}.hnorm.weight": torch.ones(hidden),
            f"model.layers.{layers}.input_layernorm.weight": torch.ones(hidden),
        }
    )
    save_file(weights, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out, "tokenizer.json")) as f:
        tokenizer = json.load(f)
    tokenizer["added_tokens"] = [t for t in tokenizer["added_tokens"] if t["content"] != "<|mask|>"]
    write_json_atomic(os.path.join(out, "tokenizer.json"), tokenizer)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        with open(os.path.join(out, name)) as f:
            data = json.load(f)
        data.pop("mask_token", None)
        write_json_atomic(os.path.join(out, name), data)
    return out


def ling(root: str, config_path: str) -> dict:
    ling_dir = write_tiny_ling_dir(os.path.join(root, "ling"), seed=3)
    base = [f"model.hf_dir={ling_dir}", "logging.progress_bar=false", "train.steps=2"]
    base += ["diffusion.block_schedule=[{steps: 2, block_size: 1}]"]
    out = {}
    try:
        Trainer(load_config(config_path, base))
    except UserError as e:
        out["no_mask_error"] = str(e)
        out["group_before_error"] = torch.distributed.is_initialized()
    save_dir = os.path.join(root, "ling_run")
    trainer = Trainer(load_config(config_path, base + ["model.mask_token_id=300", f"checkpoint.save_dir={save_dir}"]))
    loaded = gather_hf_state(trainer.chunks, trainer.model_cfg)
    reader = HFCheckpointReader(ling_dir)
    out["loaded_equal_dir"] = all(torch.equal(t, reader.get(n)) for n, t in loaded.items())
    out["loaded_tensors"], out["dir_tensors"] = len(loaded), len(reader.names())
    out["losses"] = [r.loss for r in trainer.run()]
    recorded = read_meta(resolve_checkpoint_dir(save_dir))["hf_config"]
    out["recorded"] = {k: recorded.get(k) for k in ("model_type", "mask_token_id", "num_nextn_predict_layers")}
    converted = convert_hf_to_mcore(ling_dir, os.path.join(root, "ling_mcore"), **QUIET)
    out["converted"] = read_meta(converted)["hf_config"]["model_type"]
    return out


def checkpoint_root(root: str) -> str:
    """Iterations 10, 20, 30 (tiny models of seeds 1, 2, 3; valid_loss 3, 1, 2) and 40 (another config)."""
    runs = os.path.join(root, "runs")
    for it, seed, loss, overrides in (
        (10, 1, 3.0, {}),
        (20, 2, 1.0, {}),
        (30, 3, 2.0, {}),
        (40, 4, 0.5, {"intermediate_size": 96}),
    ):
        hf = os.path.join(root, f"hf{seed}")  # weights and config.json only: no tokenizer to train
        save_reference_model(build_reference_model(preset("tiny", **overrides), seed=seed), hf)
        single = convert_hf_to_mcore(hf, os.path.join(root, f"single{seed}"), **QUIET)
        target = os.path.join(runs, f"iter_{it:07d}")
        shutil.copytree(single, target)
        meta = read_meta(target)
        meta.update(iteration=it, extra=dict(meta["extra"], valid_loss=loss))
        write_json_atomic(os.path.join(target, "megadiff.json"), meta)
    with open(os.path.join(runs, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write("40\n")
    return runs


def exported(root: str, mcore_dir: str, name: str, iteration=None) -> dict:
    out = os.path.join(root, name)
    convert_mcore_to_hf(mcore_dir, out, iteration, **QUIET)
    return HFCheckpointReader(out)


def average(root: str, config_path: str) -> dict:
    runs = checkpoint_root(root)
    out = {}
    avg_dir = os.path.join(root, "avg")
    out["exit_other_config"] = average_main(
        ["--mcore-dir", runs, "--top-k", "2", "--output", avg_dir + "_x", "--no-progress"]
    )
    try:
        average_checkpoints(runs, avg_dir + "_x", iterations=[20, 40], **QUIET)
    except UserError as e:
        out["other_config_error"] = str(e)
    shutil.rmtree(os.path.join(runs, "iter_0000040"))
    out["exit"] = average_main(["--mcore-dir", runs, "--top-k", "2", "--output", avg_dir, "--no-progress"])
    out["averaged"] = [a["iteration"] for a in read_meta(resolve_checkpoint_dir(avg_dir))["extra"]["averaged_from"]]
    mean = exported(root, avg_dir, "hf_avg")
    a, b = exported(root, runs, "hf_20", 20), exported(root, runs, "hf_30", 30)
    worst = 0.0
    for name in mean.names():
        want = (a.get(name).float() + b.get(name).float()) / 2
        worst = max(worst, float((mean.get(name).float() - want).abs().max() / want.abs().max().clamp_min(1e-12)))
    out["max_rel_vs_mean_of_exports"] = worst
    out["tensors"] = len(mean.names())
    trainer = Trainer(load_config(config_path, [f"model.init_from_mcore={avg_dir}", "logging.progress_bar=false"]))
    started = gather_hf_state(trainer.chunks, trainer.model_cfg)
    out["init_from_mcore_equals_export"] = all(torch.equal(t, mean.get(n)) for n, t in started.items())
    trainer.close()
    for it, name in ((10, "bd32"), (20, "full"), (30, "bd32")):  # as a block schedule records them
        path = resolve_checkpoint_dir(runs, it)
        meta = read_meta(path)
        meta["extra"]["phase"] = {"name": name}
        write_json_atomic(os.path.join(path, "megadiff.json"), meta)
    notes = []
    out["top2"] = [it for it, _ in pick_iterations(runs, top_k=2, log=notes.append)]
    out["top2_note"] = notes
    out["top2_bd32"] = [it for it, _ in pick_iterations(runs, top_k=2, phase="bd32", log=notes.append)]
    return out


def sft_validation(root: str, sft_config: str, rows: str) -> dict:
    """SFT rows with data.valid_files: validation at steps 1 and 2, recorded, and the same number when
    measured again on the same weights (the noise is the validation samples', not the step's)."""
    save_dir, metrics = os.path.join(root, "sft_run"), os.path.join(root, "sft_metrics.jsonl")
    overrides = [f"data.valid_files={rows}", "train.eval_interval=1", "train.eval_iters=2", "train.steps=2"]
    overrides += [f"checkpoint.save_dir={save_dir}", f"logging.metrics_file={metrics}", "logging.progress_bar=false"]
    trainer = Trainer(load_config(sft_config, overrides))
    trainer.run()
    with open(metrics) as f:
        logged = [json.loads(line) for line in f if "valid_loss" in line]
    again = trainer.validate()
    return {
        "logged": [(r["step"], r["valid_loss"]) for r in logged],
        "recorded": read_meta(resolve_checkpoint_dir(save_dir))["extra"].get("valid_loss"),
        "again": again,
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", required=True)
    parser.add_argument("--config", required=True, help="a mock-data pretraining config of the tiny model")
    parser.add_argument("--sft-config", required=True, help="an SFT config of the tiny model")
    parser.add_argument("--sft-rows", required=True, help="SFT rows to validate on")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    result = {"ling": ling(args.root, args.config), "average": average(args.root, args.config)}
    result["sft_validation"] = sft_validation(args.root, args.sft_config, args.sft_rows)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
