"""One typed, validated config tree from a YAML recipe, a DeepSpeed JSON and `--section.field=value` overrides.

Each concern owns a keyword-only dataclass; the string literal under a field is its documentation, shown by
`--help`. `load_config` collects every problem (unknown keys, wrong types, bad values, DeepSpeed contradictions)
and raises one `ConfigError` listing them all, before any process group exists.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """Every problem found in a recipe, DeepSpeed config and overrides, one per line."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {p}" for p in problems))


@dataclass(kw_only=True)
class ModelConfig:
    name_or_path: str | None = None
    """Hub id or local folder of a pretrained encoder, loaded with AutoModelForMaskedLM."""
    config: dict | str | None = None
    """Build from scratch instead: a mapping of config fields with `model_type` (bert, roberta, ...), or a config path."""
    tokenizer: str | None = None
    """Tokenizer hub id or folder; default: the model's own, or one trained on the corpus for from-scratch models."""
    tokenizer_vocab_size: int = 4000
    """Vocabulary size of the WordPiece tokenizer trained on the corpus when a from-scratch model names no tokenizer."""
    attn_implementation: str = "auto"
    """auto | flash_attention_2 | sdpa | eager. auto: flash_attention_2 when installed on CUDA in bf16/fp16, else sdpa, else eager."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward (HF gradient_checkpointing_enable; DeepSpeed's own block does nothing for HF models)."""
    trust_remote_code: bool = False
    """Allow model code from the hub to run. Off unless the recipe says so."""


@dataclass(kw_only=True)
class DataConfig:
    train: list[str] = field(default_factory=list)
    """Training files (local text or jsonl). Empty: the embedded default corpus that dapt generates itself."""
    valid: list[str] = field(default_factory=list)
    """Validation files; empty: `valid_fraction` of the training documents, chosen by a hash of each document."""
    test: list[str] = field(default_factory=list)
    """Test files, evaluated once at the end."""
    format: str = "lines"
    """lines (a document per line) | docs (documents separated by blank lines) | jsonl (field `text_field`)."""
    text_field: str = "text"
    """The jsonl field that holds the document text."""
    packing: str = "concat"
    """concat: documents joined and cut into full max_seq_length chunks (run_mlm group_texts) | pad: one document per row, truncated and padded."""
    max_seq_length: int = 128
    """Tokens per training row, special tokens included."""
    valid_fraction: float = 0.1
    """Share of training documents held out for validation when `valid` is empty (stable: decided by a hash of the text)."""
    on_error: str = "raise"
    """raise: stop at the first bad record, naming file, line and field | skip: skip it and count it in metrics and summary."""
    log_sample_ids: bool = False
    """Append the id (file:line) of every document each rank trains on to output_dir/samples.rank<R>.txt."""
    num_workers: int = 0
    """DataLoader worker processes per rank (masking runs there)."""


@dataclass(kw_only=True)
class MaskingConfig:
    rate: float = 0.15
    """Share of maskable tokens selected for prediction (BERT 15%; ModernBERT recipes use 30%)."""
    eval_rate: float | None = None
    """Masking rate for evaluation; default: the same as `rate` (ModernBERT evaluates at 15%)."""
    mask_prob: float = 0.8
    """Of the selected tokens: share replaced by the mask token."""
    random_prob: float = 0.1
    """Of the selected tokens: share replaced by a random token; the rest keep their token."""


