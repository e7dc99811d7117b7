"""The tiny preference task: does DPO on the diffusion ELBO move an SFT'd tiny model toward the chosen style?

Same arithmetic prompts, two correct answer styles: chosen "The answer is 7.", rejected "7"
(megadiff.data.synthetic_preference). Steps: SFT the tiny model on both styles (half each), then DPO
from it on the pairs; on HELD-OUT prompts, measure before (SFT) and after (DPO):
  - ELBO margin: mean over pairs of B(chosen) - B(rejected), B from 8 fixed Monte Carlo (t, mask)
    samples (the same ones for both models, so the change is DPO's implicit reward margin / beta);
  - style: the fraction of greedy block-diffusion answers that start with "The answer is".
A few CPU minutes (not in CI):

    .venv/bin/python benchmarks/dpo_style.py [--out /tmp/dpo_style] [--sft-steps 150] [--dpo-steps 40]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from megadiff.data.preference import read_preference_rows, tokenize_pairs  # noqa: E402
from megadiff.data.synthetic_preference import CHOSEN_PREFIX, style_pairs, style_sft_rows  # noqa: E402
from megadiff.diffusion.masks import block_diffusion_mask  # noqa: E402
from megadiff.hf.tiny import write_tiny_model_dir  # noqa: E402
from megadiff.inference.loading import load_model  # noqa: E402
from megadiff.inference.sampler import DecodingOptions, generate  # noqa: E402

BLOCK = 8


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def train(config: dict, out: Path, name: str) -> None:
    cfg = out / f"{name}.json"  # JSON is YAML
    cfg.write_text(json.dumps(config))
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", MEGADIFF_DEVICE="cpu")
    subprocess.run([torchrun, "--nproc-per-node", "1", str(REPO / "tools/train.py"), str(cfg)], env=env, check=True)


@torch.no_grad()
def elbo(model, ids: list[int], prompt_len: int, mask_id: int, samples: int, seed: int) -> float:
    """Block-diffusion ELBO estimate of the answer given the prompt, as training computes it:
    input [x_t ; x_0] with the block-diffusion mask, 1/t weight; the noise is fixed by `seed`."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.tensor(ids)
    n = len(ids)
    positions = torch.arange(n)
    allowed = block_diffusion_mask(torch.zeros(1, n, dtype=torch.long), positions[None], BLOCK)
    answer = positions >= prompt_len
    total = 0.0
    for _ in range(samples):
        t = 0.3 + 0.5 * torch.rand((), generator=g).item()
        masked = answer & (torch.rand(n, generator=g) < t)
        x_t = torch.where(masked, torch.tensor(mask_id), x0)
        logits = model(torch.cat([x_t, x0])[None], torch.cat([positions, positions])[None], allowed).logits[0, :n]
        total -= float(F.cross_entropy(logits[masked], x0[masked], reduction="sum")) / t
    return total / samples


def evaluate(model_dir, heldout_pairs, prompts, tokenizer, mask_id: int) -> dict:
    model = load_model(str(model_dir))
    margins = [
        elbo(model, *c, mask_id, 8, seed=i) - elbo(model, *r, mask_id, 8, seed=10_000 + i)
        for i, (c, r) in enumerate(heldout_pairs)
    ]
    options = DecodingOptions(gen_length=16, block_length=BLOCK, steps=BLOCK, threshold=1.0)
    result = generate(model, prompts, options, mask_id, tokenizer.eos_token_id)
    texts = [tokenizer.decode(t, skip_special_tokens=True).strip() for t in result.tokens]
    return {
        "elbo_margin": sum(margins) / len(margins),
        "chosen_style": sum(t.startswith(CHOSEN_PREFIX) for t in texts) / len(texts),
        "examples": texts[:4],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="/tmp/dpo_style")
    parser.add_argument("--sft-steps", type=int, default=150)
    parser.add_argument("--dpo-steps", type=int, default=40)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    hf = out / "hf"
    write_tiny_model_dir(str(hf), seed=0)
    sft_data = write_jsonl(out / "sft.jsonl", style_sft_rows(64, seed=1))
    pairs = write_jsonl(out / "pairs.jsonl", style_pairs(64, seed=1))
    heldout = write_jsonl(out / "heldout.jsonl", style_pairs(32, seed=99))
    common = {"diffusion": {"mode": "block_diffusion", "block_size": BLOCK}, "logging": {"progress_bar": False}}
    if not (out / "sft").exists():
        train({"model": {"hf_dir": str(hf)}, "data": {"train_files": str(sft_data), "max_seq_len": 256},
               "train": {"steps": args.sft_steps, "global_batch_size": 8, "lr": 3e-3, "weight_decay": 0.0,
                         "lr_schedule": "constant"},
               "checkpoint": {"save_dir": str(out / "sft")}, **common}, out, "sft")  # fmt: skip
    sft_iter = out / "sft" / f"iter_{args.sft_steps:07d}"
    train({"model": {"hf_dir": str(hf), "init_from_mcore": str(sft_iter)},
           "data": {"train_files": str(pairs), "max_seq_len": 256},
           "train": {"objective": "dpo", "steps": args.dpo_steps, "global_batch_size": 8, "lr": 5e-4,
                     "weight_decay": 0.0, "lr_schedule": "constant"},
           "dpo": {"beta": 0.1, "mc_samples": 2}, "checkpoint": {"save_dir": str(out / "dpo"), "resume": False},
           "logging": {"progress_bar": False, "metrics_file": str(out / "dpo_metrics.jsonl")},
           "diffusion": common["diffusion"]}, out, "dpo")  # fmt: skip
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(hf))
    mask_id = tokenizer.convert_tokens_to_ids("<|mask|>")
    rows, _ = read_preference_rows(heldout)
    tokenized = tokenize_pairs(rows, tokenizer, mask_id)
    prompts = [c[0][: c[1]] for c, _ in tokenized]
    report = {
        "before (SFT)": evaluate(sft_iter, tokenized, prompts, tokenizer, mask_id),
        "after (DPO)": evaluate(out / "dpo" / f"iter_{args.dpo_steps:07d}", tokenized, prompts, tokenizer, mask_id),
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
