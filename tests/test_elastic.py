"""Elastic resume at ZeRO 1-3: a run checkpointed on 2 ranks continues on 1, and one checkpointed on 1 continues on 2
(2 gloo ranks), through DeepSpeed's universal checkpoint format. After the conversion the fp32
weights and Adam moments are those of the original checkpoint (each gathered whole, the original loaded at its own
world size), the following losses are an uninterrupted run's within fp32 tolerance, and so are the documents
trained on, in global order."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, child_env, launch, launch_command, series
from test_runner import CLASSIFY, _args
from transformers import AutoModelForSequenceClassification

pytestmark = pytest.mark.slow
ROWS = 16  # rows per optimizer step: micro 4 x accumulation 4 x 1 rank, or 4 x 2 x 2 ranks


def fp32_ds(tmp_path: Path, stage: int) -> Path:
    """A ZeRO config in fp32 (this CPU has no fast bf16): the shipped ones with their precision left to dapt."""
    path = tmp_path / f"zero{stage}_fp32.json"
    path.write_text(
        json.dumps(
            {
                "zero_optimization": {"stage": stage},
                "optimizer": {
                    "type": "AdamW",
                    "params": dict.fromkeys(("lr", "betas", "eps", "weight_decay"), "auto"),
                },
                "gradient_accumulation_steps": "auto",
                "gradient_clipping": "auto",
                "train_batch_size": "auto",
                "train_micro_batch_size_per_gpu": "auto",
            }
        )
    )
    return path


def common(recipe: Path, ds: Path) -> list:
    # a constant schedule: a run stopped by max_steps and continued with more steps follows the uninterrupted one
    return ["--recipe", recipe, "--ds", ds, "--data.packing=pad", "--data.log_sample_ids=true",
            "--train.eval_every=0", "--train.log_every=1", "--train.lr_schedule=constant", "--train.warmup_steps=0",
            "--train.warmup_ratio=0", "--train.micro_batch_size=4", "--checkpoint.every=4", "--checkpoint.keep=10",
            "--model.config.hidden_dropout_prob=0.0"]  # fmt: skip


def dump(args: list, ranks: int, tmp_path: Path, name: str) -> dict:
    """tests/dump_state.py: the state a resume loads, gathered whole."""
    target = tmp_path / f"{name}.pt"
    env_before = os.environ.get("DUMP_TO")
    os.environ["DUMP_TO"] = str(target)
    try:
        if ranks == 1:  # in this process: no launcher start-up
            import dump_state

            dump_state.main([str(a) for a in args])
        else:
            launch(args, ranks=ranks, script=ROOT / "tests" / "dump_state.py")
    finally:
        os.environ.pop("DUMP_TO") if env_before is None else os.environ.__setitem__("DUMP_TO", env_before)
    return torch.load(target, weights_only=True)


def assert_same_state(a: dict, b: dict) -> None:
    assert a["steps"] == b["steps"] and len(a["steps"]) == 1  # one Adam step count, the checkpoint's
    # torch's fused AdamW (dapt's default) needs each step on its parameter's device, a tensor of its own
    assert b["fused_steps"] > 0 and b["steps_on_param_device"] and b["steps_distinct"]
    assert a["params"].keys() == b["params"].keys()
    for name, tensors in a["params"].items():
        for key, value in tensors.items():
            assert torch.equal(value, b["params"][name][key]), (name, key)
    assert any(t["exp_avg"].abs().sum() > 0 for t in a["params"].values())  # moments that could differ


def global_order(out: Path, worlds: list[tuple[int, int]]) -> list[str]:
    """The documents trained, in global row order, from the per-rank sample logs of a run whose world size changed:
    `worlds` lists (optimizer steps, ranks) segments; on W ranks, rank r's k-th row of a step is global row r + k W."""
    files = {r: (out / f"samples.rank{r}.txt").read_text().splitlines() for r in range(2)}
    taken, order = {0: 0, 1: 0}, []
    for steps, world in worlds:
        for _ in range(steps):
            per = ROWS // world
            rows = {r: files[r][taken[r] : taken[r] + per] for r in range(world)}
            order += [rows[g % world][g // world] for g in range(ROWS)]
            for r in range(world):
                taken[r] += per
    assert all(taken[r] == len(files[r]) for r in range(2)), "a sample log holds rows no step trained"
    return order


# ZeRO-1 and -2 share one optimizer class and one checkpoint layout (DeepSpeed's stage_1_and_2.py), so their
# conversion is one path: stage 1 stands for both here, and stage 2 is moved 2 -> 1 (and killed inside the
# conversion) by the SIGTERM test below. ZeRO-3 partitions the weights too and has its own path, moved both ways.
@pytest.mark.parametrize("stage", [1, 3])
def test_a_run_moves_from_2_ranks_to_1_and_back_at_zero_1_and_3(stage, recipe, tmp_path):
    args = common(recipe, fp32_ds(tmp_path, stage))
    ref, run = tmp_path / "ref", tmp_path / "run"
    launch(
        [*args, "--output_dir", ref, "--train.max_steps=12", "--train.grad_accum=4"]
    )  # 1 rank, uninterrupted
    given = [*args, "--output_dir", run, "--train.grad_accum=2"]  # the 2-rank command; reruns give the same
    launch([*given, "--train.max_steps=4"], ranks=2)
    step4, step8 = run / "checkpoints" / "step_00000004", run / "checkpoints" / "step_00000008"
    # 2 -> 1: the converted checkpoint loads the original's weights and moments
    original = dump([*given, f"--resume={step4}"], 2, tmp_path, "original4")
    converted = dump([*given, f"--resume={step4}"], 1, tmp_path, "converted4")
    assert_same_state(original, converted)
    assert (step4 / "universal" / "manifest.json").is_file() and not list(step4.glob(".tmp-*"))
    one = launch([*given, "--train.max_steps=8"], ranks=1)
    assert (
        "the global batch stays 16 rows = micro 4 x accumulation 4 x world 1 (train.grad_accum 2 -> 4)"
        in one.stdout
    )
    assert "using the universal conversion of" in one.stdout  # made once, by the first load
    # 1 -> 2
    original = dump([*given, f"--resume={step8}"], 1, tmp_path, "original8")
    converted = dump([*given, f"--resume={step8}"], 2, tmp_path, "converted8")
    assert_same_state(original, converted)
    two = launch([*given, "--train.max_steps=12"], ranks=2)
    assert "resumed from" in two.stdout and "at optimizer step 8" in two.stdout
    a, b = series(ref, "train/loss"), series(run, "train/loss")
    assert [s for s, _ in a] == [s for s, _ in b] == list(range(1, 13))
    assert [v for _, v in b] == pytest.approx([v for _, v in a], rel=2e-6)
    straight = (ref / "samples.rank0.txt").read_text().splitlines()
    assert global_order(run, [(4, 2), (4, 1), (4, 2)]) == straight
    assert json.loads((run / "final" / "config.json").read_text())["model_type"] == "bert"
    if (
        stage == 1
    ):  # the last checkpoint was written on 2 ranks: what doctor says of a 1-rank resume, and a model
        _doctor_sizes_the_conversion(
            given, run
        )  # that is not the checkpoint's is refused before any conversion
        other = launch([*given, "--train.max_steps=16", "--model.config.hidden_size=48"], check=False)
        assert (  # another model into this run's folder: refused before anything starts (dapt_run.json)
            other.returncode == 2
            and "of another configuration (model.config" in other.stderr
            and "--output_dir=NEW" in other.stderr
        )
        assert not (run / "checkpoints" / "step_00000012" / "universal").exists()


@pytest.mark.parametrize("before, after", [(2, 3), (3, 1)])
def test_a_run_continues_at_another_zero_stage_on_the_same_ranks(before, after, recipe, tmp_path):
    """DeepSpeed writes a universal checkpoint in the layout of the stage it converts from, and reads ZeRO 1/2 and
    ZeRO 3 checkpoints from two different layouts: a run moved between them failed to load ("assert len(ckpt_list) >
    0", KeyError 'optimizer_state_dict', "Empty ds_version"). Now it loads the original's weights and moments and
    trains on as the uninterrupted run at the first stage."""
    from conftest import run_inprocess

    first, second = common(recipe, fp32_ds(tmp_path, before)), common(recipe, fp32_ds(tmp_path, after))
    ref, run = tmp_path / "ref", tmp_path / "run"
    run_inprocess([*first, "--output_dir", ref, "--train.max_steps=8"])
    run_inprocess([*first, "--output_dir", run, "--train.max_steps=4"])
    step4 = run / "checkpoints" / "step_00000004"
    original = dump([*first, "--output_dir", run, f"--resume={step4}"], 1, tmp_path, "original")
    converted = dump([*second, "--output_dir", run, f"--resume={step4}"], 1, tmp_path, "converted")
    assert_same_state(original, converted)
    run_inprocess([*second, "--output_dir", run, "--train.max_steps=8"])
    a, b = series(ref, "train/loss"), series(run, "train/loss")
    assert [s for s, _ in b] == list(range(1, 9)) and [v for _, v in b] == pytest.approx(
        [v for _, v in a], rel=1e-5
    )
    saved = json.loads((run / "checkpoints" / "step_00000008" / "dapt_checkpoint.json").read_text())
    assert saved["zero_stage"] == after


def _doctor_sizes_the_conversion(args: list, run: Path) -> None:
    import contextlib
    import io

    from dapt.tools.doctor import main

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        main([str(a) for a in args] + ["--cluster.gpu=cpu", "--cluster.nodes=1", "--cluster.gpus_per_node=1"])
    line = next(x for x in printed.getvalue().splitlines() if " resume " in f" {x} ")
    assert line.startswith("OK") and "step_00000012 (written on 2 rank(s) at ZeRO stage 1)" in line, line
    assert "converted once to DeepSpeed's universal format" in line and "GiB free there" in line, line


def _fake_checkpoint(out: Path, world: int, stage: int, total: int) -> Path:
    """A checkpoint as the config check sees one: index.json naming it and its dapt_checkpoint.json."""
    point = out / "checkpoints" / "step_00000004"
    point.mkdir(parents=True)
    info = {"world_size": world, "zero_stage": stage, "train_batch_size": total, "parameters": {}}
    (point / "dapt_checkpoint.json").write_text(json.dumps(info))
    (out / "checkpoints" / "index.json").write_text(json.dumps({"latest": point.name, "saved": [point.name]}))
    return point


def test_what_cannot_be_resumed_elsewhere_is_a_config_error_naming_what_would_work(
    recipe, tmp_path, monkeypatch
):
    from dapt.cli.load import load_config
    from dapt.config.schema import ConfigError
    from dapt.runtime import elastic

    out = tmp_path / "run"
    _fake_checkpoint(out, world=2, stage=2, total=16)
    base = ["--recipe", str(recipe), "--output_dir", str(out), "--data.streams=8"]
    cfg = load_config([*base, "--ds", str(fp32_ds(tmp_path, 2)), "--train.micro_batch_size=4"], world_size=4)
    assert (cfg.train.grad_accum, cfg.ds_config["train_batch_size"]) == (1, 16)
    assert any("converted once to DeepSpeed's universal format" in note for note in cfg.notes)
    assert "checkpoint" not in cfg.ds_config  # load_universal is turned on for the loads that need it only
    same = load_config([*base, "--ds", str(fp32_ds(tmp_path, 2)), "--train.micro_batch_size=4"], world_size=2)
    assert not any("universal" in note for note in same.notes)  # the world size it was written on: as before
    with pytest.raises(ConfigError) as e:  # 16 rows cannot be made of micro batches of 3
        load_config([*base, "--ds", str(fp32_ds(tmp_path, 2)), "--train.micro_batch_size=3"], world_size=1)
    assert (
        "use --train.micro_batch_size=16 --train.grad_accum=1, --train.micro_batch_size=8 --train.grad_accum=2"
        in str(e.value)
    )
    with pytest.raises(ConfigError, match="DeepSpeed converts only ZeRO 1-3 checkpoints.*--resume=never"):
        load_config(base, world_size=1)  # the recipe's ZeRO-0 run cannot load a ZeRO-2 checkpoint
    monkeypatch.setattr(elastic, "_has_universal", lambda: False)
    with pytest.raises(
        ConfigError, match="needs DeepSpeed's universal checkpoint conversion, which DeepSpeed"
    ):
        load_config([*base, "--ds", str(fp32_ds(tmp_path, 2))], world_size=1)
    cfg = load_config([*base, "--ds", str(fp32_ds(tmp_path, 2)), "--resume=never"], world_size=1)
    assert not any("universal" in note for note in cfg.notes)  # nothing to convert when nothing is resumed


def _sigterm_when_trained(cmd: list, out: Path, steps: int) -> int:
    """Start `cmd` in its own process group; SIGTERM the group once `steps` optimizer steps are logged; wait until
    every process has left (the launcher dies of the signal at once, its ranks write a checkpoint first). Returns
    the step of that checkpoint."""
    proc = subprocess.Popen(cmd, env=child_env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # fmt: skip
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (out / "metrics.jsonl").exists() and len(series(out, "train/loss")) >= steps:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be stopped"
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=120)
    while time.time() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    return int(json.loads((out / "checkpoints" / "index.json").read_text())["latest"].split("_")[1])


def _kill_inside_the_conversion(args: list, point: Path) -> None:
    """tests/paused_conversion.py pauses once the converted files are written, before their manifest and rename."""
    paused = subprocess.Popen([sys.executable, str(ROOT / "tests" / "paused_conversion.py"), *map(str, args)],
                              env=child_env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)  # fmt: skip
    deadline = time.time() + 240
    while (
        time.time() < deadline
        and paused.poll() is None
        and not (point / ".tmp-universal" / "PAUSED").exists()
    ):
        time.sleep(0.05)
    assert (point / ".tmp-universal" / "PAUSED").exists(), "the conversion was not reached"
    os.killpg(paused.pid, signal.SIGKILL)
    paused.wait(timeout=60)
    assert not (point / "universal").exists()


def test_sigterm_on_2_ranks_then_the_same_command_on_1_rank_continues_the_uninterrupted_run(recipe, tmp_path):
    """The check of issue 16: a 2-rank run is SIGTERMed mid-run and rerun on 1 rank with the same command; it
    continues, its losses and the documents trained are an uninterrupted run's, and final/ loads. At ZeRO-2: the
    first rerun is SIGKILLed inside the conversion, and the next converts again and finishes. (A checkpoint written
    on SIGTERM is written as any other: ZeRO-3's is moved 2 -> 1 and back above.)"""
    from transformers import AutoModelForMaskedLM

    base = [*common(recipe, fp32_ds(tmp_path, 2)), "--train.max_steps=40", "--checkpoint.every=1000"]
    ref, out = tmp_path / "ref", tmp_path / "run"
    launch([*base, "--output_dir", ref, "--train.grad_accum=4"])
    args = [*base, "--output_dir", out, "--train.grad_accum=2"]
    stopped = _sigterm_when_trained([*launch_command(2), *map(str, args)], out, 5)
    assert 5 <= stopped < 40
    point = out / "checkpoints" / f"step_{stopped:08d}"
    _kill_inside_the_conversion(args, point)
    again = launch(args)  # the same command, 1 rank
    assert f"resumed from {point}" in again.stdout and "converting" in again.stdout
    assert (point / "universal" / "manifest.json").is_file() and not (point / ".tmp-universal").exists()
    a, b = series(ref, "train/loss"), series(out, "train/loss")
    assert [s for s, _ in b] == list(range(1, 41))
    assert [v for _, v in b] == pytest.approx(
        [v for _, v in a], rel=1e-5
    )  # the moments came through the move
    straight = (ref / "samples.rank0.txt").read_text().splitlines()
    assert global_order(out, [(stopped, 2), (40 - stopped, 1)]) == straight
    model = AutoModelForMaskedLM.from_pretrained(out / "final")
    assert model.config.model_type == "bert"


def test_a_classifier_moves_from_2_ranks_to_1_and_exports_its_best_checkpoint(labelled, tmp_path):
    """The classifier resumes through the same runner; at the end it loads the checkpoint it exports (the best
    evaluation's), which may have been written on either world size: each load converts what needs converting."""
    out = tmp_path / "run"
    args = _args(labelled, out, "--ds", str(fp32_ds(tmp_path, 2)), "--train.eval_every=3", "--train.log_every=1",
                 "--checkpoint.keep=10")  # fmt: skip
    launch([*args, "--train.max_steps=6"], ranks=2, script=CLASSIFY)
    again = launch([*args, "--train.max_steps=9", "--train.rebuild_schedule=true"], script=CLASSIFY)
    assert "resumed from" in again.stdout and "at optimizer step 6" in again.stdout
    assert "the global batch stays 16 rows" in again.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 9 and summary["final_from"].startswith("checkpoint.export=best")
    chosen = out / "checkpoints" / summary["final_checkpoint"]
    written_on = json.loads((chosen / "dapt_checkpoint.json").read_text())["world_size"]
    assert (chosen / "universal").is_dir() == (written_on == 2)
    assert AutoModelForSequenceClassification.from_pretrained(out / "final").config.num_labels == 2
