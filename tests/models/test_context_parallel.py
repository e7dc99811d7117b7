"""Context parallelism without processes: the zig-zag partition, each rank's local-query BlockMask
against the whole mask, the visible-pair balance of packed block-diffusion rows, the trainer's split
of a micro-batch (its loss terms and denominator shares add up to the whole row's), and every config
the trainer refuses at load, naming the keys. The parallel runs are tests/dist/test_context_parallel.py."""

import pytest
import torch

from megadiff.data.packing import collate_rows, pack_samples
from megadiff.diffusion.block_mask import block_mask_for
from megadiff.diffusion.masks import (
    block_diffusion_mask,
    full_attention_mask,
    visible_keys_per_query,
)
from megadiff.models.common.context_parallel import (
    gathered_positions,
    sequence_multiple,
    visible_pairs_per_rank,
    zigzag_positions,
)
from megadiff.training.batch import loss_denominator, prepare_micro_batch
from megadiff.training.config import DiffusionSection, TrainingConfigError, load_config
from megadiff.training.context_parallel import loss_denominator_share, split_micro_batch

BASE = ["model.hf_dir=m", "data.train_files=d.jsonl"]


def packed(lengths_per_row, seq):
    """doc_ids / position_ids [rows, seq] of rows packed with documents of these lengths (the rest:
    a fill document)."""
    doc = torch.zeros(len(lengths_per_row), seq, dtype=torch.long)
    pos = torch.zeros_like(doc)
    for row, lengths in enumerate(lengths_per_row):
        start = 0
        for d, n in enumerate([*lengths, seq - sum(lengths)]):
            doc[row, start : start + n], pos[row, start : start + n] = d, torch.arange(n)
            start += n
    return doc, pos


@pytest.mark.parametrize("cp", [1, 2, 4])
def test_zigzag_partition_is_disjoint_equal_and_puts_each_ranks_x_t_tokens_first(cp):
    seq = 48
    parts = [zigzag_positions(2 * seq, cp, r) for r in range(cp)]
    assert torch.equal(torch.sort(torch.cat(parts)).values, torch.arange(2 * seq))
    assert torch.equal(gathered_positions(2 * seq, cp), torch.cat(parts))
    for r, part in enumerate(parts):  # megatron-core's zig-zag: chunks r and 2cp-1-r of 2cp
        chunk = seq // cp
        assert torch.equal(part[:chunk], torch.arange(r * chunk, (r + 1) * chunk))
        assert bool((part[:chunk] < seq).all() and (part[chunk:] >= seq).all())  # [x_t part ; x_0 part]
    with pytest.raises(ValueError, match="not a multiple of 2\\*cp"):
        zigzag_positions(10, 4, 0)
    assert sequence_multiple(1, 8) == 1 and sequence_multiple(2, 1) == 4 and sequence_multiple(2, 4) == 8


