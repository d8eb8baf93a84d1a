"""The config tree: one keyword-only dataclass per concern, under RunConfig, and the rules of its values.

The string literal under a field is its documentation, shown by `--help`. A choice field declares its allowed values
with the field (`choice`), which both `--help` and the check read; each section's own rules are its `problems()`,
beside its fields, and RunConfig.problems() adds the rules that join sections. dapt.cli.load builds the tree from a
recipe, overrides and the DeepSpeed JSON; dapt.cli.check adds the checks that need more than the config (files, the
hub, the output folder, a resume, DeepSpeed itself).
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dapt.config.gpus import INSTANCES, NAMES
from dapt.config.redact import redact


class ConfigError(ValueError):
    """Every problem found in a recipe, DeepSpeed config and overrides, one per line."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {p}" for p in problems))


class BadInput(ValueError):
    """Input the run was pointed at that it cannot use: a data file missing or unreadable, a bad record or label, a
    damaged checkpoint or model folder named by the user. The entry scripts end with exit 3 for it; a plain ValueError
    is a bug and keeps its traceback."""


GPUS = NAMES  # dapt.config.gpus: the one table of GPU facts
REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}")  # a hub repository
SAFE_WORD = re.compile(r"^[A-Za-z0-9._@+,:-]*$")  # values written into #SBATCH lines, which no shell quotes
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def choice(default: Any, allowed: tuple | dict) -> Any:
    """A field whose value is one of `allowed` (a list field: each of its entries); a dict gives what each value
    means. Declared here once: `--help` prints the values under the field, and Section.check refuses any other."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"choices": allowed})
    return field(default=default, metadata={"choices": allowed})


def at_least(problems: list[str], key: str, value: int, minimum: int = 1) -> None:
    if value < minimum:
        problems.append(f"{key}: {value} must be >= {minimum}")


class ReadOnly:
    """Read-only once loaded (`freeze`): a run reads its config and never changes it; what a run works out (the
    engine's DeepSpeed config, counters, the best score) lives in the run (dapt.runtime.train.Run). A variant is
    made with dataclasses.replace."""

    def __setattr__(self, name: str, value: Any) -> None:
        if self.__dict__.get("_frozen"):
            raise AttributeError(
                f"the config is read-only once loaded: {type(self).__name__}.{name} cannot be set (make a variant "
                "with dataclasses.replace)"
            )
        object.__setattr__(self, name, value)


class Section(ReadOnly):
    """A section of the config: its choice fields checked against their declared values, then its own rules."""

    def problems(self) -> list[str]:
        """This section's own rules (values, and fields of this section against each other); none by default."""
        return []

    def check(self, name: str) -> list[str]:
        """Every problem of this section, which RunConfig names `name`."""
        p = []
        for f in dataclasses.fields(self):
            allowed, value = f.metadata.get("choices"), getattr(self, f.name)
            if allowed is None:
                continue
            for v in value if isinstance(value, list) else [value]:  # a list field: each entry is one of them
                if v not in allowed:
                    p.append(f"{name}.{f.name}: {v!r} is not one of {', '.join(allowed)}")
        return p + self.problems()


CAPITAL_MARK = "^"  # model.mark_capitals: each ASCII capital is read as this and the letter


def normalizer_marks(normalizer) -> bool:
    """Whether a tokenizers normalizer (or None) marks capitals as model.mark_capitals does."""
    return normalizer is not None and normalizer.normalize_str("Q").startswith(CAPITAL_MARK)


@dataclass(kw_only=True)
class ModelConfig(Section):
    name_or_path: str | None = None
    """Hub id or local folder of a pretrained encoder (or a dapt run's final/), loaded with the task's head:
    AutoModelForMaskedLM for MLM runs, AutoModelForSequenceClassification for classifiers, AutoModel for embeddings."""
    config: dict | str | None = None
    """Build from scratch instead: a mapping of config fields with `model_type` (bert, roberta, ...), or a config path."""
    revision: str | None = None
    """Hub models: the branch, tag or commit of model.name_or_path to load (its tokenizer too, unless model.tokenizer
    names another); default: the main branch. Pin a commit to make a run repeatable."""
    tokenizer: str | None = None
    """Tokenizer hub id or folder; default: the model's own, or one trained on the corpus for from-scratch models."""
    tokenizer_vocab_size: int = 4000
    """Vocabulary size of the WordPiece tokenizer trained on the corpus when a from-scratch model names no tokenizer."""
    mark_capitals: bool = False
    """Write each ASCII capital as ^ and the letter in the tokenizer's normalizer (idA= is read as id ^ a =), so that an
    uncased model sees case; the text, its offsets and hash splits are untouched, but there are more tokens (about
    28% on CSIC requests), and a ^ before a lower-case letter in the text reads as a capital. Saved with final/'s
    tokenizer (transformers 5 reloads it so), so every later run on it marks too; for adapting, fine-tuning,
    embedding and anomaly scoring (a prediction or fill-mask run cannot add marks its model was not trained
    with). For traffic whose attacks change case (CSIC: bench/results/dapt_value.md)."""
    attn_implementation: str = choice("auto", ("auto", "flash_attention_2", "sdpa", "eager"))
    """Attention kernel. auto: flash_attention_2 when installed on CUDA in bf16/fp16, else sdpa, else eager."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward (HF gradient_checkpointing_enable; DeepSpeed's own block does nothing for HF models)."""
    trust_remote_code: bool = False
    """Allow model code from the hub to run. Off unless the recipe says so."""
    char_vocab: int = 1024
    """CANINE: classes of the character MLM head; code points at or above char_vocab - 1 share the last one."""

    def problems(self) -> list[str]:
        p = []
        if self.name_or_path and self.config is not None:
            p.append(
                "model.name_or_path and model.config are exclusive: load a pretrained model or build one from a "
                "config"
            )
        elif self.config == "":
            p.append("model.config: empty")
        if isinstance(self.config, dict) and "model_type" not in self.config:
            p.append("model.config: a mapping needs model_type (bert, roberta, distilbert, modernbert, ...)")
        if self.char_vocab < 2:
            p.append(
                f"model.char_vocab: {self.char_vocab} must be >= 2 (the classes of CANINE's character head)"
            )
        if self.mark_capitals and isinstance(self.config, dict) and self.config.get("model_type") == "canine":
            p.append("model.mark_capitals: CANINE reads code points and sees case already")
        if self.tokenizer_vocab_size < 100:
            p.append(f"model.tokenizer_vocab_size: {self.tokenizer_vocab_size} is too small (at least 100)")
        return p


@dataclass(kw_only=True)
class DataConfig(Section):
    train: list[str] = field(default_factory=list)
    """Training sources: files, globs or folders, local or fsspec URLs (s3://, gs://, https://), .gz/.bz2/.zst read
    transparently. Empty: the embedded default corpus that dapt generates itself."""
    train_weights: list[float] = field(default_factory=list)
    """Weighted mixing: one weight per data.train entry (e.g. a domain corpus 3, a general one 1); each source gets
    that share of the rows (of data.streams, at least one stream each). Empty: all entries form one corpus."""
    valid: list[str] = field(default_factory=list)
    """Validation files; empty: `valid_fraction` of the training documents, chosen by a hash of each document."""
    test: list[str] = field(default_factory=list)
    """Test files, evaluated once at the end."""
    format: str = choice(
        "lines",
        {
            "lines": "a document per line",
            "docs": "documents separated by blank lines",
            "http": "raw HTTP requests (CSIC 2010)",
            "jsonl": "a record per line, the text in data.text_field",
            "json": "a document holding a list of records (data.records_field), the text in data.text_field",
            "csv": "rows as key:value text (data.columns, data.column_names)",
            "tsv": "as csv, tab-separated",
            "parquet": "the column data.text_field",
            "arrow": "a Hugging Face datasets folder written by save_to_disk (one split), the column data.text_field",
        },
    )
    """The format of data.train / valid / test; when not given, the files' own extension decides where they all
    agree (.csv, .tsv, .jsonl, .json, .parquet, also compressed), else lines."""
    text_field: str = "text"
    """The jsonl/json field or parquet/arrow column that holds the document text."""
    records_field: str = ""
    """json: the field of each file's JSON document that holds the list of records (objects for a STIX bundle such as
    MITRE ATT&CK); empty: the document is the list."""
    columns: list[str] = field(default_factory=list)
    """csv/tsv: the columns written as `key:value` text, in this order (one column: its value alone); empty: all
    but the label."""
    column_names: list[str] = field(default_factory=list)
    """csv/tsv files without a header line: the names of their columns."""
    round_digits: int | None = None
    """csv/tsv: round decimal values to this many digits (shorter, more regular text)."""
    omit_zeros: bool = False
    """csv/tsv: leave out the `name:value` pairs whose value is zero (0, 0.00, after rounding): a sparse record's text
    keeps what is there (NSL-KDD's 41 features: 333 MiniLM tokens a row on average, 126 without the zeros)."""
    packing: str = choice(
        "concat",
        {
            "concat": "documents joined and cut into rows (run_mlm's group_texts)",
            "packed": "whole documents packed by best fit, attention kept within each document",
            "pad": "one document per row, truncated, padded per micro-batch to a multiple of 8",
        },
    )
    """How documents become rows of data.max_seq_length tokens."""
    max_seq_length: int = 128
    """Tokens per training row, special tokens included."""
    valid_fraction: float = 0.1
    """Share of training documents held out for validation when `valid` is empty (stable: decided by a hash of the text)."""
    on_error: str = choice(
        "raise",
        {
            "raise": "stop at the first bad record",
            "skip": "skip it and count it in metrics and summary",
        },
    )
    """What a bad record does (file, line and field are named either way)."""
    log_sample_ids: bool = False
    """Append the id (file:line) of every document each rank trains on to output_dir/samples.rank<R>.txt."""
    num_workers: int = 0
    """DataLoader worker processes per rank reading and tokenizing its streams (0: in the training process)."""
    streams: int = 8
    """Canonical data streams, independent of the world size (must be a multiple of it). Keep it fixed to get the same
    global sample order on any number of ranks, including after resuming on a different one."""
    block_docs: int = 1024
    """Documents per block: the unit of shuffling and packing, and the most a resume has to re-read per stream."""
    min_chars: int = 1
    """Drop documents shorter than this many characters (counted)."""
    max_chars: int = 0
    """Drop documents longer than this many characters (counted); 0: no limit."""
    max_record_bytes: int = 64 << 20
    """A line longer than this is a bad record ("oversize": raise or skip per on_error), never read into memory."""
    volatile: list[str] = choice(
        [],
        {  # data/volatile.py applies them, in this order
            "cookie": "the values of Cookie: header lines' name=value pairs, and the first of Set-Cookie:, when "
            "identifier-shaped (6+ letters, digits, . _ ~ -: an attack's quote, space, % or + keeps a value)",
            "session_id": "identifier-shaped values of session and token parameters (jsessionid, phpsessid, sid, sessionid, "
            "token, csrf...) in URLs, paths and form bodies",
            "hex": "runs of 16 or more hex digits with at least one digit and one letter (hashes, ids), not right after a %",
            "base64": "runs of 24 or more base64 characters with upper case, lower case and a digit (tokens, keys)",
        },
    )
    """Random identifiers replaced by <id> in every document as it is read, for training, embedding and scoring
    alike (the HTTP recipes: [cookie, session_id]); the rest of the text is unchanged. Empty: none."""
    num_samples: int = 0
    """Use at most this many training documents per epoch (quick runs); 0: all."""
    max_records_per_file: int = 0
    """Classifier, embedding and anomaly runs: read only the first N records of each file (a quick run on a slice
    of real files; for MLM runs use num_samples); 0: all."""
    dedupe: bool = False
    """Skip exact duplicate documents (first occurrence kept); one parsing pass over the corpus at start."""
    max_tokens: int = 0
    """Token budget: keep about the newest max_tokens tokens of an ordered corpus (the tail of its files, in order),
    estimated from characters; one parsing pass at start. 0: everything."""
    valid_max_docs: int = 5000
    """Cap on validation documents gathered by the hash split; 0: no cap. MLM: the first ones of the corpus; the
    classifier: those with the lowest hashes (every file sampled), and training leaves out exactly those."""
    tokenizer_docs: int = 100000
    """Documents read from the start of the corpus to train a tokenizer for a from-scratch model."""

    def problems(self) -> list[str]:
        p: list[str] = []
        at_least(p, "data.max_seq_length", self.max_seq_length, minimum=8)
        if not 0 <= self.valid_fraction < 1:
            p.append(f"data.valid_fraction: {self.valid_fraction} must be in [0, 1)")
        counts = (
            "num_workers",
            "min_chars",
            "max_chars",
            "num_samples",
            "valid_max_docs",
            "max_records_per_file",
        )
        for name in counts:
            at_least(p, f"data.{name}", getattr(self, name), minimum=0)
        for name in ("streams", "block_docs", "tokenizer_docs", "max_record_bytes"):
            at_least(p, f"data.{name}", getattr(self, name))
        weights = self.train_weights
        if weights and len(weights) != len(self.train):
            p.append(f"data.train_weights: {len(weights)} weights for {len(self.train)} data.train entries")
        if any(w <= 0 for w in weights):
            p.append(f"data.train_weights: {weights} must all be > 0")
        if len(weights) > self.streams:
            p.append(f"data.train_weights: {len(weights)} sources need data.streams >= {len(weights)}")
        if weights and self.max_tokens:
            p.append(
                "data.max_tokens applies to one ordered corpus; it cannot be combined with data.train_weights"
            )
        at_least(p, "data.max_tokens", self.max_tokens, minimum=0)
        if self.max_chars and self.max_chars < self.min_chars:
            p.append(f"data.max_chars: {self.max_chars} is below data.min_chars {self.min_chars}")
        if self.format in ("csv", "tsv") and self.columns and self.column_names:
            missing = [c for c in self.columns if c not in self.column_names]
            if missing:
                p.append(f"data.columns: {missing} not among data.column_names")
        return p


@dataclass(kw_only=True)
class MaskingConfig(Section):
    rate: float = 0.15
    """Share of maskable tokens selected for prediction (BERT 15%; ModernBERT recipes use 30%)."""
    eval_rate: float | None = None
    """Masking rate for evaluation; default: the same as `rate` (ModernBERT evaluates at 15%)."""
    mask_prob: float = 0.8
    """Of the selected tokens: share replaced by the mask token."""
    random_prob: float = 0.1
    """Of the selected tokens: share replaced by a random token; the rest keep their token."""
    mask_token_id: int | None = None
    """Replace selected tokens with this id instead of the tokenizer's mask token (seed 004: 57344, U+E000, CANINE)."""
    whole_word: bool = False
    """Select whole words (all their tokens, the same replacement for each); words come from token offsets, so
    WordPiece and byte-level BPE both work. Needs a fast tokenizer."""

    def problems(self) -> list[str]:
        p = []
        for name in ("rate", "eval_rate"):
            rate = getattr(self, name)
            if rate is not None and not 0 < rate < 1:
                p.append(f"masking.{name}: {rate} must be in (0, 1)")
        if self.mask_prob < 0 or self.random_prob < 0 or self.mask_prob + self.random_prob > 1:
            p.append(
                f"masking.mask_prob + masking.random_prob = {self.mask_prob + self.random_prob} must be within "
                "[0, 1]"
            )
        if self.mask_token_id is not None:
            at_least(p, "masking.mask_token_id", self.mask_token_id, minimum=0)
        return p


@dataclass(kw_only=True)
class TrainConfig(Section):
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
    lr_schedule: str = choice("linear", ("linear", "cosine", "wsd", "constant"))
    """Learning-rate schedule (wsd: warmup-stable-decay), counted in optimizer steps."""
    rebuild_schedule: bool = False
    """A resume with another length (train.max_steps, train.epochs) whose learning rate would jump at the step it
    resumes from (a linear decay that has run, lengthened): false refuses it, naming the ways on; true rebuilds the
    schedule over the new length and goes on from the rate it gives there (logged). A constant schedule is lengthened
    either way."""
    warmup_steps: int = 0
    """Warmup length in optimizer steps (give this or warmup_ratio)."""
    warmup_ratio: float = 0.06
    """Warmup length as a share of all optimizer steps, used when warmup_steps is 0."""
    decay_ratio: float = 0.2
    """wsd: share of the steps spent in the final linear decay."""
    min_lr_ratio: float = 0.0
    """Final learning rate as a share of the peak (linear, cosine, wsd)."""
    precision: str = choice("auto", ("auto", "bf16", "fp16", "fp32"))
    """Fills bf16/fp16 "auto" in the ds config. auto: bf16 where the hardware has it, else fp32."""
    optimizer_impl: str = choice("auto", ("auto", "deepspeed", "torch"))
    """auto: torch's fused AdamW (nothing to compile), or DeepSpeedCPUAdam for an offloaded
    optimizer on CUDA when it can be built here. deepspeed: DeepSpeed's FusedAdam/CPUAdam (JIT-built with ninja, a C++
    compiler and nvcc unless prebuilt; checked before the run starts)."""
    eval_every: int = 100
    """Evaluate every N optimizer steps (and at the end); 0: only at the end (a classifier: every epoch)."""
    eval_batches: int = 0
    """Cap on evaluation batches per rank; 0: the whole validation set."""
    log_every: int = 10
    """Log training metrics every N optimizer steps."""
    compile: str = choice("off", ("off", "inductor", "aot_eager", "cudagraphs"))
    """torch.compile the model through DeepSpeed's engine.compile with this
    backend. inductor needs a C compiler (and Triton on GPU); the first steps are slow while graphs compile, and
    rows of new lengths compile again until shapes are treated as dynamic. The sparse MLM head's masked positions
    (a count that depends on the data) are traced into the graph (capture_dynamic_output_shape_ops), so it does not
    break there. On a 2-core CPU it is slower than eager; not yet measured on a GPU."""
    sparse_prediction: bool = True
    """MLM: run the head (transform + vocabulary projection) only at masked positions, as MosaicBERT/ModernBERT do;
    the same loss, and for a small encoder with a large vocabulary about half the compute. false: the dense head."""

    def problems(self) -> list[str]:
        p: list[str] = []
        for name in ("micro_batch_size", "grad_accum", "log_every"):
            at_least(p, f"train.{name}", getattr(self, name))
        for name in ("max_steps", "warmup_steps", "eval_every", "eval_batches"):
            at_least(p, f"train.{name}", getattr(self, name), minimum=0)
        if self.epochs <= 0:
            p.append(f"train.epochs: {self.epochs} must be > 0")
        if self.lr <= 0:
            p.append(f"train.lr: {self.lr} must be > 0")
        if self.weight_decay < 0 or self.grad_clip < 0 or self.eps <= 0:
            p.append("train.weight_decay and train.grad_clip must be >= 0, train.eps > 0")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            p.append(f"train.betas: {self.betas} must be two numbers in [0, 1)")
        if (
            not 0 <= self.warmup_ratio < 1
            or not 0 <= self.decay_ratio <= 1
            or not 0 <= self.min_lr_ratio <= 1
        ):
            p.append(
                "train.warmup_ratio must be in [0, 1); train.decay_ratio and train.min_lr_ratio in [0, 1]"
            )
        return p


@dataclass(kw_only=True)
class CheckpointConfig(Section):
    every: int = 200
    """Save a resumable checkpoint every N optimizer steps (and at the end); 0: only at the end."""
    keep: int = 2
    """Keep the last K checkpoints (the best one by eval loss is kept as well)."""
    keep_best: bool = True
    """Keep the checkpoint with the best evaluation (MLM: the lowest eval loss; classifier: classify.metric) besides
    the last K; with checkpoint.export=best, every evaluation is saved as a checkpoint."""
    export: str = choice(
        "best",
        {
            "best": "the best evaluation's checkpoint when there is an evaluation set (and keep_best), else the last",
            "last": "the last checkpoint",
        },
    )
    """Which checkpoint final/ (and the test set) is made from; summary.json names it and its step."""
    disk_check: str = choice("refuse", ("refuse", "warn", "off"))
    """Before training, compare the expected size of keep + 1 checkpoints with free disk."""

    def problems(self) -> list[str]:
        p: list[str] = []
        at_least(p, "checkpoint.every", self.every, minimum=0)
        at_least(p, "checkpoint.keep", self.keep)
        return p


@dataclass(kw_only=True)
class NumericsConfig(Section):
    max_skipped_steps: int = 10
    """Optimizer steps skipped for a NaN/Inf loss or gradient norm (no weight, optimizer or schedule update), counted
    over the run; one more stops it (exit 4) without a new checkpoint, so the newest one is from before. 0: stop at
    the first. fp16 loss-scale overflows are skipped too but not counted."""
    spike_factor: float = 3.0
    """Loss-spike watchdog: a step whose loss is above this multiple of the running median is a spike; 0: off."""
    spike_steps: int = 10
    """Consecutive spike steps before the watchdog acts (it starts once the median has this many steps)."""
    spike_window: int = 100
    """Optimizer steps in the running median."""
    spike_action: str = choice("warn", ("warn", "stop"))
    """What a loss spike does; stop: exit 4, no new checkpoint, and the message names the last checkpoint before the
    spike."""

    def problems(self) -> list[str]:
        p: list[str] = []
        at_least(p, "numerics.max_skipped_steps", self.max_skipped_steps, minimum=0)
        at_least(p, "numerics.spike_steps", self.spike_steps)
        if self.spike_factor and self.spike_factor <= 1:
            p.append(
                f"numerics.spike_factor: {self.spike_factor} must be > 1 (or 0 to turn the watchdog off)"
            )
        if self.spike_window < self.spike_steps:
            p.append(
                f"numerics.spike_window: {self.spike_window} must be >= numerics.spike_steps ({self.spike_steps})"
            )
        return p


@dataclass(kw_only=True)
class ProfileConfig(Section):
    warmup: int = 5
    """launch/profile.py: optimizer steps run before timing starts."""
    steps: int = 20
    """launch/profile.py: optimizer steps timed after the warm-up."""
    trace: bool = False
    """launch/profile.py: record the timed steps with torch.profiler (output_dir/trace.rank<R>.json, for Perfetto)."""
    ds_flops_profiler: bool = False
    """launch/profile.py: also run DeepSpeed's flops profiler on the first timed step (it misses SDPA/flash attention)."""
    peak_tflops: float = 0.0
    """Peak TFLOPS per rank for MFU; 0: the GPU's dense bf16 figure from dapt's table, or a measured CPU matmul."""

    def problems(self) -> list[str]:
        p: list[str] = []
        at_least(p, "profile.warmup", self.warmup, minimum=0)
        at_least(p, "profile.steps", self.steps)
        if self.peak_tflops < 0:
            p.append(f"profile.peak_tflops: {self.peak_tflops} must be >= 0")
        return p


@dataclass(kw_only=True)
class PlanConfig(Section):
    gpu: str = choice("A100-80GB", GPUS)
    """launch/plan.py: the GPU to plan for (its facts: dapt.config.gpus)."""
    gpus: int = 1
    """launch/plan.py: GPUs in the run (all nodes); ZeRO partitions over them."""
    micro_batches: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32, 64])
    """launch/plan.py: micro-batch sizes to consider."""
    min_micro_batch: int = 8
    """launch/plan.py: prefer set-ups that fit at least this micro batch (a slower stage beats a tiny batch)."""
    headroom: float = 0.9
    """launch/plan.py: share of GPU memory the estimate may use (the rest: CUDA context, fragmentation)."""
    write_ds: str = ""
    """launch/plan.py: write the recommended DeepSpeed config to this path (empty: do not)."""
    measure: bool = True
    """launch/plan.py: measure activations on one real row on this CPU (models up to 2B parameters); false: the
    analytic formula (Korthikanti et al.) only."""
    measure_tokens: int = 2048
    """launch/plan.py: the longest row measured; a longer one is measured at a half, a quarter, ... of its length (also
    while it would not fit in this machine's memory) and scaled: linearly, and attention masks or scores by the
    square of the ratio."""
    mfu: float = 0.35
    """launch/plan.py: share of the GPU's dense bf16 peak assumed for the time estimate (an assumption, not a
    measurement: launch/profile.py measures it)."""
    tokens: int = 0
    """launch/plan.py: training tokens per epoch for the time estimate (with train.max_steps: of the whole run); 0:
    the training files' characters divided by plan.chars_per_token (read once), or train.max_steps x the global batch
    x data.max_seq_length."""
    chars_per_token: float = 4.0
    """launch/plan.py: characters per token of the model's tokenizer for that count (about 4 for English BPE or
    WordPiece; CANINE's tokens are characters, 1)."""

    def problems(self) -> list[str]:
        p: list[str] = []
        at_least(p, "plan.gpus", self.gpus)
        at_least(p, "plan.min_micro_batch", self.min_micro_batch)
        at_least(p, "plan.tokens", self.tokens, minimum=0)
        if not 0 < self.mfu <= 1:
            p.append(f"plan.mfu: {self.mfu} must be in (0, 1]")
        if self.chars_per_token <= 0:
            p.append(f"plan.chars_per_token: {self.chars_per_token} must be > 0")
        at_least(p, "plan.measure_tokens", self.measure_tokens, minimum=16)
        if not self.micro_batches or any(m < 1 for m in self.micro_batches):
            p.append(f"plan.micro_batches: {self.micro_batches} must be a non-empty list of sizes >= 1")
        if not 0 < self.headroom <= 1:
            p.append(f"plan.headroom: {self.headroom} must be in (0, 1]")
        return p


