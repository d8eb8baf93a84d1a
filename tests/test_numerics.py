"""Numeric blow-ups: NaN/Inf steps are skipped and counted up to a limit, and the loss-spike watchdog warns or
stops. Faults come from a forward hook on the real model (tests/faults.py)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import DS, launch, run_inprocess, series
from faults import inject

from dapt.runtime.numerics import Diverged


def module_weights(checkpoint) -> dict[str, torch.Tensor]:
    """The module weights of a DeepSpeed checkpoint, read without unpickling anything but tensors and data."""
    from dapt.runtime.checkpoint import safe_load

    return safe_load(checkpoint / "mp_rank_00_model_states.pt")["module"]


def optimizer_state(checkpoint) -> dict[str, torch.Tensor]:
    """Adam's moments and step counts, and (ZeRO 1-3) the fp32 master partitions, flattened to named tensors: at ZeRO
    0 the torch optimizer's state in the model file, else the ZeRO optimizer file's."""
    from dapt.runtime.checkpoint import safe_load

    files = sorted(checkpoint.glob("*optim_states.pt"))
    if files:
        state = safe_load(files[0])["optimizer_state_dict"]
        out = {f"master{i}": t for i, t in enumerate(state["single_partition_of_fp32_groups"])}
        base = state["base_optimizer_state"]
    else:
        base = safe_load(checkpoint / "mp_rank_00_model_states.pt")["optimizer"]
        out = {}
    out |= {f"{i}.{name}": t for i, moments in base["state"].items() for name, t in moments.items()}
    assert any(".exp_avg_sq" in k for k in out), out.keys()
    return out


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("kind", ["nan", "inf"])
def test_a_non_finite_step_is_skipped_and_changes_nothing(kind, recipe, tmp_path, monkeypatch):
    inject(monkeypatch, {3}, kind)  # the third training forward: optimizer step 3
    out = tmp_path / "run"
    summary = run_inprocess(
        [
            "--recipe",
            recipe,
            "--output_dir",
            out,
            "--checkpoint.every=1",
            "--checkpoint.keep=10",
            "--train.eval_every=0",
        ]
    )
    assert summary["steps"] == 6
    ckpts = out / "checkpoints"
    w2, w3, w4 = (module_weights(ckpts / f"step_{s:08d}") for s in (2, 3, 4))
    o2, o3, o4 = (optimizer_state(ckpts / f"step_{s:08d}") for s in (2, 3, 4))
    assert _same(w2, w3) and _same(o2, o3)  # step 3 was skipped: no weight, moment or step count moved
    assert not _same(w3, w4) and not _same(o3, o4)  # step 4 trained again
    assert all(torch.isfinite(v).all() for v in w4.values())
    lrs = dict(series(out, "train/learning_rate"))
    assert (
        lrs[3] == lrs[2] and lrs[4] < lrs[3]
    )  # the skipped step did not advance the (linear decay) schedule
    skipped = dict(series(out, "train/skipped_steps"))
    assert skipped[2] == 0 and skipped[3] == 1 and skipped[6] == 1
    assert math.isnan(dict(series(out, "train/loss"))[3]) and math.isfinite(
        dict(series(out, "train/loss"))[4]
    )


def test_ds_skips_under_zero2_bf16(recipe, tmp_path, monkeypatch):
    """Past ZeRO 0 fp32, DeepSpeed's own overflow check discards the NaN-poisoned step: the bf16 weights, the fp32
    master partitions and Adam's moments are those of the step before."""
    inject(monkeypatch, {3}, "inf")
    out = tmp_path / "run"
    run_inprocess(
        [
            "--recipe",
            recipe,
            "--ds",
            DS / "zero2_bf16.json",
            "--output_dir",
            out,
            "--train.max_steps=4",
            "--train.eval_every=0",
            "--checkpoint.every=1",
            "--checkpoint.keep=10",
        ]
    )
    skipped = dict(series(out, "train/skipped_steps"))
    lrs = dict(series(out, "train/learning_rate"))
    assert (
        skipped[2] == 0
        and skipped[3] == 1
        and lrs[3] == lrs[2]
        and math.isfinite(dict(series(out, "train/loss"))[4])
    )
    ckpts = out / "checkpoints"
    w2, w3, w4 = (module_weights(ckpts / f"step_{s:08d}") for s in (2, 3, 4))
    o2, o3, o4 = (optimizer_state(ckpts / f"step_{s:08d}") for s in (2, 3, 4))
    assert any(k.startswith("master") for k in o2)
    assert _same(w2, w3) and _same(o2, o3)
    assert not _same(w3, w4) and not _same(o3, o4)


def test_too_many_skipped_steps_stop_without_a_new_checkpoint(recipe, tmp_path, monkeypatch):
    inject(monkeypatch, range(3, 100), "nan")  # every step from 3 on
    out = tmp_path / "run"
    with pytest.raises(Diverged) as e:
        run_inprocess(
            [
                "--recipe",
                recipe,
                "--output_dir",
                out,
                "--checkpoint.every=2",
                "--train.max_steps=10",
                "--numerics.max_skipped_steps=2",
                "--train.eval_every=0",
            ]
        )
    assert e.value.code == 4
    assert "3 optimizer steps had a NaN/Inf loss" in e.value.message and "step 5" in e.value.message
    assert f"--resume={out / 'checkpoints' / 'step_00000004'}" in e.value.message
    saved = sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert saved == ["step_00000002", "step_00000004"]  # nothing written at the step that stopped the run