@pytest.mark.parametrize("mode, cp", [("bd", 2), ("bd", 4), ("full", 2), ("full", 4)])
def test_each_ranks_block_mask_is_its_rows_of_the_whole_mask_against_gathered_keys(mode, cp):
    """Local query i of rank r is global position zigzag(r)[i]; gathered key j is
    gathered_positions[j]: the mask_mod and the BlockMask's tiles agree with the dense mask."""
    seq, block = 160, 4  # 2S = 320: three 128-key tiles
    doc, pos = packed([[37, 61, 20], [100]], seq)
    whole = block_diffusion_mask(doc, pos, block) if mode == "bd" else full_attention_mask(doc)
    n = whole.shape[-1]
    keys = gathered_positions(n, cp)
    for r in range(cp):
        bm = block_mask_for(doc, pos, mode, block, "cpu", cp, r)
        assert bm.seq_lengths == (n // cp, n)
        want = whole[:, zigzag_positions(n, cp, r)][:, :, keys]  # [B, n/cp, n]
        q, kv = torch.meshgrid(torch.arange(n // cp), torch.arange(n), indexing="ij")
        for b in range(doc.shape[0]):
            got = bm.mask_mod(torch.tensor(b), torch.tensor(0), q, kv)
            assert torch.equal(got, want[b]), (mode, cp, r, b)
        # every visible pair lies in a tile the BlockMask lists (partial or full)
        listed = bm.to_dense()[:, 0].bool()  # [B, q tiles, kv tiles]
        pad_q, pad_kv = -want.shape[1] % 128, -want.shape[2] % 128
        tiles = torch.nn.functional.pad(want, (0, pad_kv, 0, pad_q))
        tiles = tiles.view(want.shape[0], tiles.shape[1] // 128, 128, tiles.shape[2] // 128, 128).any(4).any(2)
        assert bool((tiles <= listed[:, : tiles.shape[1], : tiles.shape[2]]).all())


def test_visible_keys_per_query_are_the_row_sums_of_the_masks():
    doc, pos = packed([[5, 11, 3], [19], [7, 7, 7]], 30)
    for block in (1, 4, 8):
        assert torch.equal(visible_keys_per_query(doc, pos, "bd", block), block_diffusion_mask(doc, pos, block).sum(-1))
    assert torch.equal(visible_keys_per_query(doc, pos, "full"), full_attention_mask(doc).sum(-1))


def test_zigzag_balances_visible_pairs_of_packed_bd_rows_exactly_at_cp2():
    """x_t and x_0 tokens of one position see equally many keys, and rank r holds x_t chunk r and
    x_0 chunk cp-1-r: at cp=2 both ranks get exactly half of every packed row's pairs (max/min =
    1); cp = 4 and 8 are measured in benchmarks/context_parallel.py."""
    g = torch.Generator().manual_seed(0)
    lengths = torch.exp(torch.randn(300, generator=g) + 5.0).clamp(16, 1024).long().tolist()
    rows, _ = pack_samples([(list(range(1, n + 1)), n // 4) for n in lengths], 1024, 0)
    batch = collate_rows(rows)
    keys = visible_keys_per_query(batch["doc_ids"], batch["position_ids"], "bd", 32)
    for row in range(keys.shape[0]):
        a, b = visible_pairs_per_rank(keys[row : row + 1], 2)
        assert a == b > 0
    whole = sum(visible_pairs_per_rank(keys, 4))
    assert whole == int(keys.sum())


def _prepared(mode, complementary=False):
    """A prepared micro-batch of two packed rows (S = 32) with answers in three documents."""
    seq = 32
    doc, pos = packed([[12, 20], [5, 11, 10]], seq)
    g = torch.Generator().manual_seed(3)
    raw = {
        "input_ids": torch.randint(1, 100, (2, seq), generator=g),
        "position_ids": pos,
        "doc_ids": doc,
        "loss_mask": pos >= 3,
        "sample_ids": doc + 10 * torch.arange(2)[:, None],
        "epoch": torch.zeros(2, dtype=torch.long),
    }
    d = DiffusionSection(mode=mode, block_size=4, complementary_masks=complementary)
    return prepare_micro_batch(raw, d, 0, seed=1, with_dense_mask=False)


@pytest.mark.parametrize("mode, cp", [("block_diffusion", 2), ("block_diffusion", 4), ("full", 2), ("full", 4)])
def test_the_ranks_parts_of_a_micro_batch_add_up_to_the_whole(mode, cp):
    whole = _prepared(mode, complementary=mode == "full")
    seq = whole["targets"].shape[1]
    parts = [split_micro_batch(dict(whole), mode, cp, r) for r in range(cp)]
    model_len = whole["input_ids"].shape[1]
    ids = torch.empty_like(whole["input_ids"])
    for r, part in enumerate(parts):
        mine = zigzag_positions(model_len, cp, r)
        ids[:, mine] = part["input_ids"]
        xt = mine[mine < seq]
        for key in ("targets", "masked", "edited", "t", "loss_mask"):
            assert torch.equal(part[key], whole[key][:, xt]), key
        assert torch.equal(part["position_ids"], whole["position_ids"])  # whole rows: RoPE slices itself
        assert torch.equal(part["doc_ids"], whole["doc_ids"])
    assert torch.equal(ids, whole["input_ids"])
    for normalize in ("masked_tokens", "answer_tokens", "sequence"):
        shares = sum(float(loss_denominator_share(p, normalize)) for p in parts)
        assert shares == float(loss_denominator(whole, normalize)) > 0, normalize
    # the answer length of a token's document comes from the whole row, wherever the document lies
    lengths = torch.cat([p["answer_length"] for p in parts], 1)
    for r, part in enumerate(parts):
        for row in range(whole["doc_ids"].shape[0]):
            for col in range(part["loss_mask"].shape[1]):
                glob = zigzag_positions(model_len, cp, r)
                glob = glob[glob < seq][col]
                doc = whole["doc_ids"][row, glob]
                want = int((whole["loss_mask"][row] & (whole["doc_ids"][row] == doc)).sum())
                assert int(part["answer_length"][row, col]) == want
    assert lengths.shape[1] == seq
    with pytest.raises(ValueError, match="'mystery'"):
        split_micro_batch(dict(whole, mystery=torch.zeros_like(whole["targets"])), mode, cp, 0)
    assert split_micro_batch(whole, mode, 1, 0) is whole


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["parallel.cp=2", "model.attention_backend=dense"], r"parallel.cp=2 needs model.attention_backend=flex"),
        (["parallel.cp=2", "data.max_seq_len=102"], r"data.max_seq_len=102 is not a multiple of 4 .*parallel.cp"),
        (
            ["parallel.cp=4", "parallel.tp=2", "data.max_seq_len=1004"],
            r"data.max_seq_len=1004 is not a multiple of 8 .* use data.max_seq_len=1000 or 1008",
        ),
        (["parallel.cp=2", "train.objective=dpo"], r"train.objective=dpo with parallel.cp=2 is not supported"),
        (["parallel.cp=0"], r"parallel.cp must be >= 1, got 0"),
    ],
)
def test_context_parallel_configs_that_cannot_run_are_refused_at_load(overrides, message):
    with pytest.raises(TrainingConfigError, match=message):
        load_config(None, BASE + overrides)


def test_cp_that_does_not_divide_the_world_and_recomputed_flex_are_refused_before_building():
    from megadiff.platform.kernels import Environment
    from megadiff.training.config import parallel_layout
    from megadiff.training.perf_preflight import check_perf, choose_attention_backend
    from megadiff.training.setup import check_layout_fits_processes

    cfg = load_config(None, BASE + ["parallel.cp=2", "parallel.tp=2"])
    with pytest.raises(TrainingConfigError, match=r"parallel.tp=2, parallel.cp=2, .*multiple of 4 processes .* 6"):
        check_layout_fits_processes(parallel_layout(cfg), 6)
    check_layout_fits_processes(parallel_layout(cfg), 8)
    env = Environment(on_cuda=False)
    assert choose_attention_backend(cfg, env, 4, 2, 4).backend == "flex"  # auto -> flex under CP, also on the CPU
    recompute = load_config(None, BASE + ["parallel.cp=2", "perf.recompute_granularity=selective"])
    with pytest.raises(TrainingConfigError, match=r"parallel.cp=2 \(which attends through flex\)"):
        check_perf(recompute, env)
    check_perf(
        load_config(
            None, BASE + ["parallel.cp=2", "perf.recompute_granularity=selective", "perf.recompute_modules=[mlp,moe]"]
        ),
        env,
    )


def test_planner_forecasts_cp_and_plans_name_it(tiny_run_dir, monkeypatch):
    """CP divides the activations in the forecast (not the weights); at 64k tokens per row only CP
    layouts (with MoE/MLP recompute) fit llada2-mini on 8 x 80 GB; the plan JSON names cp; the
    trainer's memory check forecasts its own cp."""
    import json

    from megadiff.models.llada2 import LLaDA2ModelConfig, ParallelLayout, preset
    from megadiff.planner import Hardware, RunShape, forecast, plan_layouts
    from megadiff.planner.report import as_json
    from megadiff.training import memory_check
    from megadiff.training.config import parallel_layout

    mini = LLaDA2ModelConfig.from_hf_dict(preset("llada2-mini"))
    shape = RunShape(seq_len=32768)
    one, four = (forecast(mini, ParallelLayout(tp=2, ep=4, etp=2, cp=cp), Hardware(), shape) for cp in (1, 4))
    assert four.activations < 0.3 * one.activations and four.weights == one.weights
    plans = plan_layouts(mini, Hardware(), RunShape(seq_len=65536, recompute="auto"))
    fits = [p for p in plans if p.reason is None]
    assert fits and all(p.layout.cp > 1 and p.recompute == ("selective", ("mlp", "moe")) for p in fits)
    assert "parallel.cp=" in fits[0].command() and "perf.recompute_modules=[mlp,moe]" in fits[0].command()
    data = json.loads(as_json(fits[:1], {}, "C.yaml"))
    assert data["plans"][0]["layout"]["cp"] == fits[0].layout.cp
    monkeypatch.setenv("WORLD_SIZE", "4")
    cfg = load_config(str(tiny_run_dir / "cfg.yaml"), ["parallel.cp=2", "parallel.tp=2"])
    model_cfg = LLaDA2ModelConfig.from_hf_dict(json.loads((tiny_run_dir / "hf" / "config.json").read_text()))
    lines = []
    memory_check.check_memory_forecast(cfg, model_cfg, parallel_layout(cfg), torch.float32, lines.append)
    assert lines[0].startswith("memory forecast per GPU at tp=2,ep=1,etp=2,pp=1,cp=2 (dp=1)")