@dataclass(kw_only=True)
class FillConfig(Section):
    text: list[str] = field(default_factory=list)
    """launch/fill_mask.py: texts to complete, each with one or more placeholders; empty: read them from standard
    input, one per line (interactive)."""
    top_k: int = 5
    """launch/fill_mask.py: candidates shown for each masked position."""
    placeholder: str = "[MASK]"
    """What marks a masked position in the text; for a character model (CANINE) each one is one character."""

    def problems(self) -> list[str]:
        p: list[str] = []
        at_least(p, "fill.top_k", self.top_k)
        if not self.placeholder:
            p.append("fill.placeholder: must not be empty")
        return p


@dataclass(kw_only=True)
class ClusterConfig(Section):
    nodes: int = 1
    """launch/submit.py, launch/doctor.py: nodes in the run (with cluster.hostfile: its hosts)."""
    gpus_per_node: int = 1
    """Ranks per node: one per GPU (on CPU nodes, processes); the world size is nodes x gpus_per_node."""
    gpu: str = choice("", ("", "cpu", *GPUS))
    """The GPU type: SkyPilot's accelerators,
    NCCL settings for consumer cards (no P2P), doctor's GPU check; cpu: CPU nodes, no GPU requested; empty: any GPU
    (the one of submit.instance when dapt knows it)."""
    hostfile: str = ""
    """DeepSpeed hostfile (`host slots=N` per line) for a pdsh launch and doctor's checks; SLURM, SkyPilot and
    per-node jobs generate theirs from the allocation."""
    master_addr: str = ""
    """Address of node 0 for the rendezvous; empty: $MASTER_ADDR (per-node launch), the first node of the SLURM or
    SkyPilot allocation, or the first host of the hostfile."""
    master_port: int = 29500
    """TCP port of the rendezvous on node 0."""
    env: list[str] = field(default_factory=list)
    """Environment variables carried to every rank besides WANDB_* and HF_*, which always go (names; the values are
    this shell's), e.g. [NCCL_SOCKET_IFNAME, DATA_ROOT]."""

    def problems(self) -> list[str]:
        p: list[str] = []
        at_least(p, "cluster.nodes", self.nodes)
        at_least(p, "cluster.gpus_per_node", self.gpus_per_node)
        if not 1 <= self.master_port <= 65535:
            p.append(f"cluster.master_port: {self.master_port} is not a TCP port (1-65535)")
        p += [
            f"cluster.env: {name!r} is not an environment variable name"
            for name in self.env
            if not ENV_NAME.match(name)
        ]
        return p


