#!/usr/bin/env python3
"""Converter throughput and peak memory on a synthetic LLaDA2-mini-shaped checkpoint.

  .venv/bin/python benchmarks/convert.py [--layers 2] [--workdir /tmp] [--keep]

Builds a bf16 HF checkpoint with LLaDA2-mini widths (vocab 157184, hidden 2048, 256 experts of
512, dense layer 0) but only `--layers` layers (2 layers = 3.0 GB) in a temp dir, then runs, each
as a child process exactly as a user would (CLI, interpreter start-up and imports included):

  copy        the baseline: shutil.copyfile of the same safetensors files + fsync (the tools
              fsync too); also, as a reference row, a user-space copy (bytes read into fresh
              tensors and written back)
  hf->mcore   tools/convert_hf_to_mcore.py (one process, layout (1,1,1)); the byte-copy engine with
              direct I/O (--io fast), again with --io page-cache (copy_file_range), and the plain
              path (--io plain, the default: safe_open + torch DCP's own writer)
  mcore->hf   tools/convert_mcore_to_hf.py (of a checkpoint converted beforehand), the engine
              (--io fast) and --io plain (torch DCP's load + tensors appended to the shards)
  merge       tools/moe_convertor.py --mode merge --io fast
  split       tools/moe_convertor.py --mode split --io fast (of a merged checkpoint made beforehand)

--repeat rounds; in each, every command runs right after its own baseline copy, both from the
same state: previous output deleted, `sync`, and the page cache dropped (--cache cold, the default
where /proc/sys/vm/drop_caches is writable, e.g. as root), so each reads its input from disk as
when converting a checkpoint larger than RAM. Throughput ratio = copy time / tool time within each
pair, median over rounds: on a shared VM the same copy's time varies several-fold with what ran
before it (benchmarks/RESULTS.md, convert), so only paired ratios are stable. "data" = the tools' own
timing of their read-transform-write loop (without interpreter start-up and imports, which
megatron-core makes longest for convert_hf_to_mcore); the tools
also say how they copied the weight bytes (direct I/O, in the kernel, through a buffer). Peak
resident memory of the child process tree (psutil, sampled every 10 ms): total RSS, and anonymous
RSS (total minus file-backed pages).
Goals: >= 0.5x copy throughput; peak RSS <= 2 GB + 2x the largest tensor. Deletes everything at
the end unless --keep.
"""

import argparse
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import psutil

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
GB = 10**9


def make_checkpoint(out_dir: str, layers: int) -> dict:
    """Random bf16 weights (fp32 router bias), written one tensor at a time."""
    import torch

    from checkpoint_converters.safetensors_stream import ShardedSafetensorsWriter
    from megadiff.hf.reference import copy_remote_code, write_hf_config
    from megadiff.models.registry import family

    llada2 = family("llada2")
    cfg = llada2.preset("llada2-mini", num_hidden_layers=layers)
    os.makedirs(out_dir)
    shapes = llada2.mapping.expected_hf_shapes(llada2.config_from_hf(cfg))
    entries = [(n, tuple(s), torch.float32 if n.endswith("expert_bias") else torch.bfloat16) for n, s in shapes.items()]
    writer = ShardedSafetensorsWriter(out_dir, entries, "2GB")
    g = torch.Generator().manual_seed(0)
    for name, shape, dtype in entries:
        writer.write(name, (torch.randn(shape, generator=g) * 0.02).to(dtype))
    writer.close()
    write_hf_config(dict(cfg, torch_dtype="bfloat16"), out_dir)
    copy_remote_code(out_dir)
    largest = max(entries, key=lambda e: _nbytes(e[1], e[2]))
    return {
        "bytes": sum(_nbytes(s, d) for _, s, d in entries),
        "largest": largest[0],
        "largest_bytes": _nbytes(largest[1], largest[2]),
        "tensors": len(entries),
    }


def _nbytes(shape, dtype) -> int:
    import torch

    n = 1
    for s in shape:
        n *= s
    return n * torch.empty((), dtype=dtype).element_size()


COPY = """
import os, shutil, sys
src, dst = sys.argv[1], sys.argv[2]
os.makedirs(dst)
for name in sorted(os.listdir(src)):
    if name.endswith(".safetensors"):
        shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))
        if sys.argv[3] == "fsync":
            with open(os.path.join(dst, name), "rb+") as f:
                os.fsync(f.fileno())
"""

