"""Runs in fresh processes: the DeepSpeed launcher with 2 gloo ranks, plain python, SIGKILL and resume."""

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
from conftest import DS, MLM, ROOT, child_env, free_port, launch, launch_command, series
from safetensors.torch import load_file
from transformers import AutoModelForMaskedLM

pytestmark = pytest.mark.slow


def _fp32_zero(tmp_path: Path, stage: int) -> Path:
    """A shipped ZeRO config with precision left to the recipe (fp32 here, for tight tolerances)."""
    ds = json.loads((DS / f"zero{stage}_bf16.json").read_text())
    ds["bf16"] = {"enabled": "auto"}
    path = tmp_path / f"zero{stage}_auto.json"
    path.write_text(json.dumps(ds))
    return path


def test_loss_normalisation_is_the_same_for_any_split_of_the_step(recipe, tmp_path):
    """1 rank x accumulation 4, 2 ranks x accumulation 2 and 1 rank x a 4x micro batch: same loss and gradients.

    Rows are padded documents of different lengths, so micro-batches hold different numbers of masked tokens and a
    mean of per-micro-batch means would differ; only sum / (masked tokens of the whole step) agrees.
    """
    ds = _fp32_zero(tmp_path, 2)
    common = [
        "--recipe",
        recipe,
        "--ds",
        ds,
        "--train.precision=fp32",
        "--data.packing=pad",
        "--train.max_steps=3",
        "--train.eval_every=0",
        "--checkpoint.every=0",
        "--train.grad_clip=0",
    ]
    layouts = {"1x4": (1, 2, 4), "2x2": (2, 2, 2), "1x1big": (1, 8, 1)}
    results = {}
    for name, (ranks, micro, accum) in layouts.items():
        out = tmp_path / name
        launch(
            common
            + ["--output_dir", out, f"--train.micro_batch_size={micro}", f"--train.grad_accum={accum}"],
            ranks=ranks,
        )
        results[name] = (series(out, "train/loss"), series(out, "train/grad_norm"))
    ref_loss, ref_norm = results["1x4"]
    assert len(ref_loss) == 3
    for name, (loss, norm) in results.items():
        for (s1, a), (s2, b) in zip(loss, ref_loss):
            assert s1 == s2 and a == pytest.approx(b, rel=1e-5), (name, s1)
        for (_, a), (_, b) in zip(norm, ref_norm):
            assert a == pytest.approx(b, rel=1e-4), name

    _assert_micro_batches_differ(tmp_path / "1x4", recipe)


def _assert_micro_batches_differ(out: Path, recipe: Path) -> None:
    """Guard: the micro-batches of step 1 really carry unequal masked-token counts (else the test proves little)."""
    from transformers import AutoTokenizer

    from dapt.cli.load import load_config
    from dapt.data.masking import IGNORE, MLMCollator
    from dapt.data.prepare import stream_spec
    from dapt.data.stream import RowFeeder

    cfg = load_config(["--recipe", str(recipe), "--data.packing=pad"], world_size=1, accelerator="cpu")
    tok = AutoTokenizer.from_pretrained(out / "tokenizer")
    collate = MLMCollator(tok, cfg.masking.rate, seed=cfg.seed)
    feeder = RowFeeder(stream_spec(cfg, tok), rank=0, world=1, num_workers=0, states={}, consumed=0)
    counts = []
    for _ in range(4):  # the 1x4 layout: 4 micro-batches of 2 rows
        batch = collate([{"input_ids": r.ids, "key": g, "index": g} for g, r in feeder.take(2)])
        counts.append(int((batch["labels"] != IGNORE).sum()))
    assert len(set(counts)) > 1, counts


@pytest.mark.parametrize("stage", [2, 3])
def test_two_ranks_lower_the_loss_and_export(stage, recipe, tmp_path):
    out = tmp_path / "run"
    proc = launch(
        [
            "--recipe",
            recipe,
            "--ds",
            DS / f"zero{stage}_bf16.json",
            "--output_dir",
            out,
            "--train.max_steps=30",
            "--train.eval_every=10",
            "--checkpoint.every=10",
        ],
        ranks=2,
    )
    assert "world size = 8 x 1 x 2 = 16" in proc.stdout
    losses = [v for _, v in series(out, "train/loss")]
    evals = [v for _, v in series(out, "eval/loss")]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 and evals[-1] < evals[0]
    model = AutoModelForMaskedLM.from_pretrained(out / "final")
    assert all(t.numel() > 0 for t in model.state_dict().values())
    ckpt = json.loads((out / "checkpoints" / "index.json").read_text())["latest"]
    assert len(list((out / "checkpoints" / ckpt).glob("rank_state*.pt"))) == 2