@dataclass(kw_only=True)
class SubmitConfig(Section):
    scheduler: str = choice(
        "slurm",
        {
            "slurm": "an sbatch script",
            "skypilot": "a SkyPilot task YAML",
            "nodes": "one script run on every node with NODE_RANK and MASTER_ADDR set",
            "pdsh": "DeepSpeed's ssh launcher over cluster.hostfile, with its env file",
        },
    )
    """launch/submit.py: the kind of job it writes."""
    entry: str = "launch/mlm.py"
    """The entry script the job runs (launch/mlm.py, launch/classify.py, ...), with this command's other arguments."""
    job_name: str = "dapt"
    """Job name (SLURM --job-name, SkyPilot name): letters, digits and ._-"""
    partition: str = ""
    """SLURM partition; empty: the cluster's default."""
    account: str = ""
    """SLURM account; empty: the user's default."""
    time: str = "24:00:00"
    """SLURM time limit ([days-]hours:minutes:seconds); dapt checkpoints and exits cleanly on the SIGTERM before it."""
    cpus_per_node: int = 0
    """SLURM --cpus-per-task of the one task per node; 0: the cluster's default."""
    instance: str = ""
    """SkyPilot instance type, e.g. g7e.48xlarge (8 x RTX PRO 6000) or p5.48xlarge; empty: any with cluster.gpu."""
    cloud: str = ""
    """SkyPilot infra (aws, gcp, azure, k8s, ...); empty: any enabled one."""
    use_spot: bool = False
    """SkyPilot: spot instances (a reclaim is a SIGTERM: dapt checkpoints; relaunch resumes)."""
    workdir: str = ""
    """Folder holding this checkout on the nodes; empty: this checkout's path (SLURM, nodes, pdsh) or SkyPilot's
    synced copy of it."""
    venv: str = ".venv"
    """Virtual environment (relative to workdir, or absolute) activated on each node before the launcher runs."""
    out: str = ""
    """Folder the job files are written to; empty: output_dir/submit."""
    dry_run: bool = False
    """Print the job instead of writing it (also --dry_run)."""

    def problems(self) -> list[str]:
        p: list[str] = []
        if self.cpus_per_node < 0:
            p.append(f"submit.cpus_per_node: {self.cpus_per_node} must be >= 0")
        for key in ("job_name", "partition", "account", "time"):
            value = getattr(self, key)
            if not SAFE_WORD.match(value):
                p.append(
                    f"submit.{key}: {value!r} may hold only letters, digits and ._@+,:- (it goes into #SBATCH "
                    "lines, which no shell quotes)"
                )
        if not self.job_name:
            p.append("submit.job_name: must not be empty")
        return p


