"""Context parallelism on the CPU: per-rank activation memory and step time at CP = 1, 2, 4, the
visible-pair balance of packed block-diffusion rows, and the K/V all-gather bytes per layer.

Per (S, cp) one torchrun launch of cp processes (gloo, fp32, one thread each) trains one packed
block-diffusion row of S tokens (2S through the model) of a small LLaDA2 (the tiny preset's hidden
size 64 and heads, --layers layers, block 32, flex attention) through the trainer's own path: noise,
local-query BlockMask, the CP split, the x_t-only head and the diffusion loss, forward + backward.
Per rank: the bytes autograd saves in the forward (unique storages, parameters excluded: the
activation memory held for backward, which is what CP divides; the planner's forecast for the same
shape beside it), the step's wall and CPU seconds (median of --repeats after a warm-up step that
compiles flex), the visible (query, key) pairs and 128x128 flex tiles of its queries, and the bytes
its K/V all-gather receives per layer.

Balance (no processes): over all rows of a packed SFT-like set (log-normal lengths, median 665
tokens) at each S, the max/min ratio across CP ranks of visible pairs and of flex tiles for the
zig-zag partition megadiff uses and for a per-document head/tail split.

    python benchmarks/context_parallel.py --lengths 4096 8192 16384 --cps 1 2 4 --out cp.json
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

BLOCK = 32


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384], help="S (the model sees 2S)")
    p.add_argument("--cps", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--balance-cps", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--layers", type=int, default=2, help="decoder layers (dense first, then MoE)")
    p.add_argument("--repeats", type=int, default=2, help="timed steps after the warm-up (median)")
    p.add_argument("--out", default=None, help="write every number as JSON here")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def packed_rows(seq_len: int, seed: int = 0):
    """Packed rows (collated dict) of log-normal SFT-like samples (answers: the last 4/5)."""
    import torch

    from megadiff.data.packing import collate_rows, pack_samples

    g = torch.Generator().manual_seed(seed)
    count = max(64, 6 * seq_len // 665)
    lengths = torch.exp(torch.randn(count, generator=g) + 6.5).clamp(16, seq_len).long().tolist()
    rows, _ = pack_samples([(list(range(1, n + 1)), n // 5) for n in lengths], seq_len, 0)
    return collate_rows(rows)


# ------------------------------------------------------------------ balance (no processes)


def per_document_parts(doc_row, cp: int):
    """Per-document head/tail: each document cut into 2*cp pieces, rank r takes pieces r and
    2cp-1-r of every document (positions of S; the same for x_t and x_0)."""
    import torch

    seq = doc_row.shape[0]
    starts = [0, *(torch.nonzero(doc_row[1:] != doc_row[:-1]).flatten() + 1).tolist(), seq]
    parts = [[] for _ in range(cp)]
    for a, e in zip(starts[:-1], starts[1:], strict=True):
        bounds = [a + (e - a) * i // (2 * cp) for i in range(2 * cp + 1)]
        for r in range(cp):
            parts[r] += [torch.arange(bounds[c], bounds[c + 1]) for c in (r, 2 * cp - 1 - r)]
    return [torch.cat(p) for p in parts]


def flex_tiles(mask_mod, queries, keys, tile: int = 128) -> int:
    """128x128 tiles flex computes (partial + full) for these global query / key positions: the
    (query tile, key tile) pairs with at least one visible pair, counted one query tile at a time
    (a BlockMask of the whole grid would hold [2S, 2S] intermediates; inductor's CPU code for a
    compiled one with gathered positions does not build)."""
    import torch

    total, pad = 0, -len(keys) % tile
    for start in range(0, len(queries), tile):
        q = queries[start : start + tile]
        visible = mask_mod(torch.tensor(0), torch.tensor(0), q[:, None], keys[None, :])
        visible = torch.nn.functional.pad(visible.expand(len(q), len(keys)), (0, pad))
        total += int(visible.view(len(q), -1, tile).any(2).any(0).sum())
    return total


def balance(seq_len: int, cps, tile_rows: int = 6) -> dict:
    """max/min over CP ranks of visible pairs (every row) and flex tiles (`tile_rows` rows with the
    most documents), zig-zag vs per-document head/tail; means and worst rows."""
    import torch

    from megadiff.diffusion.masks import block_diffusion_mask_mod, visible_keys_per_query
    from megadiff.models.common.context_parallel import gathered_positions, visible_pairs_per_rank, zigzag_positions

    rows = packed_rows(seq_len)
    doc, pos = rows["doc_ids"], rows["position_ids"]
    keys = visible_keys_per_query(doc, pos, "bd", BLOCK)  # [rows, 2S]
    docs_per_row = (doc.max(dim=1).values + 1).tolist()
    busiest = sorted(range(doc.shape[0]), key=lambda i: -docs_per_row[i])[:tile_rows]
    out = {"rows": doc.shape[0], "documents_per_row": statistics.mean(docs_per_row)}
    for cp in cps:
        ratios = {"zigzag": [], "per_document": []}
        for i in range(doc.shape[0]):
            zz = visible_pairs_per_rank(keys[i : i + 1], cp)
            pd = [int(keys[i, torch.cat([p, p + seq_len])].sum()) for p in per_document_parts(doc[i], cp)]
            ratios["zigzag"].append(max(zz) / min(zz))
            ratios["per_document"].append(max(pd) / min(pd))
        tiles = {"zigzag": [], "per_document": []}
        for i in busiest:
            mask_mod = block_diffusion_mask_mod(doc[i : i + 1], pos[i : i + 1], BLOCK, seq_len)
            n = 2 * seq_len
            zz = [flex_tiles(mask_mod, zigzag_positions(n, cp, r), gathered_positions(n, cp)) for r in range(cp)]
            parts = per_document_parts(doc[i], cp)
            pd = [flex_tiles(mask_mod, torch.cat([p, p + seq_len]), torch.arange(n)) for p in parts]
            tiles["zigzag"].append((max(zz), min(zz)))
            tiles["per_document"].append((max(pd), min(pd)))
        out[f"cp{cp}"] = {
            name: {
                "pairs_ratio_mean": statistics.mean(ratios[name]),
                "pairs_ratio_worst": max(ratios[name]),
                "tiles_ratio_mean": statistics.mean(hi / lo for hi, lo in tiles[name]),
                "tiles_slowest_rank_mean": statistics.mean(hi for hi, _ in tiles[name]),
            }
            for name in ratios
        }
    return out


# ------------------------------------------------------------------ child: one (S, cp) launch


def child(seq_len: int, layers: int, repeats: int) -> None:
    from megadiff.platform import install_import_hook

    install_import_hook()
    import torch
    from megatron.core import parallel_state as ps

    from megadiff.diffusion.block_mask import block_mask_for
    from megadiff.diffusion.masks import visible_keys_per_query
    from megadiff.models.common.attention import FlexCoreAttention
    from megadiff.models.common.context_parallel import visible_pairs_per_rank
    from megadiff.models.common.schedule import forward_backward
    from megadiff.models.llada2 import LLaDA2ModelConfig, ParallelLayout, preset
    from megadiff.models.llada2.model import build_model
    from megadiff.planner.memory import RunShape, activation_bytes_per_layer
    from megadiff.platform import init_distributed, initialize_parallel
    from megadiff.training.batch import prepare_micro_batch
    from megadiff.training.config import DiffusionSection
    from megadiff.training.context_parallel import loss_denominator_share, split_micro_batch
    from megadiff.training.ddp import wrap_ddp
    from megadiff.training.loss import diffusion_loss_sums

    torch.set_num_threads(1)
    init_distributed()
    cp = torch.distributed.get_world_size()
    layout = ParallelLayout(cp=cp)
    initialize_parallel(layout)
    rank = ps.get_context_parallel_rank()
    cfg_dict = dict(preset("tiny"), num_hidden_layers=layers, max_position_embeddings=seq_len)
    model_cfg = LLaDA2ModelConfig.from_hf_dict(cfg_dict)
    chunks = wrap_ddp(
        build_model(model_cfg, layout, attention_backend="flex", xt_only_logits=True, calculate_per_token_loss=True)
    )
    rows = packed_rows(seq_len)
    row = max(range(rows["doc_ids"].shape[0]), key=lambda i: int(rows["doc_ids"][i].max()))  # many documents
    raw = {k: v[row : row + 1] for k, v in rows.items()}
    raw["epoch"] = torch.zeros(1, dtype=torch.long)
    raw["input_ids"] = raw["input_ids"] % model_cfg.vocab_size
    d = DiffusionSection(block_size=BLOCK)
    whole = prepare_micro_batch(raw, d, 0, seed=0, with_dense_mask=False)
    whole["allowed"] = block_mask_for(whole["doc_ids"], raw["position_ids"], "bd", BLOCK, "cpu", cp, rank)
    local = split_micro_batch(whole, d.mode, cp, rank)
    denominator = torch.tensor(float(loss_denominator_share(local, d.normalize)), dtype=torch.double)
    torch.distributed.all_reduce(denominator)

    def loss_fn(batch, output):
        loss = diffusion_loss_sums(output, batch, d)["numerator"] / float(denominator)
        return loss, torch.zeros((), dtype=torch.int), {}

    gathered = []
    for c in chunks:
        for m in c.modules():
            if isinstance(m, FlexCoreAttention):
                m.register_forward_pre_hook(
                    lambda mod, args: gathered.append(2 * args[1].numel() * args[1].element_size())
                )

    def step(count_saved=False):
        for c in chunks:
            c.train()
            c.zero_grad_buffer()
        params = {p.untyped_storage().data_ptr() for c in chunks for p in c.parameters()}
        seen = {}

        def pack(t):
            storage = t.untyped_storage()
            if storage.data_ptr() not in params:
                seen[storage.data_ptr()] = storage.nbytes()
            return t

        hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t) if count_saved else None
        wall, cpu = time.perf_counter(), time.process_time()
        if hooks:
            with hooks:
                forward_backward(chunks, [local], loss_fn)
        else:
            forward_backward(chunks, [local], loss_fn)
        return time.perf_counter() - wall, time.process_time() - cpu, sum(seen.values())

    _, _, saved = step(count_saved=True)  # warm-up (compiles flex for this shape) and activation bytes
    gathered_per_layer = gathered[0] * (cp - 1) if cp > 1 else 0  # received from the other ranks
    times = [step() for _ in range(repeats)]
    keys = visible_keys_per_query(whole["doc_ids"], raw["position_ids"], "bd", BLOCK)
    bm = whole["allowed"]
    tiles = int(bm.kv_num_blocks.sum()) + (0 if bm.full_kv_num_blocks is None else int(bm.full_kv_num_blocks.sum()))
    shape = RunShape(seq_len=seq_len, dtype="fp32", attention_backend="flex")
    forecast = sum(
        sum(activation_bytes_per_layer(model_cfg, layout, shape, moe=i >= model_cfg.first_k_dense_replace).values())
        for i in range(layers)
    )
    mine = {
        "rank": rank,
        "saved_bytes": saved,
        "forecast_layer_bytes": forecast,
        "wall_s": statistics.median(t[0] for t in times),
        "cpu_s": statistics.median(t[1] for t in times),
        "visible_pairs": visible_pairs_per_rank(keys, cp)[rank],
        "flex_tiles": tiles,
        "allgather_bytes_per_layer": gathered_per_layer,
        "documents": int(raw["doc_ids"].max()) + 1,
    }
    everyone = [None] * cp
    torch.distributed.all_gather_object(everyone, mine)
    if rank == 0:
        print("RESULT " + json.dumps(everyone), flush=True)
    torch.distributed.destroy_process_group()


# ------------------------------------------------------------------ parent


def launch(seq_len: int, cp: int, args, tries: int = 3) -> list[dict]:
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    import socket

    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", MEGADIFF_DEVICE="cpu", PYTHONWARNINGS="ignore")
    for _ in range(tries):  # a free port may be taken before torchrun binds it (other jobs on the machine)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [torchrun, "--nproc-per-node", str(cp), "--master-port", str(port), __file__]
        cmd += ["--child", str(seq_len), "--layers", str(args.layers), "--repeats", str(args.repeats)]
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        if "EADDRINUSE" not in proc.stdout + proc.stderr:
            break
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{(proc.stdout + proc.stderr)[-4000:]}")
    return json.loads(line.removeprefix("RESULT "))


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        child(int(args.child), args.layers, args.repeats)
        return
    results = {"runs": {}, "balance": {}}
    print(
        "| S (2S tokens) | cp | saved MiB per rank (max) | vs cp=1 | planner forecast MiB | step s wall (max rank) | CPU s (max rank) | pairs max/min | tiles max/min | all-gather KiB per layer per rank |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for seq_len in args.lengths:
        base = None
        for cp in args.cps:
            ranks = launch(seq_len, cp, args)
            results["runs"][f"{seq_len}/cp{cp}"] = ranks
            saved = max(r["saved_bytes"] for r in ranks)
            base = base or saved
            pairs = [r["visible_pairs"] for r in ranks]
            tiles = [r["flex_tiles"] for r in ranks]
            print(
                f"| {seq_len} ({2 * seq_len}) | {cp} | {saved / 2**20:.1f} | {saved / base:.2f}x | "
                f"{ranks[0]['forecast_layer_bytes'] / 2**20:.1f} | {max(r['wall_s'] for r in ranks):.2f} | "
                f"{max(r['cpu_s'] for r in ranks):.2f} | {max(pairs) / min(pairs):.3f} | {max(tiles) / min(tiles):.2f} | "
                f"{ranks[0]['allgather_bytes_per_layer'] / 2**10:.0f} |",
                flush=True,
            )
    print()
    print(
        "| S | cp | zig-zag pairs max/min mean (worst) | per-document pairs max/min mean (worst) | zig-zag tiles slowest rank | per-document tiles slowest rank |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for seq_len in args.lengths:
        b = results["balance"][seq_len] = balance(seq_len, args.balance_cps)
        for cp in args.balance_cps:
            z, p = b[f"cp{cp}"]["zigzag"], b[f"cp{cp}"]["per_document"]
            print(
                f"| {seq_len} | {cp} | {z['pairs_ratio_mean']:.3f} ({z['pairs_ratio_worst']:.3f}) | "
                f"{p['pairs_ratio_mean']:.3f} ({p['pairs_ratio_worst']:.3f}) | {z['tiles_slowest_rank_mean']:.0f} | "
                f"{p['tiles_slowest_rank_mean']:.0f} |",
                flush=True,
            )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
