"""Profiling runs: the analytic FLOPs agree with torch's FLOP counter on real models, and launch/profile.py
writes a consistent profile.json and profile.md."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, child_env, run_inprocess
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoConfig, AutoModelForMaskedLM

from dapt.config.gpus import BY_NAME, peak_for_device
from dapt.tools.profile import forward_flops

ARCHS = {
    "bert": {},
    "roberta": {"pad_token_id": 1},
    "distilbert": {"dim": 64, "n_layers": 3, "n_heads": 2, "hidden_dim": 96},
    # a window of 16 over 48 tokens: the local layers' attention term is the window's, not the row's
    "modernbert": {"global_attn_every_n_layers": 2, "local_attention": 16, "pad_token_id": 0},
}


@pytest.mark.parametrize("kind", ARCHS)
def test_analytic_flops_match_torchs_flop_counter(kind):
    fields = {
        "vocab_size": 500,
        "hidden_size": 64,
        "num_hidden_layers": 3,
        "num_attention_heads": 2,
        "intermediate_size": 96,
        "max_position_embeddings": 128,
    } | ARCHS[kind]
    config = AutoConfig.for_model(kind, **fields)
    model = AutoModelForMaskedLM.from_config(config, attn_implementation="eager").eval()
    seq = 48
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(input_ids=torch.randint(5, 500, (2, seq)))
    counted = counter.get_total_flops() / (2 * seq)
    mine = forward_flops(config, seq)
    if kind == "modernbert":
        # eager attention computes every score and masks those outside the window; the analytic count is the
        # useful work (what a sliding-window kernel does): 4 x hidden per token for each key outside the window
        local = [i for i in range(config.num_hidden_layers) if i % config.global_attn_every_n_layers]
        outside = seq - (config.local_attention + 1)
        counted -= len(local) * 4 * config.hidden_size * outside
        assert local and outside > 0
    assert mine["encoder"] + mine["head"] == pytest.approx(counted, rel=0.01)


def test_profile_run_writes_a_consistent_report(recipe, tmp_path):
    out = tmp_path / "prof"
    argv = [
        "--recipe",
        recipe,
        "--output_dir",
        out,
        "--profile.warmup=2",
        "--profile.steps=4",
        "--profile.trace=true",
    ]
    from dapt.cli.load import load_config
    from dapt.runtime.group import setup_logging
    from dapt.tools.profile import run as profile

    cfg = load_config([str(a) for a in argv], world_size=1, accelerator="cpu")
    setup_logging("warning")
    report = profile(cfg)
    saved = json.loads((out / "profile.json").read_text())
    assert saved["settings"]["profiled_steps"] == 4 and saved["settings"]["sparse_prediction"] is True
    parts = sum(saved["parts_seconds_median"].values())
    assert 0 < parts <= saved["step_seconds"]["max"] * 1.05
    th = saved["throughput"]
    assert 0 < th["real_tokens_per_second"] <= th["slots_per_second"]
    assert th["real_tokens_per_second"] / th["slots_per_second"] == pytest.approx(th["packing_efficiency"])
    f = saved["flops"]
    assert f["peak_source"].startswith("measured") and 0 < f["mfu"] < 1
    assert f["achieved_tflops_per_rank"] == pytest.approx(
        f["per_step_per_rank"] / report["step_seconds"]["median"] / 1e12
    )
    assert "| MFU |" in (out / "profile.md").read_text()
    assert (out / "trace.rank0.json").stat().st_size > 1000
    assert not (out / "checkpoints").exists()  # a profiling run trains nothing worth keeping


def test_profile_with_gradient_accumulation_measures_the_step_peak(recipe, tmp_path):
    """Seed 000's settings use accumulation 2: torch's MemTracker refuses a module called twice in one tracked
    region, so each micro-batch is tracked on its own and the step's peak is the largest of them."""
    from dapt.cli.load import load_config
    from dapt.runtime.group import setup_logging
    from dapt.tools.profile import run as run_profile

    peaks = {}
    for accum in (1, 2):
        cfg = load_config(
            [
                str(a)
                for a in [
                    "--recipe",
                    recipe,
                    "--output_dir",
                    tmp_path / f"a{accum}",
                    "--profile.warmup=1",
                    "--profile.steps=1",
                    f"--train.grad_accum={accum}",
                ]
            ],
            world_size=1,
            accelerator="cpu",
        )
        setup_logging("warning")
        peaks[accum] = run_profile(cfg)["peak_memory"]
    assert "largest of 2 micro-batches" in peaks[2]["how"] and "micro-batches" not in peaks[1]["how"]
    # the same micro batch, so the same activations; with accumulation the first micro-batch's gradients are
    # alive in the second
    assert peaks[1]["parts_gb"]["activation"] > 0
    assert peaks[1]["peak_gb"] * 0.99 <= peaks[2]["peak_gb"] <= peaks[1]["peak_gb"] * 1.25