@dataclass(kw_only=True)
class TrainConfig:
    max_steps: int = 0
    """Optimizer steps to run; 0: derived from `epochs`."""
    epochs: float = 1.0
    """Passes over the training chunks, used when max_steps is 0."""
    micro_batch_size: int = 8
    """Rows per rank per forward pass (fills train_micro_batch_size_per_gpu)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step (fills gradient_accumulation_steps)."""
    lr: float = 5e-4
    """Peak learning rate (fills optimizer lr)."""
    weight_decay: float = 0.01
    """AdamW weight decay; never applied to biases and norm weights."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    """AdamW betas."""
    eps: float = 1e-6
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 turns clipping off (fills gradient_clipping)."""
    lr_schedule: str = "linear"
    """linear | cosine | wsd (warmup-stable-decay) | constant; counted in optimizer steps."""
    warmup_steps: int = 0
    """Warmup length in optimizer steps (give this or warmup_ratio)."""
    warmup_ratio: float = 0.06
    """Warmup length as a share of all optimizer steps, used when warmup_steps is 0."""
    decay_ratio: float = 0.2
    """wsd: share of the steps spent in the final linear decay."""
    min_lr_ratio: float = 0.0
    """Final learning rate as a share of the peak (linear, cosine, wsd)."""
    precision: str = "auto"
    """auto | bf16 | fp16 | fp32; fills bf16/fp16 "auto" in the ds config. auto: bf16 where the hardware has it, else fp32."""
    optimizer_impl: str = "auto"
    """auto | deepspeed | torch. auto: DeepSpeed FusedAdam on CUDA, DeepSpeedCPUAdam with offload on CUDA, torch AdamW (foreach) on CPU."""
    eval_every: int = 100
    """Evaluate every N optimizer steps (and at the end); 0: only at the end."""
    eval_batches: int = 0
    """Cap on evaluation batches per rank; 0: the whole validation set."""
    log_every: int = 10
    """Log training metrics every N optimizer steps."""


@dataclass(kw_only=True)
class CheckpointConfig:
    every: int = 200
    """Save a resumable checkpoint every N optimizer steps (and at the end); 0: only at the end."""
    keep: int = 2
    """Keep the last K checkpoints (the best one by eval loss is kept as well)."""
    keep_best: bool = True
    """Keep the checkpoint with the lowest eval loss besides the last K."""


@dataclass(kw_only=True)
class LogConfig:
    wandb: bool = False
    """Log to Weights & Biases (honours WANDB_MODE=offline)."""
    wandb_project: str = "dapt"
    """W&B project name."""
    run_name: str | None = None
    """Run name for W&B and the logs; default: the output folder name."""
    progress: bool = True
    """Show a progress bar on rank 0."""
    plots: bool = True
    """Write loss, learning-rate and perplexity curves to output_dir/plots at the end."""
    level: str = "info"
    """Log level: debug | info | warning."""


@dataclass(kw_only=True)
class RunConfig:
    output_dir: str = "runs/default"
    """Where the run writes config, metrics, checkpoints, final model and plots."""
    seed: int = 42
    """Seed for model init, data order and masking."""
    resume: str = "auto"
    """auto: continue from the latest complete checkpoint in output_dir | never | a checkpoint folder."""
    ds: str | None = None
    """DeepSpeed JSON config; default: the built-in ZeRO-0 config with precision from train.precision."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)

    # Not config fields: filled by load_config.
    ds_config: dict = field(default_factory=dict, repr=False, metadata={"internal": True})
    explicit: set = field(default_factory=set, repr=False, metadata={"internal": True})
    adopted: dict = field(default_factory=dict, repr=False, metadata={"internal": True})

    def to_dict(self) -> dict:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)
                if not f.metadata.get("internal")}


CHOICES = {
    "model.attn_implementation": ("auto", "flash_attention_2", "sdpa", "eager"),
    "data.format": ("lines", "docs", "http", "jsonl", "csv", "tsv", "parquet"),
    "data.packing": ("concat", "packed", "pad"),
    "data.on_error": ("raise", "skip"),
    "train.lr_schedule": ("linear", "cosine", "wsd", "constant"),
    "train.precision": ("auto", "bf16", "fp16", "fp32"),
    "train.optimizer_impl": ("auto", "deepspeed", "torch"),
    "log.level": ("debug", "info", "warning"),
}
# Values DESIGN.md names that the streaming data layer will bring; refused with that reason until then.
NOT_YET = {"data.format": ("http", "csv", "tsv", "parquet"), "data.packing": ("packed",)}


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    return value


def field_docs(cls: type) -> dict[str, str]:
    """Map each field of a dataclass to the string literal written under it."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)):
            docs[node.target.id] = nxt.value.value
    return docs


