"""The diffusion trainer against the reference model, across layouts (torchrun on CPU).

Tolerances: one step's loss and every parameter gradient within rel. 1e-5 of the reference
model computing the same loss on the same noised global batch; 5-step losses at different
layouts within 1e-5 of each other. Device placement: no tensor reaching the model, the loss or a
collective is off the run device (megadiff.platform.device_audit), in every mode and backend.
"""

import json

import pytest

from tests.dist.launch import run_torchrun

WORKER = "tests/dist/workers/train_check.py"
REL_TOL = 1e-5


def run_check(tiny_run_dir, nproc, check, layouts, *overrides):
    out = tiny_run_dir / f"{check}_{nproc}_{abs(hash(layouts))}.json"
    run_torchrun(
        nproc,
        WORKER,
        [
            "--config",
            tiny_run_dir / "cfg.yaml",
            "--hf-dir",
            tiny_run_dir / "hf",
            "--check",
            check,
            "--layouts",
            layouts,
            "--out",
            out,
            *overrides,
        ],
    )
    return json.loads(out.read_text())


def assert_step_matches_reference(results):
    for layout, modes in results.items():
        assert set(modes) == {"block_diffusion", "full"}
        for mode, r in modes.items():
            assert r["loss_rel"] <= REL_TOL, (layout, mode, r)
            assert r["grad_rel"] <= REL_TOL, (layout, mode, r)


@pytest.mark.repeat
@pytest.mark.dist
def test_bd_and_full_step_match_reference_single_process(tiny_run_dir):
    results = run_check(tiny_run_dir, 1, "step_parity", "1,1,1")
    assert_step_matches_reference(results)
    assert results["1,1,1"]["full"]["experts"] == "grouped"  # perf.moe_experts=auto on the CPU


@pytest.mark.dist
@pytest.mark.slow
def test_bd_and_full_step_match_reference_at_tp2_ep2_pp2(tiny_run_dir):
    """With grouped experts (torch._grouped_mm); the edit-stream test runs (2,2,2) with sequential ones."""
    results = run_check(tiny_run_dir, 4, "step_parity", "2,2,2", "perf.moe_experts=grouped")
    assert_step_matches_reference(results)
    assert {r["experts"] for modes in results.values() for r in modes.values()} == {"grouped"}


@pytest.mark.dist
@pytest.mark.repeat  # the (2,2,2) step parity runs vocab-parallel loss on both stacks
def test_vocab_parallel_loss_and_cap_match_reference_at_tp2(tiny_run_dir):
    results = run_check(tiny_run_dir, 2, "loss_terms", "1,1,1;2,1,1")
    assert set(results) == {"1,1,1", "2,1,1"}
    for layout, r in results.items():
        assert r["rel_err"] <= REL_TOL, (layout, r)


@pytest.mark.repeat
@pytest.mark.dist
@pytest.mark.slow
def test_five_steps_give_the_same_losses_at_every_layout(tiny_run_dir):
    single = run_check(tiny_run_dir, 1, "losses", "1,1,1")["1,1,1"]
    multi = run_check(tiny_run_dir, 2, "losses", "2,1,1;1,2,1;1,1,2")
    assert len(single) == 5 and single[0] > single[-1]
    assert set(multi) == {"2,1,1", "1,2,1", "1,1,2"}
    for layout, losses in multi.items():
        assert len(losses) == 5
        assert max(abs(a - b) for a, b in zip(losses, single, strict=True)) <= REL_TOL, (layout, losses, single)


@pytest.mark.repeat
@pytest.mark.dist
@pytest.mark.slow
def test_tiny_model_memorises_small_sft_set(tiny_run_dir):
    """Loss falls by >= 80% in <= 200 CPU steps on 16 synthetic samples."""
    metrics = tiny_run_dir / "memorise_metrics.jsonl"
    run_torchrun(
        1,
        "tools/train.py",
        [
            tiny_run_dir / "cfg.yaml",
            f"data.train_files={tiny_run_dir / 'memorise.jsonl'}",
            "train.steps=200",
            "train.lr=3e-3",
            "train.lr_schedule=constant",
            "train.weight_decay=0.0",
            f"logging.metrics_file={metrics}",
        ],
        timeout=900,
    )
    losses = [json.loads(line)["loss"] for line in metrics.read_text().splitlines()]
    assert len(losses) == 200
    first, last = losses[0], sum(losses[-10:]) / 10
    assert last <= 0.2 * first, (first, last)


@pytest.mark.repeat  # stack-independent; CI's light stack (b) skips it to stay in budget
@pytest.mark.dist
@pytest.mark.slow
def test_edit_stream_step_matches_reference_at_1_1_1_and_2_2_2(tiny_run_dir):
    """LLaDA2.1 editing stream on (edit_ratio 0.3, weight 0.5), both modes, one launch for both layouts."""
    results = run_check(
        tiny_run_dir,
        4,
        "step_parity",
        "1,1,1;2,2,2",
        "diffusion.edit_ratio=0.3",
        "diffusion.edit_weight=0.5",
        "perf.moe_experts=sequential",  # megatron-core's SequentialMLP (auto picks grouped on the CPU)
    )
    assert set(results) == {"1,1,1", "2,2,2"}
    assert_step_matches_reference(results)
    assert {r["experts"] for modes in results.values() for r in modes.values()} == {"sequential"}
    assert all(r["edited_tokens"] > 0 for modes in results.values() for r in modes.values())


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.repeat  # flex on this stack: tests/models/test_flex_attention.py; the masks are megadiff's own
def test_flex_attention_and_complementary_masks_step_matches_reference(tiny_run_dir):
    assert_step_matches_reference(
        run_check(
            tiny_run_dir,
            1,
            "step_parity",
            "1,1,1",
            "model.attention_backend=flex",
            "diffusion.complementary_masks=true",
        )
    )


@pytest.mark.repeat
@pytest.mark.dist
def test_nonfinite_losses_skip_steps_then_abort(tiny_run_dir):
    """lr=1e30 blows the weights up: NaN steps are skipped and counted, then the run stops."""
    with pytest.raises(AssertionError) as failure:  # run_torchrun raises on a non-zero exit
        run_torchrun(
            1,
            "tools/train.py",
            [
                tiny_run_dir / "cfg.yaml",
                "train.steps=20",
                "train.lr=1e30",
                "train.lr_schedule=constant",
                "train.max_consecutive_nonfinite=2",
            ],
        )
    log = str(failure.value)
    assert "step skipped (1 in a row)" in log and "step skipped (2 in a row)" in log
    assert "2 consecutive steps with a non-finite loss" in log


@pytest.mark.dist
@pytest.mark.repeat  # stack-independent: stack (b) runs it only in the full set
def test_every_tensor_reaching_model_loss_and_collectives_is_on_the_run_device(tiny_run_dir):
    """One step per mode/backend under the device audit (a pretend second device on the CPU).
    On the code before the run device existed it reported the host batch at the embedding, the
    host attention mask, host targets in the loss and host tensors in the loop's all_reduces."""
    results = run_check(tiny_run_dir, 1, "device_audit", "1,1,1")["1,1,1"]
    assert set(results) == {"bd_dense", "bd_flex", "full_flex_cap_sequence"}
    for case, r in results.items():
        assert r["build_violations"] == [] and r["violations"] == [], (case, r)
        assert r["tokens"] > 0 and r["loss"] > 0, (case, r)  # the step really ran