def test_the_gpu_table_names_the_issue_gpus_and_matches_device_names():
    """One table of GPU facts: every GPU the issues name, looked up by the names torch gives devices."""
    assert peak_for_device("NVIDIA GeForce RTX 3090") == (71.0, "RTX-3090")
    assert peak_for_device("NVIDIA H100 PCIe")[0] == 756.0  # the more specific name is matched first
    assert peak_for_device("NVIDIA H100 80GB HBM3") == (989.0, "H100-80GB")
    assert peak_for_device("NVIDIA RTX PRO 6000 Blackwell Server Edition") == (500.0, "RTX-PRO-6000")
    assert peak_for_device("NVIDIA A100-SXM4-80GB")[0] == 312.0 and peak_for_device("Tesla T4") is None
    for name in (
        "RTX-3090",
        "RTX-4090",
        "A100-40GB",
        "A100-80GB",
        "H100-80GB",
        "H200",
        "L40S",
        "RTX-PRO-6000",
    ):
        assert name in BY_NAME and BY_NAME[name].memory_gb > 0 and BY_NAME[name].skypilot


def test_profile_entry_point_help_and_stdlib_profile():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "launch" / "profile.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        env=child_env(),
    )
    assert proc.returncode == 0 and "--profile.steps=int" in proc.stdout
    # launch/profile.py shares its name with the standard library module that cProfile (imported by torch) loads:
    # every launch script, run as `python launch/X.py`, must still get the real one
    for script in ("mlm.py", "profile.py"):
        code = (
            f"import runpy, sys; sys.argv = ['{script}', '--help']; sys.path.insert(0, 'launch')\n"
            "import contextlib, io\nwith contextlib.redirect_stdout(io.StringIO()):\n"
            f"    try: runpy.run_path('launch/{script}', run_name='__main__')\n    except SystemExit: pass\n"
            "import cProfile, profile; assert profile.run and cProfile.Profile; print('ok')"
        )
        check = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=ROOT,
            env=child_env(),
        )
        assert check.stdout.strip().endswith("ok"), check.stderr[-2000:]


def test_profile_run_inprocess_contract(recipe, tmp_path):
    """The same run through the config loader used by every entry point (no profile section needed)."""
    summary = run_inprocess(
        ["--recipe", recipe, "--output_dir", tmp_path / "r", "--train.max_steps=2", "--profile.steps=3"]
    )
    assert summary["steps"] == 2  # profile fields do not disturb a training run


def test_a_compiled_profiling_run_times_the_compiled_step(recipe, tmp_path):
    """train.compile in profiling runs: the engine is compiled before the timed steps (aot_eager here); the report
    reads it from the engine (DeepSpeed's is_compiled), not from the config."""
    from dapt.cli.load import load_config
    from dapt.runtime.group import setup_logging
    from dapt.tools.profile import run as run_profile

    reports = {}
    for mode in ("off", "aot_eager"):
        cfg = load_config(
            [
                str(a)
                for a in [
                    "--recipe",
                    recipe,
                    "--output_dir",
                    tmp_path / mode,
                    "--profile.warmup=1",
                    "--profile.steps=2",
                    f"--train.compile={mode}",
                ]
            ],
            world_size=1,
            accelerator="cpu",
        )
        setup_logging("warning")
        reports[mode] = run_profile(cfg)
    assert (
        reports["aot_eager"]["settings"]["compile"] == "aot_eager"
        and reports["off"]["settings"]["compile"] == "off"
    )
    for report in reports.values():
        assert report["throughput"]["real_tokens_per_second"] > 0
