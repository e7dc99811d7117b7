"""Train resume and model.init_from_mcore load a checkpoint through megatron-core, which unpickles
`.metadata` and byte items without restriction; megadiff vets them first. Planted code is refused
without running (the marker stays absent), checkpoint.trust_checkpoint=true loads it (and the
payload runs: it was live), and real trainer- and converter-made checkpoints load by default."""

import json
import subprocess
import sys
from importlib.metadata import version

import pytest

from tests.dist.launch import REPO, run_torchrun


@pytest.mark.dist
@pytest.mark.slow
def test_resume_and_init_from_mcore_refuse_planted_code_and_trust_loads_it(tiny_run_dir, tmp_path):
    converted = tmp_path / "converted"
    subprocess.run(
        [
            sys.executable,
            "tools/convert_hf_to_mcore.py",
            "--hf-dir",
            str(tiny_run_dir / "hf"),
            "--output",
            str(converted),
            "--no-progress",
        ],
        cwd=REPO,
        check=True,
        capture_output=True,
    )
    out = tmp_path / "report.json"
    run_torchrun(
        1,
        "tests/dist/workers/untrusted_load.py",
        ["--config", tiny_run_dir / "cfg.yaml", "--converted", converted, "--work", tmp_path, "--out", out],
    )
    report = json.loads(out.read_text())
    for case in ("resume_real", "init_real_trained", "init_real_converted"):
        assert report[case]["result"] == "loaded", (case, report[case])
    for use in ("resume", "init"):
        refused, trusted = report[f"{use}_metadata"], report[f"{use}_metadata_trusted"]
        assert refused["result"].startswith("refused: ") and "'posix.system'" in refused["result"], refused
        assert "checkpoint.trust_checkpoint=true" in refused["result"] and not refused["marker"]
        assert trusted == {"result": "loaded", "marker": True}, trusted
        refused, trusted = report[f"{use}_extra_state"], report[f"{use}_extra_state_trusted"]
        assert "_extra_state" in refused["result"] and "it names exec" in refused["result"], refused
        assert not refused["marker"]
        assert trusted == {"result": "loaded", "marker": True}, trusted
    # A resume takes the run's LR from the resumed step on; other data only with allow_new_data (then
    # from its beginning); a checkpoint without common.pt is named before megatron-core reads it.
    assert report["resume_lr"]["result"] == "loaded" and report["resume_lr"]["max_lr"] == 3e-3, report["resume_lr"]
    assert report["resume_same"]["max_lr"] == 1e-3 and report["resume_same"]["consumed_rows"] > 0
    refused = report["resume_new_data"]["result"]
    assert refused.startswith("refused: cannot resume") and "checkpoint.allow_new_data=true" in refused, refused
    assert report["resume_new_data_allowed"]["result"] == "loaded"
    assert report["resume_new_data_allowed"]["consumed_rows"] == 0
    no_common = report["resume_no_common"]["result"]
    if version("megatron-core").startswith("0.16."):  # 0.16 writes common.pt; 0.17+ keeps it in the DCP files
        assert "common.pt: missing; megatron-core's metadata.json says" in no_common, no_common
    else:
        assert no_common.startswith("no common.pt"), no_common