def _run_until_killed(cmd: list[str], out: Path, after_tag: str, timeout: float = 240) -> int:
    """Start `cmd` in its own process group; SIGKILL the whole group (launcher and ranks) as soon as checkpoint
    `after_tag` is complete. Returns the exit code."""
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=child_env(),
        cwd=ROOT,
        start_new_session=True,
    )
    index = out / "checkpoints" / "index.json"
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if index.exists():
            try:
                if json.loads(index.read_text())["latest"] >= after_tag:
                    os.killpg(proc.pid, signal.SIGKILL)
                    break
            except (json.JSONDecodeError, OSError):
                pass
        time.sleep(0.002)
    return proc.wait(timeout=60)


def test_sigkill_then_rerun_matches_an_uninterrupted_run(recipe, tmp_path):
    """Killed mid-epoch on 2 ranks with 2 DataLoader workers each, and rerun with the same command: the same losses
    step by step, the same documents consumed by every rank in the same order, the same final weights and eval loss
    as an uninterrupted run. (One rank without workers, killed at five random points: tests/test_faults.py.)"""
    ranks, workers, steps = 2, 2, 80
    args = [
        "--recipe",
        str(recipe),
        f"--train.max_steps={steps}",
        "--checkpoint.every=20",
        "--train.eval_every=40",
        "--model.config.hidden_dropout_prob=0.1",
        "--data.log_sample_ids=true",
        "--train.micro_batch_size=16",
        f"--data.num_workers={workers}",
    ]
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    launch(args + ["--output_dir", straight], ranks=ranks)
    cmd = launch_command(ranks)
    code = _run_until_killed(cmd + args + ["--output_dir", str(broken)], broken, "step_00000040")
    assert code == -signal.SIGKILL, "the run finished before it could be killed; make it longer"
    assert not (broken / "final").exists()
    proc = launch(args + ["--output_dir", broken], ranks=ranks)
    assert "resumed from" in proc.stdout
    for key in ("train/loss", "train/grad_norm", "eval/loss"):
        a, b = series(straight, key), series(broken, key)
        assert [s for s, _ in a] == [s for s, _ in b], key  # each step once: the killed tail was cut back
        assert [v for _, v in a] == pytest.approx([v for _, v in b], rel=1e-6, abs=1e-7), key
    for rank in range(ranks):
        a, b = ((d / f"samples.rank{rank}.txt").read_text().splitlines() for d in (straight, broken))
        # every rank consumed the same documents in the same order (a document starts in about every other row)
        assert a == b and len(a) >= steps * 16 // 4
    w1, w2 = (
        load_file(straight / "final" / "model.safetensors"),
        load_file(broken / "final" / "model.safetensors"),
    )
    assert w1.keys() == w2.keys() and all(torch.allclose(w1[k], w2[k], atol=1e-6) for k in w1)
    s1, s2 = (json.loads((d / "summary.json").read_text()) for d in (straight, broken))
    assert s1["final_eval_loss"] == pytest.approx(s2["final_eval_loss"], rel=1e-6)
    assert s1["tokens_seen"] == s2["tokens_seen"]


