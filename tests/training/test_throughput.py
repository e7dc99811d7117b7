"""The model-FLOP formula against a hand count, MFU peaks, and the metrics a step logs
(tokens/s average without the first step, TFLOP/s, MFU, time split, memory n/a on CPU, plain
lines instead of '\\r' frames when stdout is not a terminal)."""

import io
import json

import pytest
import torch

from megadiff.diffusion.masks import block_diffusion_mask, full_attention_mask
from megadiff.models.llada2 import LLaDA2ModelConfig
from megadiff.training.config import load_config
from megadiff.training.logging import MetricsLogger
from megadiff.training.loop import StepResult
from megadiff.training.throughput import active_params, peak_tflops, step_flops, token_counts, visible_pairs

# hidden 8, 2 heads of 4, 1 kv head, layer 0 dense (ffn 16), layer 1 MoE (4 experts of 4, top-2, 1 shared)
TINY = LLaDA2ModelConfig(
    vocab_size=32, hidden_size=8, intermediate_size=16, moe_intermediate_size=4, num_hidden_layers=2,
    num_attention_heads=2, num_key_value_heads=1, head_dim=4, num_experts=4, num_experts_per_tok=2,
    num_shared_experts=1, first_k_dense_replace=1,
)  # fmt: skip


def test_active_params_hand_count():
    # attention per layer: q 8*8 + o 8*8 + k 8*4 + v 8*4 = 192
    # dense MLP: 3*8*16 = 384; MoE: router 8*4 = 32 + (2 routed + 1 shared) * 3*8*4 = 288 -> 320
    assert active_params(TINY).body == 2 * 192 + 384 + 320 == 1088
    assert active_params(TINY).head == 8 * 32 == 256


def batch():
    # one row of 6: document A (4 tokens), document B (1 token), 1 padding token (sample id -1)
    return dict(
        doc_ids=torch.tensor([[0, 0, 0, 0, 1, 1]]),
        sample_ids=torch.tensor([[0, 0, 0, 0, 1, -1]]),
        position_ids=torch.tensor([[0, 1, 2, 3, 0, 0]]),
    )


def test_step_flops_hand_count():
    # block diffusion, block size 2. Document A (blocks of 2, 2): x_t->x_t 4+4, x_t->x_0 0+4,
    # x_0->x_0 4+8 = 24 pairs; document B (one block of 1): 1 + 0 + 1 = 2 pairs -> 26.
    # Attention per pair: 12 * heads 2 * head_dim 4 * layers 2 = 192 FLOPs.
    # 5 real tokens -> 10 body tokens ([x_t ; x_0]); head on x_t only: 5 tokens.
    assert visible_pairs([4, 1], "block_diffusion", 2) == 26
    assert (
        step_flops(TINY, [batch()], "block_diffusion", 2, xt_only_head=True)
        == (6 * 1088 * 10 + 6 * 256 * 5 + 192 * 26)
        == 77952
    )
    assert (
        step_flops(TINY, [batch()], "block_diffusion", 2, xt_only_head=False) == 6 * 1088 * 10 + 6 * 256 * 10 + 192 * 26
    )
    # full attention: 4^2 + 1^2 = 17 pairs over 5 tokens
    assert step_flops(TINY, [batch()], "full", 2, xt_only_head=True) == 6 * 1088 * 5 + 6 * 256 * 5 + 192 * 17 == 43584


@pytest.mark.parametrize("block", [1, 3, 4, 32])
def test_visible_pairs_equal_the_masks(block):
    lengths = [7, 1, 12, 5]
    doc = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None]
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    assert visible_pairs(lengths, "block_diffusion", block) == int(block_diffusion_mask(doc, pos, block).sum())
    assert visible_pairs(lengths, "full", block) == int(full_attention_mask(doc).sum())


def test_peak_table():
    assert peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == 989.0
    assert peak_tflops("NVIDIA H200", "fp8") == 1979.0
    assert peak_tflops("NVIDIA B200", "bf16") == 2250.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB", "fp8") is None
    assert peak_tflops("Tesla T4", "bf16") is None


class NotATerminal(io.StringIO):
    def isatty(self):
        return False


def test_non_tty_progress_is_one_line_every_log_interval(tmp_path):
    cfg = load_config(None, ["model.hf_dir=m", "data.train_files=d", "logging.log_interval=5",
                             f"logging.metrics_file={tmp_path / 'm.jsonl'}"])  # fmt: skip
    stream = NotATerminal()
    logger = MetricsLogger(cfg, total_steps=20, world_size=2, peak_tflops=100.0, stream=stream)
    for step in range(1, 21):
        seconds = 10.0 if step == 1 else 0.5  # the first step compiles
        result = StepResult(step, 1.0, 1e-3, 0.5, 1000, False, flops=2e14, data_s=0.1, fwd_bwd_s=0.3, optimizer_s=0.1)
        logger.log(result, seconds=seconds)
    logger.close()
    out = stream.getvalue()
    assert "\r" not in out
    lines = out.splitlines()
    assert [line.split()[1] for line in lines] == ["5/20", "10/20", "15/20", "20/20"]
    assert "TFLOP/s/GPU 200.0" in lines[-1] and "MFU 200.0%" in lines[-1]
    assert "data/fwd-bwd/opt 0.100/0.300/0.100s" in lines[-1] and "mem alloc/reserved n/a/n/a GiB" in lines[-1]
    records = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert records[0]["tokens_per_s"] == 100 and records[0]["tokens_per_s_avg"] is None
    assert records[-1]["tokens_per_s_avg"] == 2000  # the first (compiling) step is left out
    assert records[-1]["tflops_per_gpu"] == 2e14 / 2 / 0.5 / 1e12 == 200.0
    assert records[-1]["mfu"] == 2.0 and records[-1]["max_allocated_gib"] is None


def python_counts(doc_ids, sample_ids, mode, block):
    """The counts as the trainer once computed them: a loop over every token on the host."""
    lengths = []
    for row_docs, row_samples in zip(doc_ids.tolist(), sample_ids.tolist(), strict=True):
        counts: dict[int, int] = {}
        for doc, sample in zip(row_docs, row_samples, strict=True):
            if sample >= 0:
                counts[doc] = counts.get(doc, 0) + 1
        lengths.extend(counts.values())
    return sum(lengths), visible_pairs(lengths, mode, block)


@pytest.mark.parametrize("mode", ["full", "block_diffusion"])
def test_vectorised_token_counts_equal_the_per_token_loop(mode):
    """Random packed rows (documents of 1-20 tokens, pack-mode fill with sample id -1): real tokens
    and visible pairs, block sizes 1-9."""
    g = torch.Generator().manual_seed(0)
    for trial in range(40):
        rows, seq = 3, 48
        doc_ids, sample_ids = torch.zeros(rows, seq, dtype=torch.long), torch.full((rows, seq), -1)
        for r in range(rows):
            col, doc = 0, 0
            while col < seq:
                n = min(int(torch.randint(1, 21, (), generator=g)), seq - col)
                doc_ids[r, col : col + n] = doc
                if torch.rand((), generator=g) > 0.2:  # a real document (else fill)
                    sample_ids[r, col : col + n] = trial * 100 + r * 10 + doc
                col, doc = col + n, doc + 1
        block = int(torch.randint(1, 10, (), generator=g))
        real, pairs = token_counts(doc_ids, sample_ids, mode, block)
        assert (int(real), int(pairs)) == python_counts(doc_ids, sample_ids, mode, block), (trial, block)