def test_loss_spike_watchdog_warns_or_stops(recipe, tmp_path, monkeypatch, caplog):
    inject(monkeypatch, range(9, 100), "spike")
    args = [
        "--recipe",
        recipe,
        "--train.max_steps=14",
        "--checkpoint.every=4",
        "--train.eval_every=0",
        "--numerics.spike_steps=3",
        "--numerics.spike_window=20",
    ]
    run_inprocess(
        args + ["--output_dir", tmp_path / "warn"]
    )  # warn (the default): the run goes on to the end
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
    run_inprocess(
        [
            "--recipe",
            recipe,
            "--output_dir",
            out,
            "--train.max_steps=6",
            "--checkpoint.every=2",
            "--train.rebuild_schedule=true",
        ]
    )
    assert dict(series(out, "train/skipped_steps"))[6] == 1


def test_a_nan_on_one_rank_skips_the_step_on_both(recipe, tmp_path, monkeypatch):
    monkeypatch.setenv("FAULT_FORWARDS", "3")  # rank 1, third forward: step 3 (no accumulation)
    monkeypatch.setenv("FAULT_RANK", "1")
    monkeypatch.setenv("FAULT_KIND", "nan")
    out = tmp_path / "run"
    launch(
        [
            "--recipe",
            recipe,
            "--ds",
            DS / "zero3_bf16.json",
            "--output_dir",
            out,
            "--train.max_steps=4",
            "--train.eval_every=0",
            "--checkpoint.every=0",
        ],
        ranks=2,
        script=DS.parent / "tests" / "faulty_mlm.py",
    )
    skipped = dict(series(out, "train/skipped_steps"))
    assert skipped[2] == 0 and skipped[3] == 1 and skipped[4] == 1
    assert all(math.isfinite(v) for s, v in series(out, "train/loss") if s != 3)


def test_fp16_loss_scale_state_with_deepspeeds_own_scalers():
    """fp16 needs a GPU (DeepSpeed refuses it on this CPU), so the guard's fp16 rules are checked on DeepSpeed's own
    scaler objects: ZeRO 0's FP16_Optimizer (built here around a real fp16 model) and ZeRO 1-3's DynamicLossScaler.
    A NaN loss made on purpose must not lower the scale (its state is put back), and an overflow at the minimum
    scale counts as a skipped step instead of ending in DeepSpeed's bare exception."""
    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler
    from transformers import BertConfig, BertForMaskedLM

    from dapt.runtime.group import init
    from dapt.runtime.numerics import at_minimum, loss_scaler, skip_verdict

    init()
    torch.manual_seed(0)
    model = BertForMaskedLM(
        BertConfig(
            vocab_size=60,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=16,
        )
    ).half()
    opt = FP16_Optimizer(
        torch.optim.AdamW(model.parameters()),
        low_precision_dtype=torch.float16,
        dynamic_loss_scale=True,
        initial_dynamic_scale=2**8,
        dynamic_loss_args={
            "init_scale": 2**8,
            "scale_window": 1000,
            "min_scale": 1,
            "delayed_shift": 1,
            "consecutive_hysteresis": False,
        },
    )
    scaler = loss_scaler(opt)
    assert scaler is opt.loss_scale_config and scaler.cur_scale == 2**8 and not at_minimum(scaler)
    saved = dict(vars(scaler))
    ids = torch.randint(5, 60, (2, 8))
    opt.backward(model(input_ids=ids, labels=ids).loss * float("nan"))  # the guard's deliberate NaN
    weights = [p.detach().clone() for p in model.parameters()]
    opt.step()
    assert opt.overflow and scaler.cur_scale == 2**7  # DeepSpeed skipped the step and halved the scale ...
    assert all(torch.equal(w, p) for w, p in zip(weights, model.parameters()))
    scaler.__dict__.update(saved)  # ... which the guard puts back, as StepGuard.end does
    assert scaler.cur_scale == 2**8 and scaler.cur_iter == saved["cur_iter"]

    zero = DynamicLossScaler(
        init_scale=2.0, scale_window=1000, min_scale=1.0, delayed_shift=1, consecutive_hysteresis=False
    )
    assert loss_scaler(type("Z", (), {"loss_scaler": zero})()) is zero
    zero.update_scale(True)
    assert at_minimum(zero)
    with pytest.raises(Exception, match="already at minimum"):
        zero.update_scale(True)  # DeepSpeed's own ending: a bare Exception
    zero.raise_error_at_min_scale = False  # what StepGuard sets
    zero.update_scale(True)
    assert zero.cur_scale == 1.0

    # (skipped, counted): fp16 overflows the scale handles are not counted; at the minimum, or a NaN loss, they are
    assert skip_verdict(False, True, 0, True, False) == (True, False)
    assert skip_verdict(False, True, 0, True, True) == (True, True)
    assert skip_verdict(False, True, 1, True, False) == (True, True)
    assert skip_verdict(False, True, 0, False, False) == (True, True)  # bf16: any discarded step counts
    assert skip_verdict(False, False, 0, True, True) == (False, False)