def test_bad_recipe_fails_before_anything_starts(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  max_step: 5\n  micro_batch_size: -2\ndata:\n  pakcing: concat\n")
    out = tmp_path / "never"
    started = time.time()
    proc = launch(["--recipe", bad, "--output_dir", out], check=False)
    assert proc.returncode == 2
    assert (
        "'train.max_step'" in proc.stderr and "max_steps" in proc.stderr
    )  # names the key and the valid ones
    assert "'data.pakcing'" in proc.stderr
    assert not out.exists() and "Traceback" not in proc.stderr
    assert time.time() - started < 60


@pytest.mark.parametrize("how", ["python", "deepspeed", "srun"])
def test_sigterm_writes_a_checkpoint_and_the_rerun_continues(how, recipe, tmp_path):
    """SIGTERM as schedulers send it: all ranks finish the same step, write a checkpoint and exit 128 + 15 = 143;
    the same command then continues from it. `python`: one plain process, signalled alone. `deepspeed`: 2 ranks
    under DeepSpeed's runner, the whole process group signalled (the runner itself dies of the signal, so the ranks'
    exit codes are not visible through it; on one node it does not forward a SIGTERM sent to it alone). `srun`: 2
    ranks started one process each, as srun starts them, each signalled, each exit code checked."""
    out = tmp_path / "run"
    ranks = 1 if how == "python" else 2
    args = [
        "--recipe",
        str(recipe),
        "--train.max_steps=400",
        "--checkpoint.every=0",
        "--train.eval_every=0",
        "--train.log_every=5",
        "--output_dir",
        str(out),
    ]
    port = str(free_port())
    if how == "deepspeed":
        commands = [
            (
                launch_command(2, port=int(port)),
                {},
            )
        ]
    else:
        commands = [
            (
                [sys.executable, str(MLM)],
                {}
                if how == "python"
                else {
                    "SLURM_PROCID": str(r),
                    "SLURM_LOCALID": str(r),
                    "SLURM_STEP_NUM_TASKS": "2",
                    "SLURM_STEP_NODELIST": "127.0.0.1",
                    "MASTER_PORT": port,
                },
            )
            for r in range(ranks)
        ]
    procs = [
        subprocess.Popen(
            cmd + args,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**child_env(), **env},
            cwd=ROOT,
            start_new_session=True,
        )
        for cmd, env in commands
    ]
    deadline = time.time() + 180
    while time.time() < deadline and all(p.poll() is None for p in procs):
        logged = series(out, "train/loss") if (out / "metrics.jsonl").exists() else []
        if logged and logged[-1][0] >= 20:  # well into training (step 1 is logged too)
            for p in procs:
                if how == "deepspeed":
                    os.killpg(p.pid, signal.SIGTERM)
                else:
                    p.send_signal(signal.SIGTERM)
            break
        time.sleep(0.05)
    output = "".join(p.communicate(timeout=120)[0] for p in procs)
    codes = [p.returncode for p in procs]
    assert codes == ([-signal.SIGTERM] if how == "deepspeed" else [143] * ranks), (codes, output[-2000:])
    assert "received SIGTERM: stopped after optimizer step" in output
    latest = json.loads((out / "checkpoints" / "index.json").read_text())["latest"]
    stopped_at = int(latest.split("_")[1])
    assert (
        20 <= stopped_at < 400 and len(list((out / "checkpoints" / latest).glob("rank_state*.pt"))) == ranks
    )
    again = launch(args, ranks=ranks)
    assert f"resumed from {out / 'checkpoints' / latest} at optimizer step {stopped_at}" in again.stdout
    assert json.loads((out / "summary.json").read_text())["steps"] == 400
    steps = [s for s, _ in series(out, "train/loss")]
    assert steps == sorted(set(steps)) and steps[-1] == 400  # one history, no step twice


def test_resume_on_a_different_world_size_continues_the_global_order(recipe, tmp_path):
    """1 rank to a checkpoint, then the same run on 2 ranks (ZeRO-0): the documents consumed after the resume,
    taken in global order (rank 0's row, rank 1's row, ...), are exactly those of an uninterrupted 1-rank run."""
    args = [
        "--recipe",
        str(recipe),
        "--data.packing=pad",
        "--data.log_sample_ids=true",
        "--checkpoint.every=10",
        "--train.eval_every=0",
        "--train.micro_batch_size=8",
    ]
    straight, moved = tmp_path / "straight", tmp_path / "moved"
    launch(args + ["--output_dir", straight, "--train.max_steps=30"])
    launch(args + ["--output_dir", moved, "--train.max_steps=10"])
    # 2 ranks x 4 rows = the same 8 rows per optimizer step; steps 11-30 continue the order
    proc = launch(
        args
        + [
            "--output_dir",
            moved,
            "--train.max_steps=30",
            "--train.micro_batch_size=4",
            "--train.rebuild_schedule=true",
        ],
        ranks=2,
    )
    assert "resumed from" in proc.stdout
    one = (straight / "samples.rank0.txt").read_text().splitlines()
    r0, r1 = ((moved / f"samples.rank{r}.txt").read_text().splitlines() for r in (0, 1))
    # rank 0's file keeps the 80 documents of the 1-rank steps (10 x 8 rows, one document per row with pad) and
    # adds 80; rank 1's holds its 80. Interleaved in global row order they continue the uninterrupted run.
    assert len(r0) == 160 and len(r1) == 80 and r0[:80] == one[:80]
    assert [doc for pair in zip(r0[80:], r1) for doc in pair] == one[80:240]