@dataclass(kw_only=True)
class LogConfig(Section):
    wandb: bool = False
    """Log to Weights & Biases (honours WANDB_MODE=offline)."""
    wandb_project: str = "dapt"
    """W&B project name."""
    tensorboard: bool = False
    """Also write the metrics as TensorBoard event files to output_dir/tensorboard (needs the tensorboard package:
    pip install "dapt[tensorboard]"); `tensorboard --logdir output_dir/tensorboard` shows them."""
    run_name: str | None = None
    """Run name for W&B and the logs; default: the output folder name."""
    progress: bool = True
    """Show a progress bar on rank 0."""
    plots: bool = True
    """Write loss, learning-rate and perplexity curves to output_dir/plots at the end."""
    level: str = choice("info", ("debug", "info", "warning"))
    """Log level."""
    all_ranks: bool = False
    """Every rank logs at log.level (each line names its rank); default: rank 0 only, other ranks warnings and errors."""


@dataclass(kw_only=True)
class HubConfig(Section):
    push: bool = False
    """Upload final/ (weights, tokenizer, model card) to the Hugging Face hub once it is exported and verified: one
    commit, from rank 0. A failed upload keeps final/ and ends the run with exit 5."""
    model_id: str = ""
    """The hub repository to upload to, OWNER/NAME; created when it does not exist."""
    private: bool = True
    """Create the repository private (a repository that exists keeps its visibility)."""
    token_env: str = "HF_TOKEN"
    """The environment variable holding the hub token with write access; when it is unset, the token saved by
    `hf auth login`. The token is never logged or written."""

    def problems(self) -> list[str]:
        """hub.push: a repository id and where its token is (dapt.cli.check looks for the token itself)."""
        p = []
        if self.push and not REPO_ID.fullmatch(self.model_id):
            p.append(
                f"hub.model_id: {self.model_id!r} is not a hub repository id OWNER/NAME (hub.push=true needs one)"
            )
        if self.push and not self.token_env:
            p.append("hub.token_env: empty (the name of the environment variable that holds the hub token)")
        return p