# The least any user-space converter does: every byte read into a fresh tensor and written back.
USERSPACE_COPY = """
import os, sys, time, torch
src, dst = sys.argv[1], sys.argv[2]
os.makedirs(dst)
start, total = time.perf_counter(), 0
for name in sorted(os.listdir(src)):
    if name.endswith(".safetensors"):
        with open(os.path.join(src, name), "rb", buffering=0) as fi, open(os.path.join(dst, name), "wb") as fo:
            while True:
                buf = torch.empty(64 * 2**20, dtype=torch.uint8)
                n = fi.readinto(memoryview(buf.numpy()))
                if not n:
                    break
                fo.write(memoryview(buf.numpy())[:n])
                total += n
            fo.flush()
            os.fsync(fo.fileno())
print(f"data: copied {total / 1e9:.2f} GB in {time.perf_counter() - start:.1f} s")
"""


def drop_page_cache() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def can_drop_page_cache() -> bool:
    return os.access("/proc/sys/vm/drop_caches", os.W_OK)


def measure_pairs(copy_cmd, copy_out: str, runs: dict, outputs: dict, repeat: int, cold: bool, keep=()) -> dict:
    """`repeat` rounds; in each, every command runs right after its own baseline run (copyfile +
    fsync of the same bytes), both from the same state: inputs prepared beforehand (never the
    previous command's output), the previous output deleted, dirty pages written and (cold) the
    page cache dropped; the order of the commands is shuffled every round. Ratios are taken within
    each pair, then the median over rounds; also against the median of all copy runs ("pooled").
    The last round's outputs of the commands named in `keep` are kept (for `verify`); the others
    are deleted as soon as measured (disk space: 6 layers make 9.6 GB per output)."""
    tool_runs = {name: [] for name in runs}
    copy_runs = {name: [] for name in runs}
    for round_ in range(repeat):
        # a new order each round: what ran just before changes the copy's time
        names = list(runs)
        random.Random(round_).shuffle(names)
        for name in names:
            cmd = runs[name]
            for runs_of, command, out in ((copy_runs, copy_cmd, copy_out), (tool_runs, cmd, outputs[name])):
                os.sync()
                if cold:
                    drop_page_cache()
                runs_of[name].append(_run_once(command))
                if runs_of is copy_runs or round_ + 1 < repeat or name not in keep:
                    shutil.rmtree(out)
            r, c = tool_runs[name][-1], copy_runs[name][-1]
            print(
                f"round {round_ + 1}: {name:18s} wall {r['wall_s']:5.1f} s, data phase {r['data_s']:5.1f} s; "
                f"its copy {c['wall_s']:4.1f} s{'; ' + r['how'] if r['how'] else ''}",
                flush=True,
            )
    results = {}
    pooled = statistics.median(c["wall_s"] for cs in copy_runs.values() for c in cs)
    for name, rs in tool_runs.items():
        cs = copy_runs[name]
        median = lambda k, rs=rs: statistics.median(r[k] for r in rs)  # noqa: E731
        results[name] = {
            "wall_s": median("wall_s"),
            "data_s": median("data_s"),
            "how": rs[-1]["how"],
            "walls": [r["wall_s"] for r in rs],
            "datas": [r["data_s"] for r in rs],
            "copy_walls": [c["wall_s"] for c in cs],
            "copy_s": statistics.median(c["wall_s"] for c in cs),
            "ratio_wall": statistics.median(c["wall_s"] / r["wall_s"] for c, r in zip(cs, rs, strict=True)),
            "ratio_data": statistics.median(c["wall_s"] / r["data_s"] for c, r in zip(cs, rs, strict=True)),
            "pooled_copy_s": pooled,
            "pooled_ratio_wall": pooled / statistics.median(r["wall_s"] for r in rs),
            "pooled_ratio_data": pooled / statistics.median(r["data_s"] for r in rs),
            "peak_rss": max(r["peak_rss"] for r in rs),
            "peak_anon_rss": max(r["peak_anon_rss"] for r in rs),
        }
    return results


