"""Numeric blow-ups: NaN/Inf steps are skipped and counted up to a limit, and the loss-spike watchdog warns or
stops. Faults come from a forward hook on the real model (tests/faults.py)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import DS, launch, run_inprocess, series
from faults import inject

from dapt.numerics import Diverged


def module_weights(checkpoint) -> dict[str, torch.Tensor]:
    """The module weights of a ZeRO-0 DeepSpeed checkpoint, read without unpickling anything but tensors and data."""
    from dapt.checkpoint import safe_load

    return safe_load(checkpoint / "mp_rank_00_model_states.pt")["module"]


@pytest.mark.parametrize("kind", ["nan", "inf"])
def test_a_non_finite_step_is_skipped_and_changes_nothing(kind, recipe, tmp_path, monkeypatch):
    inject(monkeypatch, {3}, kind)  # the third training forward: optimizer step 3
    out = tmp_path / "run"
    summary = run_inprocess(["--recipe", recipe, "--output_dir", out, "--checkpoint.every=1", "--checkpoint.keep=10",
                             "--train.eval_every=0"])
    assert summary["steps"] == 6
    ckpts = out / "checkpoints"
    w2, w3, w4 = (module_weights(ckpts / f"step_{s:08d}") for s in (2, 3, 4))
    assert all(torch.equal(w2[k], w3[k]) for k in w2)  # step 3 was skipped: no update
    assert any(not torch.equal(w3[k], w4[k]) for k in w3)  # step 4 trained again
    assert all(torch.isfinite(v).all() for v in w4.values())
    lrs = dict(series(out, "train/learning_rate"))
    assert lrs[3] == lrs[2] and lrs[4] < lrs[3]  # the skipped step did not advance the (linear decay) schedule
    skipped = dict(series(out, "train/skipped_steps"))
    assert skipped[2] == 0 and skipped[3] == 1 and skipped[6] == 1
    assert math.isnan(dict(series(out, "train/loss"))[3]) and math.isfinite(dict(series(out, "train/loss"))[4])


def test_ds_skips_under_zero2_bf16(recipe, tmp_path, monkeypatch):
    """Past ZeRO 0 fp32, DeepSpeed's own overflow check discards the NaN-poisoned step."""
    inject(monkeypatch, {3}, "inf")
    out = tmp_path / "run"
    run_inprocess(["--recipe", recipe, "--ds", DS / "zero2_bf16.json", "--output_dir", out, "--train.max_steps=4",
                   "--train.eval_every=0", "--checkpoint.every=0"])
    skipped = dict(series(out, "train/skipped_steps"))
    lrs = dict(series(out, "train/learning_rate"))
    assert skipped[2] == 0 and skipped[3] == 1 and lrs[3] == lrs[2] and math.isfinite(dict(series(out, "train/loss"))[4])


def test_too_many_skipped_steps_stop_without_a_new_checkpoint(recipe, tmp_path, monkeypatch):
    inject(monkeypatch, range(3, 100), "nan")  # every step from 3 on
    out = tmp_path / "run"
    with pytest.raises(Diverged) as e:
        run_inprocess(["--recipe", recipe, "--output_dir", out, "--checkpoint.every=2", "--train.max_steps=10",
                       "--numerics.max_skipped_steps=2", "--train.eval_every=0"])
    assert e.value.code == 4
    assert "3 optimizer steps had a NaN/Inf loss" in e.value.message and "step 5" in e.value.message
    assert f"--resume={out / 'checkpoints' / 'step_00000004'}" in e.value.message
    saved = sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert saved == ["step_00000002", "step_00000004"]  # nothing written at the step that stopped the run


def test_loss_spike_watchdog_warns_or_stops(recipe, tmp_path, monkeypatch, caplog):
    inject(monkeypatch, range(9, 100), "spike")
    args = ["--recipe", recipe, "--train.max_steps=14", "--checkpoint.every=4", "--train.eval_every=0",
            "--numerics.spike_steps=3", "--numerics.spike_window=20"]
    run_inprocess(args + ["--output_dir", tmp_path / "warn"])  # warn (the default): the run goes on to the end
    assert (tmp_path / "warn" / "final" / "model.safetensors").exists()
    with pytest.raises(Diverged) as e:
        run_inprocess(args + ["--output_dir", tmp_path / "stop", "--numerics.spike_action=stop"])
    assert "loss spike" in e.value.message and "since step 9" in e.value.message
    # stopped at step 11, after step_00000008: the last checkpoint before the spike began at step 9
    assert f"--resume={tmp_path / 'stop' / 'checkpoints' / 'step_00000008'}" in e.value.message
    assert not (tmp_path / "stop" / "checkpoints" / "step_00000012").exists()


def test_skip_count_survives_a_resume(recipe, tmp_path, monkeypatch):
    inject(monkeypatch, {2}, "nan")
    out = tmp_path / "run"
    run_inprocess(["--recipe", recipe, "--output_dir", out, "--train.max_steps=4", "--checkpoint.every=2"])
    monkeypatch.undo()
    run_inprocess(["--recipe", recipe, "--output_dir", out, "--train.max_steps=6", "--checkpoint.every=2"])
    assert dict(series(out, "train/skipped_steps"))[6] == 1


def test_a_nan_on_one_rank_skips_the_step_on_both(recipe, tmp_path, monkeypatch):
    monkeypatch.setenv("FAULT_FORWARDS", "3")  # rank 1, third forward: step 3 (no accumulation)
    monkeypatch.setenv("FAULT_RANK", "1")
    monkeypatch.setenv("FAULT_KIND", "nan")
    out = tmp_path / "run"
    launch(["--recipe", recipe, "--ds", DS / "zero3_bf16.json", "--output_dir", out, "--train.max_steps=4",
            "--train.eval_every=0", "--checkpoint.every=0"], ranks=2,
           script=DS.parent / "tests" / "faulty_mlm.py")
    skipped = dict(series(out, "train/skipped_steps"))
    assert skipped[2] == 0 and skipped[3] == 1 and skipped[4] == 1
    assert all(math.isfinite(v) for s, v in series(out, "train/loss") if s != 3)