@dataclass(kw_only=True)
class ClassifyConfig(Section):
    label_field: str = "label"
    """jsonl field, csv/tsv column or parquet/arrow column holding the label (a csv label column is left out of the
    text; a `datasets` ClassLabel column gives its names, not its integer codes)."""
    label_files: dict = field(default_factory=dict)
    """Labels per file instead: {glob or file name: label}, e.g. {"normal*": normal, "anomalous*": attack}."""
    label_map: dict = field(default_factory=dict)
    """Raw label -> the class it counts as, applied to every split (e.g. NSL-KDD's attack names to their five
    categories); a label the map does not name stays as it is."""
    labels: list[str] = field(default_factory=list)
    """Fixed label order (ids 0, 1, ...); empty: the sorted labels of the training set."""
    unseen: str = choice(
        "error", {"error": "stop, naming file and line", "skip": "leave such records out, counted"}
    )
    """A validation/test label never seen in training."""
    class_weights: str = "none"
    """none | inverse (inverse class frequency, normalised to mean 1) | sqrt_inverse (its square root: a class 1,000
    times rarer weighs 32 times more, not 1,000) | comma-separated weights in label order."""
    label_smoothing: float = 0.0
    """Label smoothing of the cross-entropy (seed 002: 0.05)."""
    head_lr_mult: float = 1.0
    """Learning rate of the new classification head as a multiple of train.lr (seed 003: 10)."""
    metric: str = choice("macro_f1", ("accuracy", "macro_f1", "micro_f1", "weighted_f1", "roc_auc"))
    """Picks the best checkpoint and drives early stopping."""
    patience: int = 0
    """Stop after this many evaluations without improvement of the metric; 0: never stop early."""
    collapse_warn: float = 0.2
    """Warn when a class is predicted less than this share as often as it occurs (classes with >= 10 examples and
    >= 1% of the evaluation set)."""
    collapse_stop: bool = True
    """Stop when such a class is never predicted at an evaluation after the first epoch (a collapsed classifier)."""
    seeds: list[int] = field(default_factory=list)
    """Run once per seed (output_dir/seed_<s>) and report mean +- std; empty: the run's seed only."""

    def problems(self) -> list[str]:
        p: list[str] = []
        if not 0 <= self.label_smoothing < 1:
            p.append(f"classify.label_smoothing: {self.label_smoothing} must be in [0, 1)")
        if self.head_lr_mult <= 0:
            p.append(f"classify.head_lr_mult: {self.head_lr_mult} must be > 0")
        at_least(p, "classify.patience", self.patience, minimum=0)
        if any(seed < 0 for seed in self.seeds):
            p.append(f"classify.seeds: {self.seeds} must all be >= 0")
        if not 0 <= self.collapse_warn <= 1:
            p.append(f"classify.collapse_warn: {self.collapse_warn} must be in [0, 1]")
        if self.class_weights not in ("none", "inverse", "sqrt_inverse"):
            try:
                ok = all(0 < float(w) < math.inf for w in self.class_weights.split(","))
            except ValueError:
                ok = False
            if not ok:
                p.append(
                    f"classify.class_weights: {self.class_weights!r} must be none, inverse, sqrt_inverse or comma-separated "
                    "weights > 0 in label order"
                )
        return p


