"""launch/profile.py: warm-up, then N optimizer steps of launch/mlm.py's own step function, timed in parts, with
FLOPs and MFU.

Step time is split into data (taking and collating rows), forward, backward and optimizer step; on a GPU each
part ends with a synchronize, so the parts add up (and the run is a little slower than training). Throughput is
given for real tokens (padding excluded) and for token slots separately. Achieved TFLOPS come from the analytic
FLOPs of the encoder per token (projections, feed-forward and attention at the row length) and of the MLM head per
predicted token (masked positions with sparse prediction, every slot without), x3 for forward and backward; MFU
divides them by the accelerator's peak: a table of dense bf16 tensor-core figures for GPUs, a measured matmul peak
on CPU, or profile.peak_tflops.
"""

from __future__ import annotations

import contextlib
import json
import logging
import statistics
import time
from pathlib import Path

import torch

from dapt.config.dsconfig import describe_optimizer
from dapt.config.gpus import peak_for_device
from dapt.config.schema import RunConfig
from dapt.runtime import group
from dapt.runtime.runner import Clock, parameter_count
from dapt.runtime.train import take_step, train
from dapt.tasks.mlm import MaskedLM, masked_count

log = logging.getLogger("dapt")


def model_dims(c) -> tuple[int, int, int, int]:
    """(hidden, layers, feed-forward width, vocabulary) under BERT-style or DistilBERT-style names."""
    hidden = getattr(c, "hidden_size", None) or c.dim
    layers = getattr(c, "num_hidden_layers", None) or c.n_layers
    ffn = getattr(c, "intermediate_size", None) or getattr(c, "hidden_dim", None) or 4 * hidden
    vocab = (
        getattr(c, "vocab_size", None) or getattr(c, "char_vocab", None) or 1024
    )  # CANINE: its head's classes
    return hidden, layers, ffn, vocab


