"""Memory planner: per-GPU memory of an MLM run for ZeRO 0-3 with and without offload, micro-batch sizes and
gradient checkpointing; the recommended DeepSpeed config and micro batch.

Model states follow DeepSpeed's own accounting (its estimate_zero2/zero3_model_states_mem_needs functions, which
the tests compare against): bf16 weights and gradients, fp32 master weights, fp32 gradient partitions and Adam
moments. Activations are measured by default: the bytes autograd saves for one real row on this CPU, scaled by
the micro batch. A row longer than plan.measure_tokens, or too big for this machine, is measured shorter and scaled:
linearly, and its square attention tensors (SDPA masks, eager scores) by the square of the ratio; flash attention
keeps none of those. Without the measurement they follow Korthikanti et al. (2022) per layer, (15 h + 4 f) bytes
per token in 16-bit, plus the attention scores (5 a s bytes per token) unless SDPA or flash attention keeps them
out of memory. Gradient checkpointing keeps each layer's input and one layer's activations. The MLM head adds its
transform and the logits of the predicted tokens (fp32 for the loss). Buffers: the ZeRO reduce bucket. The CUDA
context (about 0.5-1 GB) is not in torch's peak figure and not in the estimate.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from dapt.config.gpus import BY_NAME
from dapt.config.schema import RunConfig

log = logging.getLogger("dapt")

GB = 2**30


@dataclass(frozen=True)
class Setup:
    stage: int
    offload: str  # none | optimizer | optimizer+params
    checkpointing: bool
    micro_batch: int


def model_facts(cfg: RunConfig) -> dict:
    """Parameter count and shape of the model the config names, built on the meta device (no weights loaded)."""
    from transformers import AutoConfig, AutoModelForMaskedLM

    import dapt.model.canine  # noqa: F401  (CANINE's masked-LM class)
    from dapt.model.archs import model_config
    from dapt.model.hub import pretrained

    m = cfg.model
    if m.name_or_path:
        conf = model_config(m.name_or_path, m.trust_remote_code)  # the seeds' models need no network
    elif isinstance(m.config, str):
        conf = pretrained(AutoConfig.from_pretrained, m.config, "model.config")
    else:
        fields = dict(m.config or {})
        conf = AutoConfig.for_model(fields.pop("model_type"), **fields)
    if not m.name_or_path:  # sized as the run sizes it (dapt.model.build.model_config): to the tokenizer
        if conf.model_type == "canine":
            conf.char_vocab = m.char_vocab
        else:
            conf.vocab_size = _tokenizer_size(cfg)
    with torch.device("meta"):
        model = AutoModelForMaskedLM.from_config(conf)
    params = sum({id(p): p.numel() for p in model.parameters()}.values())  # tied weights once
    largest = max(sum(p.numel() for p in mod.parameters(recurse=False)) for mod in model.modules())
    from dapt.tools.profile import model_dims

    hidden, layers, ffn, vocab = model_dims(conf)
    heads = getattr(conf, "num_attention_heads", None) or conf.n_heads
    return {
        "type": conf.model_type,
        "parameters": params,
        "largest_layer_parameters": largest,
        "hidden": hidden,
        "layers": layers,
        "ffn": ffn,
        "vocab": vocab,
        "heads": heads,
        "config": conf,
    }


@dataclass(frozen=True)
class RowMeasure:
    """The bytes one real row saved for backward (fp32, this CPU), split by how they grow with the row length:
    `linear` (hidden states, projections, the head's rows) and `attention`: square (tokens x tokens) tensors such as
    SDPA's materialized attention masks (ModernBERT's sliding window) or eager attention's probabilities, which grow
    with its square and which flash attention never keeps. `embed` and `head` are the parts of `linear` saved before
    the first encoder layer and after the last (MLM head and loss): gradient checkpointing recomputes neither.
    `loss` stays fp32 in bf16 training; the rest halves."""

    tokens: int
    implementation: str  # the attention implementation measured: sdpa, or eager where the model has no SDPA
    linear: float
    attention: float
    embed: float = 0.0
    head: float = 0.0
    loss: float = (
        0.0  # the part of `head` the loss saves in fp32 whatever the training precision (its log-softmax)
    )

    def at(self, seq: int, flash: bool = False) -> float:
        r = seq / self.tokens
        return self.linear * r + (0.0 if flash else self.attention * r * r)

    def checkpointed(
        self,
        seq: int,
        flash: bool,
        layers: int,
        layer_inputs: float,
        head_gradient: float,
        hidden_bytes: float,
    ) -> float:
        """The larger of two moments under gradient checkpointing: backward starting at the loss (embeddings, layer
        inputs, the head's tensors and its logits' gradient), and one layer recomputed later (embeddings, layer
        inputs, that layer's own share and the gradients of its input and output)."""
        r = seq / self.tokens
        embed, head = self.embed * r, self.head * r
        layer = (self.at(seq, flash) - embed - head) / layers
        return embed + layer_inputs + max(head + head_gradient, layer + 2 * hidden_bytes)


def _tokenizer_size(cfg: RunConfig) -> int:
    """The vocabulary a from-config model gets: the named tokenizer's, or the one dapt trains (at most
    model.tokenizer_vocab_size tokens; a small corpus may give fewer)."""
    if not cfg.model.tokenizer:
        return cfg.model.tokenizer_vocab_size
    from dapt.model.build import load_tokenizer

    return len(load_tokenizer(cfg, Path(cfg.output_dir)))


def measured_activation_bytes(
    conf, seq: int, mask_rate: float, sparse: bool, attention: str = "sdpa"
) -> RowMeasure:
    """Bytes the real model saves for backward on one row of `seq` tokens (fp32, on this CPU): the tensors autograd
    keeps, counted once each, parameters left out. Attention dropout is set to 0 so that CPU SDPA keeps no attention
    scores, as the fused GPU kernels do not."""
    import copy

    import torch.nn.functional as F
    from transformers import AutoModelForMaskedLM
    from transformers.modeling_layers import GradientCheckpointingLayer

    from dapt.model.sparse import SparsePrediction

    conf = copy.deepcopy(conf)
    for name in ("attention_probs_dropout_prob", "attention_dropout"):
        if hasattr(conf, name):
            setattr(conf, name, 0.0)
    for impl in (
        ["eager"] if attention == "eager" else ["sdpa", "eager"]
    ):  # CANINE has no SDPA: eager, as it runs
        try:
            model = AutoModelForMaskedLM.from_config(conf, attn_implementation=impl).train()
            break
        except (ValueError, ImportError):
            if impl == "eager":
                raise
    g = torch.Generator().manual_seed(0)
    classes = (
        getattr(model.config, "char_vocab", None) or conf.vocab_size
    )  # CANINE: code points below its classes
    ids = torch.randint(5, classes, (1, seq), generator=g)
    labels = torch.where(torch.rand(ids.shape, generator=g) < mask_rate, ids, torch.full_like(ids, -100))
    where = labels != -100
    saved: dict[int, tuple[int, bool, str]] = {}
    where_now = {
        "depth": 0,
        "layers_done": 0,
        "loss": False,
    }  # in a layer checkpointing recomputes; layers run

    def keep(t):
        if isinstance(t, torch.Tensor):
            square = t.dim() == 4 and t.shape[-1] == t.shape[-2] > 1  # (rows, heads or 1, tokens, tokens)
            part = (
                "layer"
                if where_now["depth"]
                else "loss"
                if where_now["loss"]
                else "head"
                if where_now["layers_done"]
                else "embed"
            )
            saved.setdefault(t.untyped_storage().data_ptr(), (t.untyped_storage().nbytes(), square, part))
        return t

    def enter(*_):
        where_now["depth"] += 1

    def leave(*_):
        where_now["depth"] -= 1
        where_now["layers_done"] += 1

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    hooks = [h for m in layers for h in (m.register_forward_pre_hook(enter), m.register_forward_hook(leave))]
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        if sparse:
            with SparsePrediction(model).select(where):
                logits = model(input_ids=ids).logits[0]
        else:
            logits = model(input_ids=ids).logits[where]
        where_now["loss"] = True
        F.cross_entropy(logits.float(), labels[where], reduction="sum")
    for h in hooks:
        h.remove()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept = [v for ptr, v in saved.items() if ptr not in params]
    return RowMeasure(
        seq,
        impl,
        linear=float(sum(n for n, sq, _ in kept if not sq)),
        attention=float(sum(n for n, sq, _ in kept if sq)),
        embed=float(sum(n for n, sq, part in kept if not sq and part == "embed")),
        head=float(sum(n for n, sq, part in kept if not sq and part in ("head", "loss"))),
        loss=float(sum(n for n, sq, part in kept if not sq and part == "loss")),
    )


def measure_length(f: dict, seq: int, mask_rate: float, sparse: bool, longest: int = 2048) -> int | None:
    """The row length to measure: `seq` up to `longest`, else halved until one fp32 row fits comfortably in
    this machine's free memory (weights, saved activations, and eager-size attention scores of one layer for the
    forward pass); None when no row of 64 tokens or more fits (the analytic estimate is used, and logged)."""
    import psutil

    if f["parameters"] > 2e9:
        return None
    free = psutil.virtual_memory().available
    tokens = seq
    while tokens >= min(seq, 64):
        need = (
            4 * f["parameters"]
            + activation_bytes(f, tokens, 1, False, "sdpa", mask_rate, sparse, bf16=False)
            + 4 * f["heads"] * tokens * tokens
        )
        if tokens <= longest and need <= 0.4 * free:
            return tokens
        tokens //= 2
    log.info(
        "activation measurement skipped: even a %d-token row needs about %.1f GB, this machine has %.1f GB "
        "free; the analytic estimate is used",
        tokens * 2,
        need / GB,
        free / GB,
    )
    return None


def model_state_bytes(params: int, largest: int, stage: int, offload: str, gpus: int, bf16: bool) -> float:
    """Weights, gradients and optimizer states on one GPU."""
    if offload != "none":  # the optimizer states (and with params, the weights) live in CPU memory
        if stage < 3:
            return (2 if bf16 else 4) * params
        return 4 * largest + (0 if "params" in offload else (2 if bf16 else 4) * params / gpus)
    if bf16:  # bf16 weights and gradients, fp32 master weights, fp32 gradients, Adam moments
        return {
            0: 20 * params,
            1: 4 * params + 16 * params / gpus,
            2: 2 * params + 18 * params / gpus,
            3: 4 * largest + 18 * params / gpus,
        }[stage]
    return {
        0: 16 * params,
        1: 8 * params + 8 * params / gpus,
        2: 4 * params + 12 * params / gpus,
        3: 4 * largest + 16 * params / gpus,
    }[stage]


def activation_bytes(
    f: dict,
    seq: int,
    micro: int,
    checkpointing: bool,
    attention: str,
    mask_rate: float,
    sparse: bool,
    bf16: bool,
) -> float:
    h, layers, ffn, vocab, heads = f["hidden"], f["layers"], f["ffn"], f["vocab"], f["heads"]
    scale = 1.0 if bf16 else 2.0  # the 16-bit figures double in fp32
    tokens = seq * micro
    layer = tokens * (15 * h + 4 * ffn) * scale + (5 * heads * seq * tokens if attention == "eager" else 0)
    body = (layers * 2 * tokens * h * scale + layer) if checkpointing else layers * layer
    predicted = tokens * mask_rate if sparse else tokens
    head = predicted * (
        3 * h * 2 * scale + vocab * (2 * scale + 8)
    )  # transform; logits, fp32 softmax and its grad
    return body + head + tokens * h * 2 * scale  # + the embeddings' output


def head_gradient_bytes(seq: int, vocab: int, mask_rate: float, sparse: bool, bf16: bool) -> float:
    """What one row adds, beyond its saved tensors, when backward starts at the loss. Sparse head: the fp32 gradient
    of the predicted tokens' logits and its 16-bit copy. Dense head: two full-size gradients of all the row's
    logits (the one the selection of masked tokens scatters into, and the output projection's working copy), which
    outlast the small one. Both measured with torch's MemTracker on CPU (bench/plan_vs_measured.py)."""
    if not sparse:
        return 2 * seq * vocab * (2 if bf16 else 4)
    return seq * mask_rate * vocab * (4 + (2 if bf16 else 0))


def estimate(
    f: dict,
    s: Setup,
    seq: int,
    gpus: int,
    bf16: bool,
    attention: str,
    mask_rate: float,
    sparse: bool,
    measured: RowMeasure | None = None,
) -> dict:
    """Per-GPU memory of one set-up. With a `measured` row (fp32 bytes, scaled to `seq`; its square attention tensors
    left out under flash attention), activations are that row times the micro batch (halved in bf16); gradient
    checkpointing keeps the layer inputs and one layer's share."""
    states = model_state_bytes(f["parameters"], f["largest_layer_parameters"], s.stage, s.offload, gpus, bf16)
    if measured is None:
        acts = activation_bytes(f, seq, s.micro_batch, s.checkpointing, attention, mask_rate, sparse, bf16)
    else:
        flash, half = attention == "flash_attention_2", 0.5 if bf16 else 1.0
        head_gradient = (
            head_gradient_bytes(seq, f["vocab"], mask_rate, sparse, bf16) / half
        )  # scaled back below
        if s.checkpointing:
            hidden = seq * f["hidden"] * 4
            row = measured.checkpointed(seq, flash, f["layers"], f["layers"] * hidden, head_gradient, hidden)
        else:
            row = measured.at(seq, flash) + head_gradient
        acts = s.micro_batch * (
            half * row + (1 - half) * measured.loss * seq / measured.tokens
        )  # the loss: fp32
    buffers = (
        4 * f["hidden"] ** 2 * (2 if s.stage else 0)
    )  # reduce bucket ("auto": hidden^2 elements), x2 in flight
    return {
        "model_states_gb": states / GB,
        "activations_gb": acts / GB,
        "buffers_gb": buffers / GB,
        "total_gb": (states + acts + buffers) / GB,
    }


def estimate_for(result: dict, checkpointing: bool, stage: int = 0, offload: str = "none") -> dict:
    """The row of a plan's estimates for one set-up (at the first micro batch planned for it)."""
    return next(
        r
        for r in result["estimates"]
        if (r["stage"], r["offload"], r["checkpointing"]) == (stage, offload, checkpointing)
    )


def asked_setup(cfg: RunConfig) -> tuple[int, str] | None:
    """(ZeRO stage, offload) of the DeepSpeed config given with --ds, which the plan keeps to; None without --ds."""
    if not cfg.ds:
        return None
    zero = cfg.ds_config.get("zero_optimization", {})
    offload = [
        name
        for name, key in (("optimizer", "offload_optimizer"), ("params", "offload_param"))
        if zero.get(key, {}).get("device", "none") != "none"
    ]
    return int(zero.get("stage", 0)), "+".join(offload) or "none"


def candidates(micro_batches: list[int]) -> list[Setup]:
    """Fastest first: no offload before offload, no recomputation before it, lower ZeRO stages first."""
    out = []
    for offload in ("none", "optimizer", "optimizer+params"):
        for checkpointing in (False, True):
            for stage in (0, 1, 2, 3):
                if offload != "none" and stage < 2 or offload == "optimizer+params" and stage < 3:
                    continue
                out += [Setup(stage, offload, checkpointing, m) for m in sorted(micro_batches, reverse=True)]
    return out


def run(cfg: RunConfig) -> dict:
    p = cfg.plan
    facts = model_facts(cfg)
    # the plan is for GPUs: "auto" precision means bf16 there, whatever this machine would pick
    bf16 = cfg.train.precision != "fp32" if "train.precision" in cfg.explicit else True
    attention = (
        cfg.model.attn_implementation
        if cfg.model.attn_implementation in ("eager", "flash_attention_2")
        else "sdpa"
    )  # auto may find no flash-attn on the GPU: plan for SDPA, which can keep attention masks
    budget = BY_NAME[p.gpu].memory_gb * p.headroom
    seq = cfg.data.max_seq_length
    tokens = (
        measure_length(facts, seq, cfg.masking.rate, cfg.train.sparse_prediction, p.measure_tokens)
        if p.measure
        else None
    )
    measured = None
    if tokens:
        measured = measured_activation_bytes(
            facts["config"], tokens, cfg.masking.rate, cfg.train.sparse_prediction, attention
        )
        attention = "eager" if measured.implementation == "eager" else attention  # the model has no SDPA
        log.info(
            "activations measured on one real %d-token row on this CPU: %.1f MB (fp32), %.1f MB of it square "
            "attention tensors%s",
            tokens,
            (measured.linear + measured.attention) / 2**20,
            measured.attention / 2**20,
            "" if tokens == seq else f"; scaled to {seq} tokens: {measured.at(seq) / 2**20:.1f} MB",
        )
    rows = []
    for s in candidates(p.micro_batches):
        e = estimate(
            facts, s, seq, p.gpus, bf16, attention, cfg.masking.rate, cfg.train.sparse_prediction, measured
        )
        rows.append({**s.__dict__, **{k: round(v, 3) for k, v in e.items()}, "fits": e["total_gb"] <= budget})
    asked = asked_setup(cfg)
    pool = [r for r in rows if (r["stage"], r["offload"]) == asked] if asked else rows
    fitting = [r for r in pool if r["fits"]]
    good = [r for r in fitting if r["micro_batch"] >= p.min_micro_batch] or fitting
    choice = good[0] if good else None
    if asked and choice is None:  # the ZeRO stage asked for does not fit: say so, and what would
        log.warning(
            "ZeRO %d with offload %s (--ds %s) does not fit %s at any micro batch of %s; planning over every stage",
            *asked,
            cfg.ds,
            p.gpu,
            p.micro_batches,
        )
        fitting = [r for r in rows if r["fits"]]
        good = [r for r in fitting if r["micro_batch"] >= p.min_micro_batch] or fitting
        choice = good[0] if good else None
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "model": {k: v for k, v in facts.items() if k != "config"},
        "gpu": p.gpu,
        "gpu_memory_gb": BY_NAME[p.gpu].memory_gb,
        "gpus": p.gpus,
        "headroom": p.headroom,
        "seq": cfg.data.max_seq_length,
        "precision": "bf16" if bf16 else "fp32",
        "attention": attention,
        "sparse_prediction": cfg.train.sparse_prediction,
        "activations": _activation_source(measured, seq, attention),
        "asked": {"stage": asked[0], "offload": asked[1], "ds": cfg.ds} if asked else None,
        "recommendation": choice,
        "estimates": rows,
    }
    if choice and p.write_ds:
        result["ds_config"] = str(write_ds_config(choice, Path(p.write_ds)))
    result["time"] = estimated_time(cfg, facts)
    (out / "plan.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "plan.md").write_text(_markdown(result))
    log.info(
        "estimated training time: %s on %d x %s (%s)",
        duration(result["time"]["hours"]),
        p.gpus,
        p.gpu,
        result["time"]["tokens_from"],
    )
    if choice:
        log.info(
            "plan for %d x %s: ZeRO %d, offload %s, micro batch %d%s: %.1f GB of %d GB per GPU (%s)",
            p.gpus,
            p.gpu,
            choice["stage"],
            choice["offload"],
            choice["micro_batch"],
            ", gradient checkpointing" if choice["checkpointing"] else "",
            choice["total_gb"],
            BY_NAME[p.gpu].memory_gb,
            out / "plan.md",
        )
    else:
        log.warning(
            "nothing fits %d x %s at %d tokens, even ZeRO-3 with offload and micro batch %d",
            p.gpus,
            p.gpu,
            cfg.data.max_seq_length,
            min(p.micro_batches),
        )
    return result


def _activation_source(m: RowMeasure | None, seq: int, attention: str) -> dict:
    if m is None:
        return {"source": "analytic (Korthikanti et al.)"}
    return {
        "source": "measured: saved tensors of one real row on this CPU, scaled by the micro batch",
        "measured_tokens": m.tokens,
        "measured_attention": m.implementation,
        "linear_mb_fp32": round(m.linear / 2**20, 2),
        "square_attention_mb_fp32": round(m.attention / 2**20, 2),
        "row_mb_fp32": round(m.at(seq, attention == "flash_attention_2") / 2**20, 2),
        "scaling": "not scaled"
        if m.tokens == seq
        else f"scaled: linear part x {seq / m.tokens:g}, square part x {(seq / m.tokens) ** 2:g}",
    }


def epoch_tokens(cfg: RunConfig, facts: dict) -> tuple[float, str]:
    """Training tokens per epoch and how they were found (plan.tokens, the steps asked for, or the files)."""
    p, t, d = cfg.plan, cfg.train, cfg.data
    if p.tokens:
        return float(p.tokens), "plan.tokens"
    if t.max_steps:
        return float(
            t.max_steps * t.micro_batch_size * t.grad_accum * p.gpus * d.max_seq_length
        ), "train.max_steps x global batch x data.max_seq_length (one 'epoch' = the whole run)"
    from dapt.data.prepare import format_options, read_documents

    per_token = 1.0 if facts["type"] == "canine" else p.chars_per_token
    cap = (
        d.max_seq_length * per_token if d.packing == "pad" else float("inf")
    )  # pad: one truncated row per document
    chars = sum(
        min(len(doc.text), cap)
        for doc in read_documents(d.train, d.format, on_error="skip", options=format_options(d))
    )
    if d.max_tokens:
        chars = min(chars, d.max_tokens * per_token)
    return chars / per_token, f"{chars:,.0f} characters of data.train at {per_token:g} per token"


def estimated_time(cfg: RunConfig, facts: dict) -> dict:
    """Hours of training on plan.gpus x plan.gpu: 3 x forward FLOPs per token (forward and backward, attention at
    data.max_seq_length, the MLM head on masked tokens only when sparse) x tokens, at plan.mfu of the dense bf16 peak."""
    from dapt.tools.profile import forward_flops

    p, t = cfg.plan, cfg.train
    tokens, source = epoch_tokens(cfg, facts)
    flops = forward_flops(facts["config"], cfg.data.max_seq_length)
    head_share = cfg.masking.rate if t.sparse_prediction else 1.0
    per_token = 3 * (flops["encoder"] + flops["head"] * head_share)
    peak = BY_NAME[p.gpu].peak_tflops
    epochs = 1.0 if t.max_steps else t.epochs
    hours = epochs * tokens * per_token / (p.gpus * peak * 1e12 * p.mfu) / 3600
    return {
        "hours": round(hours, 3),
        "epochs": epochs,
        "tokens_per_epoch": round(tokens),
        "tokens_from": source,
        "train_flops_per_token": per_token,
        "peak_tflops": peak,
        "mfu_assumed": p.mfu,
    }


def duration(hours: float) -> str:
    """Hours as a person reads them: 12.3 h, 25 min, 40 s, under 1 s (a tiny run is not "0.00 h")."""
    seconds = hours * 3600
    if hours >= 1:
        return f"{hours:.1f} h"
    if seconds >= 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds:.0f} s" if seconds >= 1 else "under 1 s"