@dataclass(kw_only=True)
class EmbedConfig(Section):
    pooling: str = choice("mean", {"cls": "the first token's state", "mean": "the average over real tokens"})
    """How launch/embed.py and launch/anomaly.py pool a document's token states into one vector."""
    normal_label: str = "normal"
    """anomaly: the label of normal data; the detector is fitted on normal training documents only."""
    max_fpr: float = 0.05
    """anomaly: the false-positive rate allowed on new normal traffic; the normal validation documents set the
    threshold for it, by embed.calibration."""
    calibration: str = choice(
        "bound",
        {
            "bound": "the FPR on new normal traffic drawn as the validation documents were is at most max_fpr with "
            "probability embed.confidence (needs log(1 - confidence) / log(1 - max_fpr) normal validation documents: "
            "59 for 5% at 95%)",
            "conformal": "the split-conformal quantile: the expected FPR on such traffic is at most max_fpr (needs "
            "1 / max_fpr - 1 normal validation documents: 19 for 5%)",
            "quantile": "the empirical quantile (dapt 0.2): about max_fpr of the validation documents flagged; on new "
            "traffic the FPR exceeds max_fpr about half the time, more often with few documents",
        },
    )
    """anomaly: how the normal validation documents set the threshold (runtime/calibration.py says why)."""
    confidence: float = 0.95
    """anomaly, calibration=bound: the probability that the FPR on new normal traffic stays at most max_fpr."""
    shrinkage: str = "ledoit_wolf"
    """anomaly: covariance shrinkage, ledoit_wolf or a fixed coefficient in [0, 1] (e.g. 0.1)."""
    score: str = choice(
        "mahalanobis",
        {
            "mahalanobis": "squared Mahalanobis distance of the pooled embedding to the normal training ones (seed 000)",
            "knn": "cosine distance of the pooled embedding to its embed.knn_k-th nearest normal training embedding, all "
            "centred on the normal training mean first",
            "mlm": "the MLM's surprise at the document's masked tokens (needs a trained MLM head: a dapt MLM run's final/)",
            "lexical": "the share of character n-grams never seen in normal training documents",
            "fused": "the embed.fuse scores, each turned into its tail probability among normal validation documents, "
            "combined by embed.fuse_rule",
        },
    )
    """anomaly: how a document is scored."""
    mask_patterns: int = 4
    """anomaly, mlm: K, the fixed mask patterns every document is scored under (one forward pass each)."""
    mask_rate: float = 0.25
    """anomaly, mlm: the share of tokens each pattern masks; K * rate <= 1 keeps the patterns disjoint, and 1 / rate
    patterns (the default 4 x 0.25) score every token exactly once: an attack is a few tokens, none may be missed."""
    token_score: str = choice(
        "auto",
        {
            "mean": "mean surprise of the masked tokens",
            "max": "the most surprising token",
            "topk": "mean of the embed.top_k most surprising tokens",
            "novel": "the surprise of the tokens that touch a character n-gram never seen in normal training documents "
            "(as lexical finds them), summed and divided by the number of masked tokens: surprise where the text is new "
            "too (needs a fast tokenizer; auto leaves it out without one)",
            "auto": "whichever of these separates attacks from normal validation documents best (needs attacks in "
            "validation, e.g. embed.valid_from_test); topk without them",
        },
    )
    """anomaly, mlm: how the token surprises of a document become its score."""
    token_surprise: str = choice(
        "auto",
        {
            "nll": "the negative log-likelihood of the true token at its masked position",
            "excess": "that NLL minus the entropy of the model's prediction there: surprise beyond what the model "
            "expected (a random name where any name may come is not, a quote where only a digit may is)",
            "auto": "whichever of the two, with the token score, separates attacks from normal validation documents "
            "best (needs attacks in validation); nll without them",
        },
    )
    """anomaly, mlm: what a token's surprise is."""
    top_k: int = 5
    """anomaly, mlm: the k of token_score=topk, and how many surprising tokens the report lists per finding."""
    knn_k: list[int] = field(default_factory=lambda: [5, 1, 10])
    """anomaly, knn: k, a document's distance is to its k-th nearest normal training embedding. Several: the one whose
    distances separate the validation attacks best (knn_k_validation in anomaly.json; as token_score=auto chooses),
    the first without validation attacks. k > 1: one stray normal training document does not make its neighbourhood
    normal; k = 1: a request like one normal request is normal, which suits traffic of many exact forms (CSIC, with
    1,200 documents fitted: bench/results/dapt_value.md)."""
    fuse: list[str] = choice(
        ["mahalanobis", "knn", "mlm", "lexical"],
        {
            "mahalanobis": "embedding distance to a Gaussian",
            "knn": "embedding distance to the nearest normal documents",
            "mlm": "MLM surprise",
            "lexical": "character n-gram novelty",
        },
    )
    """anomaly, fused: the scores that may be combined, each first calibrated on normal validation documents. With
    attacks in the validation set (embed.valid_from_test) the choice that separates them best is used: one of these
    scores alone, or a combination of two or more by a rule; without, all of them."""
    fuse_rule: str = choice(
        "auto",
        {
            "sum": "Fisher's method, the sum of -log p: evidence from several scores adds up",
            "max": "Tippett's method, the largest -log p (ties broken by the sum): what one score alone sees is not "
            "diluted by the others",
            "auto": "whichever of the two, with the combination, separates attacks from normal validation documents "
            "best (needs attacks in validation, e.g. embed.valid_from_test); sum without them. One score chosen alone "
            "needs no rule (fuse_rule null in anomaly.json)",
        },
    )
    """anomaly, fused: how the calibrated scores are combined."""
    ngram: int = 3
    """anomaly, lexical: the n of the character n-grams (a document's score: the share never seen in normal
    training documents)."""
    ngram_digits: bool = True
    """anomaly, lexical: read every digit as 0 first, so new numbers are not novel (a digit among letters still is)."""
    valid_from_test: float = 0.0
    """anomaly: the share of the test documents (normal ones by a hash of their file name and line, attacks of their
    text) that is the validation set instead (data.valid and the train split are then not used): normal ones set the
    threshold, attacks let the auto settings (token_score, token_surprise, fuse_rule, the fused choice) choose; none
    of them is reported as test. 0: validation is data.valid or the hash split of data.train."""
    sample: int = 0
    """anomaly: score at most this many documents of each split (normal training documents for the Mahalanobis and
    knn fit, validation, test), drawn by the run's seed: a CPU-sized look at a large test set. Lexical novelty is still
    fitted on every normal training document. 0: all. Keep enough normal documents in validation for
    embed.calibration (bound: 59 for 5% at 95%; with embed.valid_from_test, attacks take part of the sample)."""
    report_top: int = 50
    """anomaly: the findings shown in anomaly_report.md (anomaly_report.jsonl has every flagged document)."""

    def problems(self) -> list[str]:
        p: list[str] = []
        if not 0 < self.max_fpr < 1:
            p.append(f"embed.max_fpr: {self.max_fpr} must be in (0, 1)")
        if not 0 < self.confidence < 1:
            p.append(f"embed.confidence: {self.confidence} must be in (0, 1)")
        if self.shrinkage != "ledoit_wolf":
            try:
                ok = 0 <= float(self.shrinkage) <= 1
            except ValueError:
                ok = False
            if not ok:
                p.append(f"embed.shrinkage: {self.shrinkage!r} must be ledoit_wolf or a number in [0, 1]")
        for name in ("mask_patterns", "top_k", "ngram", "report_top"):
            at_least(p, f"embed.{name}", getattr(self, name))
        if not self.knn_k:
            p.append("embed.knn_k: [] names no k; give one or more, e.g. [5]")
        for k in self.knn_k:
            at_least(p, "embed.knn_k", k)
        at_least(p, "embed.sample", self.sample, minimum=0)
        if not 0 < self.mask_rate <= 1:
            p.append(f"embed.mask_rate: {self.mask_rate} must be in (0, 1]")
        if not 0 <= self.valid_from_test < 1:
            p.append(f"embed.valid_from_test: {self.valid_from_test} must be in [0, 1)")
        if self.score == "fused" and len(set(self.fuse)) < 2:
            p.append(
                f"embed.fuse: {self.fuse} fuses fewer than two scores; name two or more, or set embed.score to one"
            )
        return p