def _run_once(cmd) -> dict:
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="2")
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    root = psutil.Process(proc.pid)
    peak_rss = peak_anon = 0
    while proc.poll() is None:
        rss = anon = 0
        try:
            for p in [root] + root.children(recursive=True):
                info = p.memory_info()
                rss += info.rss
                anon += info.rss - info.shared
        except psutil.Error:
            pass
        peak_rss, peak_anon = max(peak_rss, rss), max(peak_anon, anon)
        time.sleep(0.01)
    wall = time.perf_counter() - start
    output = proc.stdout.read()
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{output[-3000:]}")
    data = re.search(r"^data: .* in ([\d.]+) s", output, re.M)  # the tools time their data phase
    how = re.search(r"^data: .*; weight bytes copied: (.*)$", output, re.M)
    return {
        "wall_s": wall,
        "data_s": float(data.group(1)) if data else wall,
        "how": how.group(1) if how else "",
        "peak_rss": peak_rss,
        "peak_anon_rss": peak_anon,
    }


def main(argv=None):
    from megadiff.platform import install_import_hook

    install_import_hook()  # first, before anything imports megatron-core
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=2, help="mini-width layers (layer 0 dense); 2 = 3.0 GB")
    p.add_argument("--workdir", default=None, help="where the temp dir goes (default: system temp)")
    p.add_argument("--keep", action="store_true", help="keep the generated checkpoints")
    p.add_argument("--repeat", type=int, default=5, help="rounds (median over rounds)")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument(
        "--only",
        default=None,
        help="comma-separated runs to measure (a name selects its variants too: 'hf->mcore' is "
        "hf->mcore, hf->mcore page-cache and hf->mcore plain); default: all",
    )
    p.add_argument(
        "--cache",
        choices=["cold", "warm"],
        default="cold" if can_drop_page_cache() else "warm",
        help="drop the page cache before each run (needs root; default where possible)",
    )
    args = p.parse_args(argv)
    py = sys.executable
    work = tempfile.mkdtemp(prefix="megadiff_convert_bench_", dir=args.workdir)
    d = lambda name: os.path.join(work, name)  # noqa: E731
    try:
        t = time.perf_counter()
        info = make_checkpoint(d("hf"), args.layers)
        print(
            f"synthetic checkpoint: {info['bytes'] / GB:.2f} GB in {info['tensors']} tensors, largest "
            f"{info['largest']} {info['largest_bytes'] / GB:.3f} GB ({time.perf_counter() - t:.0f} s to build)",
            flush=True,
        )
        copy_cmd = [py, "-c", COPY, d("hf"), d("copy"), "fsync"]
        runs = {
            "copy (user space)": [py, "-c", USERSPACE_COPY, d("hf"), d("copy_user")],
            "hf->mcore": [
                py,
                "tools/convert_hf_to_mcore.py",
                "--hf-dir",
                d("hf"),
                "--output",
                d("mcore"),
                "--io",
                "fast",
                "--no-progress",
            ],
            "hf->mcore page-cache": [
                py,
                "tools/convert_hf_to_mcore.py",
                "--hf-dir",
                d("hf"),
                "--output",
                d("mcore_pc"),
                "--io",
                "page-cache",
                "--no-progress",
            ],
            "hf->mcore plain": [
                py,
                "tools/convert_hf_to_mcore.py",
                "--hf-dir",
                d("hf"),
                "--output",
                d("mcore_plain"),
                "--io",
                "plain",
                "--no-progress",
            ],
            "mcore->hf": [
                py,
                "tools/convert_mcore_to_hf.py",
                "--mcore-dir",
                d("mcore_in"),
                "--output",
                d("hf2"),
                "--io",
                "fast",
                "--no-progress",
            ],
            "mcore->hf plain": [
                py,
                "tools/convert_mcore_to_hf.py",
                "--mcore-dir",
                d("mcore_in"),
                "--output",
                d("hf2_plain"),
                "--io",
                "plain",
                "--no-progress",
            ],
            "merge": [
                py,
                "tools/moe_convertor.py",
                "--input-path",
                d("hf"),
                "--output-path",
                d("merged"),
                "--mode",
                "merge",
                "--io",
                "fast",
                "--no-progress",
            ],
            "split": [
                py,
                "tools/moe_convertor.py",
                "--input-path",
                d("merged_in"),
                "--output-path",
                d("split"),
                "--mode",
                "split",
                "--io",
                "fast",
                "--no-progress",
            ],
        }
        outputs = {
            "copy (user space)": d("copy_user"),
            "hf->mcore": d("mcore"),
            "hf->mcore page-cache": d("mcore_pc"),
            "hf->mcore plain": d("mcore_plain"),
            "mcore->hf": d("hf2"),
            "mcore->hf plain": d("hf2_plain"),
            "merge": d("merged"),
            "split": d("split"),
        }
        if args.only:
            wanted = [w.strip() for w in args.only.split(",")]
            runs = {n: c for n, c in runs.items() if any(n == w or n.startswith(w + " ") for w in wanted)}
            if not runs:
                raise SystemExit(f"--only {args.only}: no such run")
        # mcore->hf and split read inputs made once here, never the output of the command before them
        prepare = [py, "tools/convert_hf_to_mcore.py", "--hf-dir", d("hf"), "--output", d("mcore_in"), "--io", "fast"]
        _run_once(prepare + ["--no-progress"])
        if "split" in runs:
            _run_once(
                [
                    py,
                    "tools/moe_convertor.py",
                    "--input-path",
                    d("hf"),
                    "--output-path",
                    d("merged_in"),
                    "--mode",
                    "merge",
                    "--no-progress",
                ]
            )
        print(f"page cache: {args.cache} before each run", flush=True)
        keep = ("mcore->hf", "mcore->hf plain", "split")
        results = measure_pairs(copy_cmd, d("copy"), runs, outputs, args.repeat, args.cache == "cold", keep=keep)
        verify(d("hf"), [outputs[n] for n in keep if n in runs])
        budget = 2 * GB + 2 * info["largest_bytes"]
        print(
            f"\nmedians over {args.repeat} rounds; ratio = throughput relative to its paired copyfile+fsync run "
            f"(the tools fsync too); RSS budget 2 GB + 2 x largest = {budget / GB:.2f} GB"
        )
        pooled = next(iter(results.values()))["pooled_copy_s"]
        print(f"pooled: against the median of all {args.repeat * len(results)} copy runs ({pooled:.1f} s)")
        print(
            f"{'':18s} {'wall s':>7s} {'data s':>7s} {'copy s':>7s} {'wall':>6s} {'data':>6s} {'pooled':>13s}  peak RSS (anon)"
        )
        for name, r in results.items():
            print(
                f"{name:18s} {r['wall_s']:7.1f} {r['data_s']:7.1f} {r['copy_s']:7.1f} {r['ratio_wall']:5.2f}x "
                f"{r['ratio_data']:5.2f}x {r['pooled_ratio_wall']:5.2f}x/{r['pooled_ratio_data']:5.2f}x  {r['peak_rss'] / GB:.2f} GB ({r['peak_anon_rss'] / GB:.2f}) = "
                f"{r['peak_rss'] / info['largest_bytes']:.1f}x largest, "
                f"{'within' if r['peak_rss'] <= budget else 'OVER'} budget  {r['how']}"
            )
        print("\nplain I/O path against the byte-copy engine (medians; > 1 = plain costs more):")
        for name, r in results.items():
            fast = results.get(name[: -len(" plain")]) if name.endswith(" plain") else None
            if fast is not None:
                print(
                    f"{name:18s} wall {r['wall_s'] / fast['wall_s']:.2f}x, data {r['data_s'] / fast['data_s']:.2f}x, "
                    f"peak RSS {r['peak_rss'] / fast['peak_rss']:.2f}x (anon {r['peak_anon_rss'] / fast['peak_anon_rss']:.2f}x)"
                )
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"checkpoint": info, "cache": args.cache, "results": results}, f, indent=1)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


def verify(original: str, outputs: list[str]) -> None:
    """Spot-check that the round trips are exact (a few tensors, every kind)."""
    import torch

    from megadiff.hf.checkpoint_reader import HFCheckpointReader

    a = HFCheckpointReader(original)
    others = [HFCheckpointReader(o) for o in outputs]
    assert all(a.names() == b.names() for b in others)
    for name in (
        "model.word_embeddings.weight",
        "model.layers.1.attention.query_key_value.weight",
        "model.layers.1.mlp.experts.255.up_proj.weight",
        "model.layers.1.mlp.gate.expert_bias",
        "model.layers.0.mlp.gate_proj.weight",
        "lm_head.weight",
    ):
        x = a.get(name)
        assert all(torch.equal(x, b.get(name)) and x.dtype == b.get(name).dtype for b in others), name
    print("round trips spot-checked: exact")


if __name__ == "__main__":
    sys.exit(main())