def _sections() -> dict[str, type]:
    hints = typing.get_type_hints(RunConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(RunConfig) if dataclasses.is_dataclass(hints[f.name])}


def help_text(prog: str = "launch/mlm.py") -> str:
    """`--help`: every section and field with its type, default and docstring."""
    lines = [f"usage: {prog} [--recipe RECIPE.yaml] [--ds DS_CONFIG.json] [--section.field=value ...]", ""]
    run_docs, run_hints = field_docs(RunConfig), typing.get_type_hints(RunConfig)
    defaults = RunConfig()
    for name in ("output_dir", "seed", "resume", "ds"):
        lines.append(_help_line(name, run_hints[name], getattr(defaults, name), run_docs.get(name, "")))
    for name, cls in _sections().items():
        lines += ["", f"[{name}]"]
        docs, hints, inst = field_docs(cls), typing.get_type_hints(cls), cls()
        for f in dataclasses.fields(cls):
            lines.append(_help_line(f"{name}.{f.name}", hints[f.name], getattr(inst, f.name), docs.get(f.name, "")))
    return "\n".join(lines)


def _help_line(key: str, typ: Any, default: Any, doc: str) -> str:
    return f"  --{key}={_type_name(typ)}  (default: {default!r})\n      {doc}"


def _type_name(typ: Any) -> str:
    return getattr(typ, "__name__", None) or str(typ).replace("typing.", "")


# ---------------------------------------------------------------- parsing

def parse_argv(argv: list[str]) -> tuple[str | None, dict[str, Any], bool]:
    """Split argv into (recipe path, dotted overrides, help asked). Accepts `--k=v` and `--k v`."""
    recipe, overrides, want_help, problems = None, {}, False, []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            want_help = True
            i += 1
            continue
        if not arg.startswith("--"):
            problems.append(f"unexpected argument {arg!r}: options look like --section.field=value")
            i += 1
            continue
        key, sep, value = arg[2:].partition("=")
        if not sep:
            if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                value = "true"  # a bare flag such as --log.wandb
            else:
                i += 1
                value = argv[i]
        i += 1
        if key == "local_rank":  # the DeepSpeed launcher appends it; LOCAL_RANK carries the same
            continue
        if key == "recipe":
            recipe = value
        else:
            overrides[key] = yaml.safe_load(value) if value != "" else ""
    if problems:
        raise ConfigError(problems)
    return recipe, overrides, want_help


def _nest(overrides: dict[str, Any]) -> dict[str, Any]:
    """{"train.lr": 1} -> {"train": {"lr": 1}}; a key that is both a value and a section is an error."""
    tree: dict[str, Any] = {}
    problems = []
    for key, value in overrides.items():
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                problems.append(f"--{key}: {part!r} is given both as a value and as a section")
                break
        else:
            node[parts[-1]] = value
    if problems:
        raise ConfigError(problems)
    return tree


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _coerce(key: str, value: Any, typ: Any, problems: list[str]) -> Any:
    """Check `value` against the annotation `typ`; return it converted, or record a problem."""
    origin, args = typing.get_origin(typ), typing.get_args(typ)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errs: list[str] = []
        for arg in (a for a in args if a is not type(None)):
            tmp: list[str] = []
            out = _coerce(key, value, arg, tmp)
            if not tmp:
                return out
            errs += tmp
        problems.append(f"{key}: expected {_type_name(typ)}, got {value!r}")
        return value
    if origin is list:
        items = value if isinstance(value, list) else ([value] if isinstance(value, str | int | float) else None)
        if items is None:
            problems.append(f"{key}: expected a list, got {value!r}")
            return value
        return [_coerce(f"{key}[{i}]", v, args[0], problems) for i, v in enumerate(items)] if args else items
    if typ is bool:
        if isinstance(value, bool):
            return value
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif typ is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif typ is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
    elif typ is dict:
        if isinstance(value, dict):
            return value
    problems.append(f"{key}: expected {_type_name(typ)}, got {value!r} ({type(value).__name__})")
    return value