@dataclass(kw_only=True)
class AblationConfig(Section):
    base: str = ""
    """The base encoder (hub id or folder) that DAPT starts from and that is evaluated as the first row."""
    dapt_recipe: str = ""
    """launch/mlm.py recipe of the domain-adaptive stage (its model.name_or_path becomes `base`)."""
    tapt_recipe: str = ""
    """launch/mlm.py recipe of the task-adaptive stage (it starts from the DAPT output); empty: no TAPT row."""
    eval_recipe: str = ""
    """The recipe of the evaluation run on each checkpoint (launch/classify.py or launch/anomaly.py protocol)."""
    protocol: str = choice("classify", ("classify", "anomaly"))
    """How each checkpoint is evaluated."""
    score: str = choice("", ("", "mahalanobis", "knn", "mlm", "lexical", "fused"))
    """anomaly protocol: the embed.score every checkpoint is evaluated by (mahalanobis, knn, mlm, lexical, fused);
    empty: the eval recipe's. A model without a trained MLM head (the base, often) gets no mlm row, with the reason."""
    overrides: list[str] = field(default_factory=list)
    """Extra --section.field=value arguments given to every stage (e.g. --train.max_steps=100 for a quick look)."""

    def problems(self) -> list[str]:
        if self.score and self.protocol != "anomaly":
            return [
                f"ablation.score: {self.score!r} scores the anomaly protocol; set ablation.protocol=anomaly"
            ]
        return []


@dataclass(kw_only=True)
class RunConfig(ReadOnly):
    output_dir: str = ""
    """Where the run writes config, metrics, checkpoints, final model and plots; empty: runs/<script> (runs/mlm for
    launch/mlm.py, runs/classify for launch/classify.py, ...). A folder holding another task's run, or a run of
    another configuration, is refused."""
    seed: int = 42
    """Seed for model init, data order and masking."""
    resume: str = "auto"
    """auto: continue from the latest complete checkpoint in output_dir | never | a checkpoint folder."""
    ds: str | None = None
    """DeepSpeed JSON config: a path, or a shipped one by name (zero0_bf16, zero1_bf16, zero2_bf16, zero2_fp16,
    zero3_bf16, zero3_offload_bf16: the ZeRO stage, precision and offload); default: the built-in ZeRO-0 config
    with precision from train.precision."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    numerics: NumericsConfig = field(default_factory=NumericsConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    fill: FillConfig = field(default_factory=FillConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    submit: SubmitConfig = field(default_factory=SubmitConfig)
    log: LogConfig = field(default_factory=LogConfig)
    hub: HubConfig = field(default_factory=HubConfig)
    classify: ClassifyConfig = field(default_factory=ClassifyConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    ablation: AblationConfig = field(default_factory=AblationConfig)

    # Not config fields: filled by load_config.
    task: str | None = field(default=None, repr=False, metadata={"internal": True})  # the entry script's name
    ds_config: dict = field(default_factory=dict, repr=False, metadata={"internal": True})
    explicit: set = field(default_factory=set, repr=False, metadata={"internal": True})
    adopted: dict = field(default_factory=dict, repr=False, metadata={"internal": True})
    notes: list = field(
        default_factory=list, repr=False, metadata={"internal": True}
    )  # choices made for the user
    ds_set: dict = field(
        default_factory=dict, repr=False, metadata={"internal": True}
    )  # ds entries from the launcher

    def to_dict(self) -> dict:
        return {
            f.name: _plain(getattr(self, f.name))
            for f in dataclasses.fields(self)
            if not f.metadata.get("internal")
        }

    def problems(self) -> list[str]:
        """Every problem the config shows by itself: each section's (Section.check), then the rules that join
        sections or need the run's task. What needs more than the config (files, the hub, the output folder, a
        resume, DeepSpeed) is dapt.cli.check's."""
        p = []
        if not self.output_dir.strip():
            p.append("output_dir: empty (where should the run write?)")
        at_least(p, "seed", self.seed, minimum=0)  # numpy's generators refuse negative seeds
        for name in _sections():
            p += getattr(self, name).check(name)
        return p + self._model_problems() + self._data_problems() + self._joined_problems()

    def _model_problems(self) -> list[str]:
        m, lexical = self.model, self.embed.score == "lexical"  # scoring character n-grams needs no model
        p = []
        if self.task == "predict" and not m.name_or_path:
            p.append(
                "model.name_or_path: the trained model to predict with (a dapt run's final/, or a hub id)"
            )
        if not m.name_or_path and m.config is None and not self.ablation.base and not lexical:
            p.append(
                "model: give model.name_or_path (a hub id or folder) or model.config (to build one from scratch)"
            )
        return p

    def _data_problems(self) -> list[str]:
        d, p = self.data, []
        if self.task == "predict" and not d.test:
            p.append(
                "data.test: the files to predict (any format dapt reads; with the label field, also evaluated)"
            )
        if not d.train and (d.valid or d.test) and self.task != "predict":  # predict reads data.test alone
            p.append("data.valid/data.test given without data.train")
        if 0 < self.embed.valid_from_test < 1 and d.valid:
            p.append(
                "embed.valid_from_test: the validation set is taken from data.test; leave data.valid empty"
            )
        return p

    def _joined_problems(self) -> list[str]:
        """Rules over two sections, or over what the recipe or command line set (self.explicit)."""
        p, t, c = [], self.train, self.cluster
        missing = [k for k in ("base", "dapt_recipe", "eval_recipe") if not getattr(self.ablation, k)]
        if self.task == "ablation" and missing:
            p.append(f"ablation needs {', '.join('ablation.' + k for k in missing)}")
        if t.warmup_steps and "train.warmup_ratio" in self.explicit and t.warmup_ratio:
            p.append("train.warmup_steps and train.warmup_ratio are both set; give one")
        if self.submit.instance in INSTANCES:
            gpu, count = INSTANCES[self.submit.instance]
            if c.gpu and c.gpu != gpu:
                p.append(f"cluster.gpu: {c.gpu} but submit.instance {self.submit.instance} has {gpu} GPUs")
            if "cluster.gpus_per_node" in self.explicit and c.gpus_per_node != count:
                p.append(
                    f"cluster.gpus_per_node: {c.gpus_per_node} but submit.instance {self.submit.instance} has "
                    f"{count} GPUs"
                )
        return p