def write_ds_config(choice: dict, path: Path) -> Path:
    """The shipped config of that stage (bf16, "auto" for the recipe's values), with offload as chosen."""
    root = Path(__file__).resolve().parents[3] / "ds_configs"
    name = (
        "zero3_offload_bf16.json"
        if choice["offload"] != "none" and choice["stage"] == 3
        else f"zero{choice['stage']}_bf16.json"
    )
    ds = json.loads((root / name).read_text())
    zero = ds.setdefault("zero_optimization", {"stage": choice["stage"]})
    if choice["offload"] == "none":
        zero.pop("offload_optimizer", None)
        zero.pop("offload_param", None)
    else:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        if "params" in choice["offload"]:
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
        else:
            zero.pop("offload_param", None)
    ds["train_micro_batch_size_per_gpu"] = "auto"  # from train.micro_batch_size, as the plan says to set it
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(ds, indent=2) + "\n")
    return path


def _markdown(r: dict) -> str:
    m, c = r["model"], r["recommendation"]
    lines = [
        f"# Memory plan: {m['type']}, {m['parameters'] / 1e6:.1f}M parameters, {r['seq']} tokens, "
        f"{r['gpus']} x {r['gpu']} ({r['gpu_memory_gb']} GB, {100 * r['headroom']:.0f}% usable), "
        f"{r['precision']}",
        "",
    ]
    if c:
        lines += [
            f"**Recommended:** ZeRO {c['stage']}, offload {c['offload']}, micro batch {c['micro_batch']}"
            f"{', gradient checkpointing' if c['checkpointing'] else ''}: {c['total_gb']:.1f} GB per GPU"
            + (f" (DeepSpeed config written to {r['ds_config']})" if r.get("ds_config") else "")
            + (
                f" (kept to ZeRO {r['asked']['stage']} of --ds {r['asked']['ds']})"
                if r.get("asked") and r["asked"]["stage"] == c["stage"]
                else f" (ZeRO {r['asked']['stage']} of --ds {r['asked']['ds']} does not fit)"
                if r.get("asked")
                else ""
            ),
            "",
            f"    --train.micro_batch_size={c['micro_batch']}"
            + (" --model.gradient_checkpointing=true" if c["checkpointing"] else ""),
            "",
        ]
    else:
        lines += ["**Nothing fits**, even with ZeRO-3, offload and gradient checkpointing.", ""]
    a = r["activations"]
    if "measured_tokens" in a:
        lines += [
            f"**Activations** measured on one real {a['measured_tokens']}-token row on this CPU: "
            f"{a['linear_mb_fp32']:.1f} MB growing with the tokens, {a['square_attention_mb_fp32']:.1f} MB of "
            f"square attention tensors (masks or scores; none under flash attention); "
            f"{a['row_mb_fp32']:.1f} MB per {r['seq']}-token row in fp32 ({a['scaling']}); "
            f"measured with {a['measured_attention']} attention, planned for {r['attention']}.",
            "",
        ]
    else:
        lines += [f"**Activations** from the analytic formula: {a['source']}.", ""]
    tm = r["time"]
    lines += [
        f"**Estimated time:** {duration(tm['hours'])} for {tm['epochs']:g} epoch(s) of {tm['tokens_per_epoch']:,} "
        f"tokens ({tm['tokens_from']}), at an assumed {100 * tm['mfu_assumed']:.0f}% of {tm['peak_tflops']:g} "
        "TFLOPS per GPU: an estimate from analytic FLOPs, not a measurement (launch/profile.py measures).",
        "",
    ]
    lines += [
        "| ZeRO | offload | checkpointing | micro batch | model states GB | activations GB | total GB | fits |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {e['stage']} | {e['offload']} | {'yes' if e['checkpointing'] else 'no'} | {e['micro_batch']} | "
        f"{e['model_states_gb']:.2f} | {e['activations_gb']:.2f} | {e['total_gb']:.2f} | "
        f"{'yes' if e['fits'] else 'no'} |"
        for e in r["estimates"]
    ]
    return "\n".join(lines) + "\n"