def _build(cls: type, values: dict, prefix: str, problems: list[str], explicit: set) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if not f.metadata.get("internal")]
    kwargs = {}
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            problems.append(f"unknown key {dotted!r}; valid keys{' in ' + prefix[:-1] if prefix else ''}: "
                            + ", ".join(names))
            continue
        typ = hints[key]
        if dataclasses.is_dataclass(typ):
            if not isinstance(value, dict):
                problems.append(f"{dotted}: expected a section (mapping), got {value!r}")
                continue
            kwargs[key] = _build(typ, value, f"{dotted}.", problems, explicit)
        else:
            before = len(problems)
            coerced = _coerce(dotted, value, typ, problems)
            if len(problems) == before:  # a wrong value keeps the default, so the other checks still run
                kwargs[key] = coerced
                explicit.add(dotted)
    return cls(**kwargs)


def load_config(argv: list[str], world_size: int | None = None, accelerator: str | None = None) -> RunConfig:
    """Build the validated config tree from command-line arguments.

    Args:
        argv: arguments after the program name (`--recipe`, `--ds`, `--section.field=value`).
        world_size: number of ranks; default: $WORLD_SIZE or 1.
        accelerator: "cuda" or "cpu"; default: what torch sees.

    Raises:
        ConfigError: listing every problem found.
    """
    recipe, overrides, _ = parse_argv(argv)
    problems: list[str] = []
    if recipe:
        values = _read_yaml(recipe, problems)
    else:
        values = embedded_default(overrides)
    values = _merge(values, _nest(overrides))
    explicit: set[str] = set()
    cfg = _build(RunConfig, values, "", problems, explicit)
    cfg.explicit = explicit
    from dapt.dsconfig import resolve_ds_config

    world = world_size or int(os.environ.get("WORLD_SIZE", "1"))
    cfg.ds_config = resolve_ds_config(cfg, world, accelerator or _accelerator(), problems)
    for problem in validate(cfg):
        key = problem.split(":", 1)[0]
        problems.append(f"{problem} (value taken from ds {cfg.adopted[key]})" if key in cfg.adopted else problem)
    if problems:
        raise ConfigError(list(dict.fromkeys(problems)))
    return cfg


def embedded_default(overrides: dict[str, Any]) -> dict:
    """The recipe used without --recipe: a tiny BERT from scratch (dapt.corpus.DEFAULT_OVERRIDES).

    Naming a pretrained model on the command line drops the from-scratch model fields.
    """
    from dapt.corpus import DEFAULT_OVERRIDES

    chosen = dict(DEFAULT_OVERRIDES)
    if "model.name_or_path" in overrides or "model.config" in overrides:
        chosen = {k: v for k, v in chosen.items() if not k.startswith("model.")}
    return _nest(chosen)


def _accelerator() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _read_yaml(path: str, problems: list[str]) -> dict:
    try:
        text = Path(path).read_text()
    except OSError as e:
        problems.append(f"recipe {path}: cannot read ({e.strerror})")
        return {}
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problems.append(f"recipe {path}{where}: not valid YAML ({getattr(e, 'problem', e)})")
        return {}
    if not isinstance(data, dict):
        problems.append(f"recipe {path}: the top level must be a mapping of sections, got {type(data).__name__}")
        return {}
    return data