def freeze(cfg: RunConfig) -> RunConfig:
    """The loaded config made read-only (every section, the explicit keys and the notes); returns it."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, Section):
            object.__setattr__(value, "_frozen", True)
    object.__setattr__(cfg, "explicit", frozenset(cfg.explicit))
    object.__setattr__(cfg, "notes", tuple(cfg.notes))
    object.__setattr__(cfg, "_frozen", True)
    return cfg


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
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = nxt.value.value
    return docs


def _sections() -> dict[str, type]:
    hints = typing.get_type_hints(RunConfig)
    return {
        f.name: hints[f.name]
        for f in dataclasses.fields(RunConfig)
        if dataclasses.is_dataclass(hints[f.name])
    }


# The allowed values of every choice field, as declared with the field ("data.format" -> {value: meaning})
CHOICES = {
    f"{name}.{f.name}": f.metadata["choices"]
    for name, cls in _sections().items()
    for f in dataclasses.fields(cls)
    if "choices" in f.metadata
}


# The sections each entry script reads besides the run's own fields (output_dir, seed, resume, ds): its --help lists
# these, and a command-line key of another section is refused. Scripts not named here (doctor, submit, ablation)
# check or run other scripts' configs and take every section.
TRAINING = ("model", "data", "masking", "train", "checkpoint", "numerics", "log", "cluster")
TOOL_SECTIONS = {
    "mlm": (*TRAINING, "hub"),
    "profile": (*TRAINING, "profile"),
    "classify": ("model", "data", "train", "checkpoint", "numerics", "log", "hub", "cluster", "classify"),
    "embed": ("model", "data", "train", "log", "cluster", "classify", "embed"),
    "anomaly": ("model", "data", "train", "log", "cluster", "classify", "embed"),
    "fill_mask": ("model", "masking", "log", "fill"),
    "predict": ("model", "data", "train", "log", "cluster", "classify", "embed"),
    "plan": ("model", "data", "masking", "train", "numerics", "log", "cluster", "plan"),
}


# What each entry script does, in one line: the first line of its --help and of `dapt --help`
PURPOSE = {
    "mlm": "masked-language-model pretraining (DAPT, TAPT) of a Hugging Face encoder on a DeepSpeed engine",
    "classify": "sequence-classification fine-tuning, optionally over several seeds (mean +- std)",
    "embed": "embeddings of a dataset (CLS or mean pooling) to output_dir/embeddings_<split>.npz",
    "anomaly": "anomaly detection by embedding distance, MLM surprise, n-gram novelty or their fusion, at a fixed FPR",
    "fill_mask": "masked prediction with a trained MLM, token or character level",
    "predict": "a trained classifier (or MLM) on new files: predictions.jsonl, and the metrics when they have labels",
    "profile": "timed optimizer steps of the MLM loop: step parts, tokens/s, TFLOPS, MFU, peak memory",
    "plan": "memory and time plan of a recipe on a GPU type: the ZeRO stage and micro batch that fit",
    "ablation": "base -> +DAPT -> +DAPT+TAPT, each evaluated with one classifier or anomaly protocol",
    "doctor": "preflight check of a run before it starts (config, world size, GPUs, disk, network); writes nothing",
    "submit": "writes the SLURM, SkyPilot, per-node or pdsh job that runs a recipe on several nodes",
}


def tool_of(prog: str) -> str | None:
    """The entry script's name ("launch/classify.py" -> "classify") when it reads only some sections."""
    name = Path(prog.split()[-1]).stem if prog.strip() else ""  # "launch/classify.py" or "dapt classify"
    return name if name in TOOL_SECTIONS else None


def sections_of(tool: str | None) -> list[str]:
    """The sections `tool` reads (all of them for None)."""
    return [name for name in _sections() if tool is None or name in TOOL_SECTIONS[tool]]


def section_problems(keys: list[str], tool: str | None, prog: str) -> list[str]:
    """Command-line keys of sections `tool` does not read (a typo of a section is reported by the builder)."""
    if tool is None:
        return []
    every, mine = set(_sections()), sections_of(tool)
    return [
        f"--{key}: {prog} does not read the [{key.split('.')[0]}] section; its sections are "
        f"{', '.join(mine)} (and output_dir, seed, resume, ds)"
        for key in keys
        if key.split(".")[0] in every and key.split(".")[0] not in mine
    ]


def help_text(prog: str | None = None) -> str:
    """`--help`: the run's own fields, then each section the script reads (all of them without `prog`), every field
    with its type (or its allowed values), default and docstring."""
    from dapt.config import shipped

    name = Path(prog.split()[-1]).stem if prog and prog.strip() else ""
    lines = [f"{prog}: {PURPOSE[name]}", ""] if name in PURPOSE else []
    lines += [
        f"usage: {prog or 'launch/<script>.py'} [--recipe RECIPE.yaml] [--ds DS_CONFIG] [--section.field=value ...]",
        "",
        f"--ds: the DeepSpeed config (ZeRO stage, precision, offload): a shipped one by name, "
        f"{', '.join(shipped.names('ds_configs')) or 'none found'}, or a JSON file of your own.",
        f"--recipe: a YAML recipe; shipped: {', '.join(shipped.names('recipes')) or 'none found'} (recipes/NAME.yaml, "
        "recipes/smoke/NAME.yaml for CPU).",
        "",
    ]
    run_docs, run_hints = field_docs(RunConfig), typing.get_type_hints(RunConfig)
    defaults = RunConfig()
    for name in ("output_dir", "seed", "resume", "ds"):
        lines.append(_help_line(name, run_hints[name], getattr(defaults, name), run_docs.get(name, "")))
    sections = _sections()
    for name in sections_of(tool_of(prog or "")):
        cls = sections[name]
        lines += ["", f"[{name}]"]
        docs, hints, inst = field_docs(cls), typing.get_type_hints(cls), cls()
        for f in dataclasses.fields(cls):
            lines.append(
                _help_line(f"{name}.{f.name}", hints[f.name], getattr(inst, f.name), docs.get(f.name, ""))
            )
    return "\n".join(lines)


def _help_line(key: str, typ: Any, default: Any, doc: str) -> str:
    """One field: its allowed values (the one table, CHOICES, with what each means) or its type, default, docs."""
    allowed = CHOICES.get(key)
    kind = " | ".join(v or "''" for v in allowed) if allowed else type_name(typ)
    line = f"  --{key}={kind}  (default: {default!r})\n      {doc}"
    if isinstance(allowed, dict):
        line += "".join(f"\n        {value}: {meaning}" for value, meaning in allowed.items())
    return line


def type_name(typ: Any) -> str:
    return getattr(typ, "__name__", None) or str(typ).replace("typing.", "")


def save_resolved(cfg: RunConfig, path: Path, ds: dict | None = None) -> None:
    """Write the full config and the DeepSpeed config as YAML: `ds`, the engine's (its "auto" values filled), when the
    run has made it, else the loaded one."""
    doc = cfg.to_dict()
    doc["deepspeed"] = cfg.ds_config if ds is None else ds
    path.write_text(yaml.safe_dump(redact(doc), sort_keys=False))