def forward_flops(config, seq: int) -> dict[str, float]:
    """Forward FLOPs per token: `encoder` (all layers, attention at row length `seq`) and `head` (per predicted
    token: transform and vocabulary projection). Multiply-adds count 2; norms, activations and softmax are left out."""
    h, layers, ffn, vocab = model_dims(config)
    per_layer = []
    for i in range(layers):
        if config.model_type == "canine":  # the deep stack runs on 1 of every `rate` characters
            rate = config.downsampling_rate
            per_layer.append((8 * h * h + 4 * h * ffn + 4 * (seq // rate) * h) / rate)
        elif (
            config.model_type == "modernbert"
        ):  # gated MLP (input projection to 2 x ffn); local layers see a window
            span = seq if i % config.global_attn_every_n_layers == 0 else min(seq, config.local_attention + 1)
            per_layer.append(8 * h * h + 6 * h * ffn + 4 * span * h)
        else:
            per_layer.append(8 * h * h + 4 * h * ffn + 4 * seq * h)
    if config.model_type == "canine":  # plus one local-attention layer at character rate before and after it
        per_layer += [8 * h * h + 4 * h * ffn + 4 * min(seq, config.local_transformer_stride) * h] * 2
    head_width = getattr(config, "embedding_size", h) if config.model_type == "electra" else h
    return {"encoder": float(sum(per_layer)), "head": float(2 * h * head_width + 2 * head_width * vocab)}


def peak_tflops(accelerator: str, dtype: torch.dtype, override: float) -> tuple[float, str]:
    if override:
        return override, "profile.peak_tflops"
    if accelerator == "cuda":
        name = torch.cuda.get_device_name()
        found = peak_for_device(name)
        if found:
            return found[0], f"table: {found[1]} dense bf16"
        return 0.0, f"unknown GPU {name!r}: set profile.peak_tflops"
    return measured_matmul_tflops(dtype), f"measured {str(dtype).removeprefix('torch.')} matmul on this CPU"


def measured_matmul_tflops(dtype: torch.dtype, n: int = 1024, reps: int = 5) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e12


class Timer:
    """The profile's clock over dapt.runtime.train's loop: profile.warmup + profile.steps optimizer steps, the timed
    ones split in parts (in a torch.profiler trace with profile.trace), then one more step alone for its peak
    memory, and the report."""

    def __init__(self, cfg: RunConfig):
        self.cfg, self.p = cfg, cfg.profile
        self.parts = {k: [] for k in ("step", "data", "forward", "backward", "optimizer")}
        self.counts = {k: [] for k in ("tokens", "slots", "samples", "predicted")}
        self.clock: Clock | None = None
        self.tracer = None
        self.timing = False

    def steps(self) -> tuple[int, int]:
        steps = self.p.warmup + self.p.steps
        return steps, steps + 1  # one step more than timed: the last is run alone for its peak memory

    def before_engine(self, cfg: RunConfig, out: Path, ds: dict) -> dict:
        self.out, self.accelerator = out, "cuda" if torch.cuda.is_available() else "cpu"
        self.clock = Clock(self.accelerator)
        return ds | _flops_profiler(cfg, out)

    def begin(self, step: int) -> tuple:
        self.timing = step >= self.p.warmup
        if self.p.trace and step == self.p.warmup:
            self.tracer = _tracer(self.out, self.accelerator)
            self.tracer.__enter__()
        self.clock.begin()
        return (self.clock,)

    def record(self, step, micro: list[dict]) -> None:
        if not self.timing:
            return
        for key, value in {"step": sum(self.clock.parts.values()), **self.clock.parts}.items():
            self.parts[key].append(value)
        self.counts["tokens"].append(sum(int(b["attention_mask"].sum()) for b in micro))
        self.counts["slots"].append(sum(b["attention_mask"].numel() for b in micro))
        self.counts["samples"].append(sum(len(b["input_ids"]) for b in micro))
        self.counts["predicted"].append(sum(masked_count(b) for b in micro))

    def report(self, run) -> dict:
        """profile.json and profile.md (rank 0) from the timed steps and one more step's peak memory."""
        if self.tracer is not None:
            self.tracer.__exit__(None, None, None)
            self.tracer.export_chrome_trace(str(self.out / f"trace.rank{group.rank()}.json"))

        def one_step(around=contextlib.nullcontext) -> None:
            self.clock.begin()
            take_step(run, self.clock, around)

        memory = step_peak_memory(run.engine, self.accelerator, one_step)
        report = _report(self, run.engine, sparse=run.task.sparse is not None, memory=memory)
        if group.rank() == 0:
            _write(report, self.out)
        group.barrier()
        return report


def run(cfg: RunConfig) -> dict:
    """launch/mlm.py's run (dapt.runtime.train with the MLM task), timed: warm-up + profile.steps of its optimizer
    steps, no checkpoints, no resume; output_dir/profile.json and profile.md."""
    return train(cfg, MaskedLM(), Timer(cfg))


def _flops_profiler(cfg: RunConfig, out: Path) -> dict:
    """profile.ds_flops_profiler: DeepSpeed's own profiler at the first timed step (the DeepSpeed config's entry)."""
    if not cfg.profile.ds_flops_profiler:
        return {}
    return {
        "flops_profiler": {
            "enabled": True,
            "profile_step": cfg.profile.warmup + 1,
            "module_depth": -1,
            "top_modules": 3,
            "detailed": False,
            "output_file": str(out / "ds_flops_profiler.txt"),
        }
    }


def _write(report: dict, out: Path) -> None:
    (out / "profile.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "profile.md").write_text(_markdown(report))
    log.info(
        "profile: %.1f ms/step, %.0f real tokens/s, %.2f TFLOPS per rank, MFU %s; %s",
        1000 * report["step_seconds"]["median"],
        report["throughput"]["real_tokens_per_second"],
        report["flops"]["achieved_tflops_per_rank"],
        f"{100 * report['flops']['mfu']:.1f}%" if report["flops"]["mfu"] is not None else "n/a",
        out / "profile.md",
    )


def step_peak_memory(engine, accelerator: str, step) -> dict:
    """Peak memory of one more training step, run alone after the timed ones (optimizer states already exist).

    CUDA: the caching allocator's peak of allocated bytes. CPU has no such counter: torch's MemTracker follows every
    tensor alive (parameters, gradients, optimizer states, activations, temporaries), for a figure comparable with
    the GPU's and with launch/plan.py's estimate. MemTracker cannot follow a module called twice in one tracked
    region, so with gradient accumulation each micro-batch gets its own tracker and the step's peak is the largest
    (gradients accumulated by earlier micro-batches are alive, and tracked, in the later ones). It does not see
    tensors made before the step and held outside the module and a torch optimizer: ZeRO 1-3's flat partitions, so
    on CPU the figure is ZeRO 0's."""
    if accelerator == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step()
        return {
            "peak_gb": torch.cuda.max_memory_allocated() / 2**30,
            "how": "torch.cuda.max_memory_allocated over one training step",
        }
    from torch.distributed._tools.mem_tracker import MemTracker

    optimizer = engine.optimizer if isinstance(engine.optimizer, torch.optim.Optimizer) else None
    peaks: list[dict[str, float]] = []

    @contextlib.contextmanager
    def tracked():
        tracker = MemTracker()
        tracker.track_external(*[x for x in (engine.module, optimizer) if x is not None])
        with tracker:
            yield
        peak = tracker.get_tracker_snapshot("peak")
        peaks.append(
            {
                str(k.value if hasattr(k, "value") else k).lower(): v / 2**30
                for k, v in next(iter(peak.values())).items()
            }
        )

    step(tracked)
    by_kind = max(peaks, key=lambda p: p["total"])
    total = by_kind.pop("total")
    return {
        "peak_gb": total,
        "parts_gb": {k: round(v, 4) for k, v in by_kind.items()},
        "how": "torch MemTracker over one training step on CPU (tensors only, no allocator overhead"
        + (f"; the largest of {len(peaks)} micro-batches)" if len(peaks) > 1 else ")"),
    }


def _tracer(out: Path, accelerator: str):
    activities = [torch.profiler.ProfilerActivity.CPU]
    if accelerator == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    return torch.profiler.profile(activities=activities, record_shapes=True)


def _settings(cfg, engine, accelerator: str, *, sparse: bool, profiled: int) -> dict:
    t, seq = cfg.train, cfg.data.max_seq_length
    return {
        "max_seq_length": seq,
        "micro_batch_size": t.micro_batch_size,
        "grad_accum": t.grad_accum,
        "world_size": group.world(),
        "packing": cfg.data.packing,
        "precision": t.precision,
        "zero_stage": cfg.ds_config.get("zero_optimization", {}).get("stage", 0),
        "optimizer": describe_optimizer(cfg.ds_config, accelerator),
        "sparse_prediction": sparse,
        "compile": t.compile if getattr(engine, "is_compiled", False) else "off",  # as the engine is
        "gradient_checkpointing": cfg.model.gradient_checkpointing,
        "warmup_steps": cfg.profile.warmup,
        "profiled_steps": profiled,
    }


def _report(timer: Timer, engine, *, sparse: bool, memory: dict) -> dict:
    """The figures of profile.json from the timer's parts and counts, the model and one step's peak memory."""
    cfg, parts, counts, accelerator = timer.cfg, timer.parts, timer.counts, timer.accelerator
    model, world = engine.module, group.world()
    step = statistics.median(parts["step"])
    seq = cfg.data.max_seq_length
    per_token = forward_flops(model.config, seq)
    slots, predicted = statistics.mean(counts["slots"]), statistics.mean(counts["predicted"])
    head_tokens = predicted if sparse else slots
    step_flops = 3 * (slots * per_token["encoder"] + head_tokens * per_token["head"])
    dtype = next(model.parameters()).dtype
    peak, source = peak_tflops(accelerator, dtype, cfg.profile.peak_tflops)
    achieved = step_flops / step / 1e12
    return {
        "machine": _machine(accelerator),
        "model": {
            "type": model.config.model_type,
            "parameters": parameter_count(model),
            "attention": getattr(model.config, "_attn_implementation", None),
            "dtype": str(dtype),
        },
        "settings": _settings(cfg, engine, accelerator, sparse=sparse, profiled=len(parts["step"])),
        "step_seconds": {"median": step, "min": min(parts["step"]), "max": max(parts["step"])},
        "parts_seconds_median": {k: statistics.median(v) for k, v in parts.items() if k != "step"},
        "throughput": {
            "real_tokens_per_second": world * statistics.mean(counts["tokens"]) / step,
            "slots_per_second": world * slots / step,
            "samples_per_second": world * statistics.mean(counts["samples"]) / step,
            "packing_efficiency": statistics.mean(counts["tokens"]) / slots,
        },
        "flops": {
            "forward_per_token_encoder": per_token["encoder"],
            "forward_per_predicted_token_head": per_token["head"],
            "per_step_per_rank": step_flops,
            "achieved_tflops_per_rank": achieved,
            "peak_tflops": peak or None,
            "peak_source": source,
            "mfu": achieved / peak if peak else None,
            "note": "analytic: matmuls only, attention at the full row length, x3 for forward + backward; "
            "recomputation under gradient checkpointing is not counted (the MFU convention)",
        },
        "peak_memory_gb": memory["peak_gb"],
        "peak_memory": memory,
        "ds_flops_profiler": (
            str(Path(cfg.output_dir) / "ds_flops_profiler.txt") + ": DeepSpeed's profiler does not "
            "see SDPA or flash attention, so its total misses the attention matmuls"
            if cfg.profile.ds_flops_profiler
            else None
        ),
    }


def _machine(accelerator: str) -> dict:
    import platform

    import transformers

    info = {
        "accelerator": accelerator,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    if accelerator == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    else:
        info["cpu"] = next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            ),
            platform.processor(),
        )
        info["threads"] = torch.get_num_threads()
    return info


def _markdown(r: dict) -> str:
    s, f, th, parts = r["settings"], r["flops"], r["throughput"], r["parts_seconds_median"]
    mfu = f"{100 * f['mfu']:.1f}%" if f["mfu"] is not None else "n/a (no peak known)"
    peak = f"{f['peak_tflops']:.3g}" if f["peak_tflops"] else "n/a"
    lines = [
        f"# Profile: {r['model']['type']}, {r['model']['parameters'] / 1e6:.1f}M parameters",
        "",
        f"{r['machine'].get('gpu') or r['machine'].get('cpu')}; {s['world_size']} rank(s), ZeRO {s['zero_stage']}, "
        f"{s['precision']}, {s['optimizer']}; rows of {s['max_seq_length']} tokens, micro batch "
        f"{s['micro_batch_size']} x {s['grad_accum']}, {s['packing']} packing; sparse prediction "
        f"{'on' if s['sparse_prediction'] else 'off'}; {s['profiled_steps']} steps after {s['warmup_steps']} warm-up.",
        "",
        "| | |",
        "|---|---|",
        f"| step | {1000 * r['step_seconds']['median']:.1f} ms (median) |",
        *(f"| {k} | {1000 * v:.1f} ms |" for k, v in parts.items()),
        f"| real tokens/s | {th['real_tokens_per_second']:.0f} |",
        f"| token slots/s | {th['slots_per_second']:.0f} (packing efficiency {100 * th['packing_efficiency']:.1f}%) |",
        f"| samples/s | {th['samples_per_second']:.1f} |",
        f"| achieved TFLOPS per rank | {f['achieved_tflops_per_rank']:.3f} |",
        f"| peak TFLOPS | {peak} ({f['peak_source']}) |",
        f"| MFU | {mfu} |",
        f"| peak memory of one step | {r['peak_memory_gb']:.3f} GB ({r['peak_memory']['how']}) |",
        "",
        f"FLOPs: {f['note']}.",
    ]
    if r["ds_flops_profiler"]:
        lines += ["", f"DeepSpeed flops profiler: {r['ds_flops_profiler']}."]
    return "\n".join(lines) + "\n"