def validate(cfg: RunConfig) -> list[str]:
    """Value and cross-field checks; returns every problem found."""
    p: list[str] = []
    for key, allowed in CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in allowed:
            p.append(f"{key}: {value!r} is not one of {', '.join(allowed)}")
        elif value in NOT_YET.get(key, ()):
            p.append(f"{key}: {value!r} comes with the streaming data layer and is not implemented yet; "
                     f"use one of {', '.join(v for v in allowed if v not in NOT_YET[key])}")
    if cfg.resume not in ("auto", "never") and not Path(cfg.resume).is_dir():
        p.append(f"resume: {cfg.resume!r} is neither auto, never nor an existing checkpoint folder")
    m, d, t, k = cfg.model, cfg.data, cfg.train, cfg.masking
    if m.name_or_path and m.config is not None:
        p.append("model.name_or_path and model.config are exclusive: load a pretrained model or build one from a config")
    if isinstance(m.config, dict) and "model_type" not in m.config:
        p.append("model.config: a mapping needs model_type (bert, roberta, distilbert, modernbert, ...)")
    if m.tokenizer_vocab_size < 100:
        p.append(f"model.tokenizer_vocab_size: {m.tokenizer_vocab_size} is too small (at least 100)")
    for name in ("train", "valid", "test"):
        for path in getattr(d, name):
            if not Path(path).exists():
                p.append(f"data.{name}: file {path!r} not found")
    if not d.train and (d.valid or d.test):
        p.append("data.valid/data.test given without data.train")
    _positive(p, "data.max_seq_length", d.max_seq_length, minimum=8)
    if not 0 <= d.valid_fraction < 1:
        p.append(f"data.valid_fraction: {d.valid_fraction} must be in [0, 1)")
    if d.num_workers < 0:
        p.append(f"data.num_workers: {d.num_workers} must be >= 0")
    for name in ("rate", "eval_rate"):
        rate = getattr(k, name)
        if rate is not None and not 0 < rate < 1:
            p.append(f"masking.{name}: {rate} must be in (0, 1)")
    if k.mask_prob < 0 or k.random_prob < 0 or k.mask_prob + k.random_prob > 1:
        p.append(f"masking.mask_prob + masking.random_prob = {k.mask_prob + k.random_prob} must be within [0, 1]")
    for name in ("micro_batch_size", "grad_accum", "log_every"):
        _positive(p, f"train.{name}", getattr(t, name))
    for name in ("max_steps", "warmup_steps", "eval_every", "eval_batches"):
        _positive(p, f"train.{name}", getattr(t, name), minimum=0)
    _positive(p, "checkpoint.every", cfg.checkpoint.every, minimum=0)
    _positive(p, "checkpoint.keep", cfg.checkpoint.keep)
    if t.max_steps == 0 and t.epochs <= 0:
        p.append(f"train.epochs: {t.epochs} must be > 0 when train.max_steps is 0")
    if t.lr <= 0:
        p.append(f"train.lr: {t.lr} must be > 0")
    if t.weight_decay < 0 or t.grad_clip < 0 or t.eps <= 0:
        p.append("train.weight_decay and train.grad_clip must be >= 0, train.eps > 0")
    if len(t.betas) != 2 or not all(0 <= b < 1 for b in t.betas):
        p.append(f"train.betas: {t.betas} must be two numbers in [0, 1)")
    if not 0 <= t.warmup_ratio < 1 or not 0 <= t.decay_ratio <= 1 or not 0 <= t.min_lr_ratio <= 1:
        p.append("train.warmup_ratio must be in [0, 1); train.decay_ratio and train.min_lr_ratio in [0, 1]")
    if t.warmup_steps and "train.warmup_ratio" in cfg.explicit and t.warmup_ratio:
        p.append("train.warmup_steps and train.warmup_ratio are both set; give one")
    return p


def _positive(problems: list[str], key: str, value: int, minimum: int = 1) -> None:
    if value < minimum:
        problems.append(f"{key}: {value} must be >= {minimum}")


def save_resolved(cfg: RunConfig, path: Path) -> None:
    """Write the full config and the final DeepSpeed config as YAML."""
    doc = cfg.to_dict()
    doc["deepspeed"] = cfg.ds_config
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
