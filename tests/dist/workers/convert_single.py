"""Single-process worker for the converter tests: several tools/convert_hf_to_mcore.py runs in one
interpreter (megatron-core is imported once), plus an interrupted run.

  --run "ARGS..."        one CLI invocation (shell-style argument string); repeatable
  --run-both "ARGS..."   the same, then again with `--io plain` into `<--output>-plain` (the plain
                         I/O path's twin, compared bit for bit by the tests)
  --export CKPT=OUT      convert_mcore_to_hf of CKPT to OUT (no megatron-core) with io_mode="fast",
                         in order with the runs, and with io_mode="plain" to OUT-plain
  --interrupt HF=OUT     a conversion whose 6th tensor read raises KeyboardInterrupt (as Ctrl-C does)
Writes {"runs": [...], "interrupt": {...}} as JSON to --out; each run records how many weight
bytes its SpanCopier copied, and how (direct I/O, in the kernel, through a buffer), and how many
tensor bytes were read into memory from the HF files.
"""

import argparse
import importlib.util
import json
import os
import shlex
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, REPO)

from megadiff.platform import install_import_hook  # noqa: E402

install_import_hook()  # first, before anything imports megatron-core


def load_cli():
    spec = importlib.util.spec_from_file_location(
        "convert_hf_to_mcore", os.path.join(REPO, "tools", "convert_hf_to_mcore.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # hides CUDA before torch is imported, as the CLI does
    return module


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--run", action="append", dest="steps", default=[], type=lambda s: ("run", s))
    p.add_argument("--run-both", action="append", dest="steps", type=lambda s: ("both", s))
    p.add_argument("--export", action="append", dest="steps", type=lambda s: ("export", s))
    p.add_argument("--interrupt", default=None)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    cli = load_cli()
    report = {"runs": [], "interrupt": None}
    counts = count_bytes()
    for kind, run in args.steps:
        if kind == "export":
            from checkpoint_converters.mcore_to_hf import convert_mcore_to_hf

            ckpt, out = run.split("=")
            convert_mcore_to_hf(ckpt, out, progress=False, log=lambda *a: None, io_mode="fast")
            convert_mcore_to_hf(ckpt, out + "-plain", progress=False, log=lambda *a: None, io_mode="plain")
            continue
        argv = shlex.split(run)
        for twin in [argv] + ([plain_twin(argv)] if kind == "both" else []):
            counts.update(direct=0, kernel=0, buffered=0, unannounced=0, read=0)
            try:
                report["runs"].append({"args": shlex.join(twin), "rc": cli.main(twin + ["--no-progress"])})
            except SystemExit as e:
                report["runs"].append({"args": shlex.join(twin), "rc": 1, "error": str(e)})
            report["runs"][-1].update(
                direct_bytes=counts["direct"],
                kernel_bytes=counts["kernel"],
                buffered_bytes=counts["buffered"],
                unannounced_bytes=counts["unannounced"],
                read_bytes=counts["read"],
            )
    if args.interrupt:
        from checkpoint_converters.hf_direct import DirectHFReader

        src, out = args.interrupt.split("=")
        calls = {"n": 0}
        original = DirectHFReader.get

        def get(self, name):
            calls["n"] += 1
            if calls["n"] == 6:
                raise KeyboardInterrupt
            return original(self, name)

        DirectHFReader.get = get
        try:
            cli.main(["--hf-dir", src, "--output", out, "--no-progress", "--io", "fast"])
            raised = None
        except BaseException as e:  # torch DCP re-raises a Ctrl-C inside a save as CheckpointException
            raised = type(e).__name__
        finally:
            DirectHFReader.get = original
        parent = os.path.dirname(os.path.abspath(out))
        report["interrupt"] = {
            "raised": raised,
            "reads": calls["n"],
            "output_exists": os.path.exists(out),
            "leftovers": sorted(n for n in os.listdir(parent) if n.startswith(os.path.basename(out) + ".tmp-")),
        }
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)


def plain_twin(argv):
    """The same conversion through the plain I/O path, into `<--output>-plain`."""
    out = argv.index("--output") + 1
    return argv[:out] + [argv[out] + "-plain"] + argv[out + 1 :] + ["--io", "plain"]


def count_bytes():
    """Adds up every SpanCopier's byte counts when it closes, and the bytes of tensors read from
    HF files."""
    from checkpoint_converters.hf_direct import DirectHFReader
    from megadiff.checkpoint.bytecopy.span_copy import SpanCopier

    counts = {"direct": 0, "kernel": 0, "buffered": 0, "unannounced": 0, "read": 0}
    close, read = SpanCopier.close, DirectHFReader._read

    def counted_close(self):
        close(self)
        if not getattr(self, "_counted", False):  # a copier may be closed twice: count it once
            self._counted = True
            for how in ("direct", "kernel", "buffered", "unannounced"):
                counts[how] += getattr(self, f"{how}_bytes")

    def counted_read(self, *a, **k):
        tensor = read(self, *a, **k)
        counts["read"] += tensor.nbytes
        return tensor

    SpanCopier.close, DirectHFReader._read = counted_close, counted_read
    return counts


if __name__ == "__main__":
    main()
