"""Shared fixtures: a small generated corpus, a tiny from-scratch recipe, in-process and launcher runs."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
MLM = ROOT / "launch" / "mlm.py"
DS = ROOT / "ds_configs"

# Offline, quiet, one thread per rank (two ranks share two cores), no JIT op builds in a shared cache.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")

TINY_MODEL = {
    "model_type": "bert",
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "max_position_embeddings": 64,
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
}


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory) -> Path:
    from dapt.data.corpus import generate

    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n".join(generate(1200, seed=7)) + "\n")
    return path


@pytest.fixture(scope="session")
def labelled(tmp_path_factory) -> Path:
    """Two classes a tiny model separates: HTTP requests vs threat-report sentences (the default corpus)."""
    from dapt.data.corpus import generate

    path = tmp_path_factory.mktemp("labelled") / "docs.jsonl"
    rows = [
        {"text": t, "label": "http" if t.split(" ", 1)[0] in ("GET", "POST", "PUT", "DELETE") else "report"}
        for t in generate(600, seed=11)
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@pytest.fixture
def recipe(tmp_path, corpus_file) -> Path:
    """A tiny from-scratch MLM recipe over the generated corpus; tests override fields on the command line."""
    doc = {
        "seed": 1,
        "model": {"config": TINY_MODEL, "tokenizer_vocab_size": 400},
        "data": {"train": [str(corpus_file)], "max_seq_length": 32},
        "train": {
            "max_steps": 6,
            "micro_batch_size": 8,
            "lr": 2e-3,
            "log_every": 1,
            "eval_every": 3,
            "eval_batches": 4,
            "warmup_steps": 1,
        },
        "checkpoint": {"every": 3, "keep": 2},
        "log": {"progress": False},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def run_inprocess(argv: list[str]) -> dict:
    """One rank inside the pytest process: the real config loader, DeepSpeed engine and loop."""
    from dapt.cli.load import load_config
    from dapt.runtime.group import setup_logging
    from dapt.tasks.mlm import run

    cfg = load_config([str(a) for a in argv], world_size=1, accelerator="cpu")
    setup_logging("warning")
    return run(cfg)


def free_port() -> int:
    """A port for a rendezvous that a launched rank binds seconds from now: below the kernel's ephemeral range, so no
    outgoing connection of another xdist worker's runs is handed it meanwhile, and in a block of 1,000 of this
    worker's own, so no other worker picks it; not the same twice in this worker (dapt's own `free_port`, bind to port 0,
    serves one process, and is the fallback)."""
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw"))
    block = range(10000 + 1000 * worker, 11000 + 1000 * worker)
    ephemeral_from = int(EPHEMERAL.read_text().split()[0]) if EPHEMERAL.is_file() else 0
    if block.stop <= ephemeral_from:  # else no room below it (or not Linux)
        for port in random.sample(block, len(block)):
            if port in _HANDED_OUT:  # free now, but a run this test starts may be still to bind it
                continue
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue
            _HANDED_OUT.add(port)
            return port
    from dapt.runtime.group import free_port as any_free_port

    return any_free_port()  # one the kernel says is free now


EPHEMERAL = Path("/proc/sys/net/ipv4/ip_local_port_range")  # Linux's: the ports connect() hands out
_HANDED_OUT: set[int] = set()


def launch_command(ranks: int, script: Path = MLM, port: int | None = None) -> list[str]:
    """The command line that starts `script` on `ranks` processes: plain python for 1, DeepSpeed's runner for more."""
    if ranks == 1:
        return [sys.executable, str(script)]
    runner = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks)]
    return [*runner, "--master_port", str(port or free_port()), str(script)]


def launch(
    args: list[str],
    ranks: int = 1,
    timeout: int = 300,
    cwd: Path | None = None,
    check: bool = True,
    script: Path = MLM,
) -> subprocess.CompletedProcess:
    """Run a launch/ script in fresh processes (launch_command) and wait for it; `check`: a failure raises."""
    proc = subprocess.run(
        launch_command(ranks, script) + [str(a) for a in args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd or ROOT,
        env=child_env(),
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-4000:]}\nSTDERR:\n{proc.stderr[-4000:]}"
        )
    return proc


def child_env() -> dict:
    """The environment for launched runs, without the rank variables that in-process runs set in this process."""
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    return {**env, "PYTHONUNBUFFERED": "1"}


DIST_VARS = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"}


def byte_level_bpe(texts: list[str], vocab_size: int):
    """A RoBERTa-style tokenizer (byte-level BPE, <s> ... </s>, untrimmed offsets) trained here on `texts`."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer(trim_offsets=False)
    bpe.train_from_iterator(
        texts, vocab_size=vocab_size, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        mask_token="<mask>",
    )


def metrics(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]


def series(out: Path, key: str) -> list[tuple[int, float]]:
    return [(r["step"], r[key]) for r in metrics(out) if key in r]


def shared_slice(src: Path, dst: Path, lines: int) -> Path:
    """The first `lines` lines of a gzipped ../shared data file, as a plain file in a test folder."""
    import gzip

    with gzip.open(src, "rt", newline="") as f, dst.open("w", newline="") as g:
        for i, line in enumerate(f):
            if i >= lines:
                break
            g.write(line)
    return dst


FLASH_STUB = Path(__file__).resolve().parent / "flash_stub"


@pytest.fixture
def flash_stub(monkeypatch):
    """transformers' real flash_attention_2 integration on this CPU, over tests/flash_stub's pure-PyTorch kernels.
    transformers refuses flash attention without CUDA: only the CUDA check it makes for flash-attn is answered yes
    (torch.cuda itself is untouched), and dapt's own gate (a GPU of compute capability 8.0+, bf16/fp16) is opened."""
    import importlib

    from transformers.utils import import_utils

    import dapt.model.build

    monkeypatch.syspath_prepend(str(FLASH_STUB))
    importlib.invalidate_caches()
    monkeypatch.setattr(import_utils, "is_torch_cuda_available", lambda: True)
    monkeypatch.setattr(dapt.model.build, "flash_attention_problem", lambda precision: None)
    for cached in (import_utils._package_distribution_mapping, import_utils.is_flash_attn_2_available):
        cached.cache_clear()
    import flash_attn

    flash_attn.CALLS.clear()
    monkeypatch.setattr(flash_attn, "FAIL", None)
    assert import_utils.is_flash_attn_2_available()
    yield flash_attn
    monkeypatch.undo()
    for cached in (import_utils._package_distribution_mapping, import_utils.is_flash_attn_2_available):
        cached.cache_clear()


def hub_cache(root: Path, models: list[str]) -> Path:
    """A Hugging Face cache (the layout huggingface_hub reads: refs/main naming a snapshot) holding each hub model's
    config.json, written from dapt's architecture table: what a machine that fetched the models once has."""
    from dapt.model.archs import model_config

    for name in models:
        repo = root / f"models--{name.replace('/', '--')}"
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / "main").write_text("0" * 40)
        snapshot = repo / "snapshots" / ("0" * 40)
        snapshot.mkdir(parents=True, exist_ok=True)
        (snapshot / "config.json").write_text(model_config(name).to_json_string())
    return root
