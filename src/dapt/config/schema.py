"""The config tree: one keyword-only dataclass per concern, under RunConfig.

The string literal under a field is its documentation, shown by `--help`. dapt.cli.load builds and validates the tree
from a recipe, overrides and the DeepSpeed JSON.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dapt.config.gpus import NAMES
from dapt.config.redact import redact


class ConfigError(ValueError):
    """Every problem found in a recipe, DeepSpeed config and overrides, one per line."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {p}" for p in problems))


@dataclass(kw_only=True)
class ModelConfig:
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
    attn_implementation: str = "auto"
    """Attention kernel. auto: flash_attention_2 when installed on CUDA in bf16/fp16, else sdpa, else eager."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward (HF gradient_checkpointing_enable; DeepSpeed's own block does nothing for HF models)."""
    trust_remote_code: bool = False
    """Allow model code from the hub to run. Off unless the recipe says so."""
    char_vocab: int = 1024
    """CANINE: classes of the character MLM head; code points at or above char_vocab - 1 share the last one."""


@dataclass(kw_only=True)
class DataConfig:
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
    format: str = "lines"
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
    packing: str = "concat"
    """How documents become rows of data.max_seq_length tokens."""
    max_seq_length: int = 128
    """Tokens per training row, special tokens included."""
    valid_fraction: float = 0.1
    """Share of training documents held out for validation when `valid` is empty (stable: decided by a hash of the text)."""
    on_error: str = "raise"
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
    volatile: list[str] = field(default_factory=list)
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
    mask_token_id: int | None = None
    """Replace selected tokens with this id instead of the tokenizer's mask token (seed 004: 57344, U+E000, CANINE)."""
    whole_word: bool = False
    """Select whole words (all their tokens, the same replacement for each); words come from token offsets, so
    WordPiece and byte-level BPE both work. Needs a fast tokenizer."""


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
    precision: str = "auto"
    """Fills bf16/fp16 "auto" in the ds config. auto: bf16 where the hardware has it, else fp32."""
    optimizer_impl: str = "auto"
    """auto: torch's fused AdamW (nothing to compile), or DeepSpeedCPUAdam for an offloaded
    optimizer on CUDA when it can be built here. deepspeed: DeepSpeed's FusedAdam/CPUAdam (JIT-built with ninja, a C++
    compiler and nvcc unless prebuilt; checked before the run starts)."""
    eval_every: int = 100
    """Evaluate every N optimizer steps (and at the end); 0: only at the end."""
    eval_batches: int = 0
    """Cap on evaluation batches per rank; 0: the whole validation set."""
    log_every: int = 10
    """Log training metrics every N optimizer steps."""
    compile: str = "off"
    """torch.compile the model through DeepSpeed's engine.compile with this
    backend. inductor needs a C compiler (and Triton on GPU); the first steps are slow while graphs compile, and
    rows of new lengths compile again until shapes are treated as dynamic. The sparse MLM head's masked positions
    (a count that depends on the data) are traced into the graph (capture_dynamic_output_shape_ops), so it does not
    break there. On a 2-core CPU it is slower than eager; not yet measured on a GPU."""
    sparse_prediction: bool = True
    """MLM: run the head (transform + vocabulary projection) only at masked positions, as MosaicBERT/ModernBERT do;
    the same loss, and for a small encoder with a large vocabulary about half the compute. false: the dense head."""


@dataclass(kw_only=True)
class CheckpointConfig:
    every: int = 200
    """Save a resumable checkpoint every N optimizer steps (and at the end); 0: only at the end."""
    keep: int = 2
    """Keep the last K checkpoints (the best one by eval loss is kept as well)."""
    keep_best: bool = True
    """Keep the checkpoint with the best evaluation (MLM: the lowest eval loss; classifier: classify.metric) besides
    the last K; with checkpoint.export=best, every evaluation is saved as a checkpoint."""
    export: str = "best"
    """Which checkpoint final/ (and the test set) is made from; summary.json names it and its step."""
    disk_check: str = "refuse"
    """Before training, compare the expected size of keep + 1 checkpoints with free disk."""


@dataclass(kw_only=True)
class NumericsConfig:
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
    spike_action: str = "warn"
    """What a loss spike does; stop: exit 4, no new checkpoint, and the message names the last checkpoint before the
    spike."""


@dataclass(kw_only=True)
class ProfileConfig:
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


@dataclass(kw_only=True)
class PlanConfig:
    gpu: str = "A100-80GB"
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


@dataclass(kw_only=True)
class FillConfig:
    text: list[str] = field(default_factory=list)
    """launch/fill_mask.py: texts to complete, each with one or more placeholders; empty: read them from standard
    input, one per line (interactive)."""
    top_k: int = 5
    """launch/fill_mask.py: candidates shown for each masked position."""
    placeholder: str = "[MASK]"
    """What marks a masked position in the text; for a character model (CANINE) each one is one character."""


@dataclass(kw_only=True)
class ClusterConfig:
    nodes: int = 1
    """launch/submit.py, launch/doctor.py: nodes in the run (with cluster.hostfile: its hosts)."""
    gpus_per_node: int = 1
    """Ranks per node: one per GPU (on CPU nodes, processes); the world size is nodes x gpus_per_node."""
    gpu: str = ""
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


@dataclass(kw_only=True)
class SubmitConfig:
    scheduler: str = "slurm"
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


@dataclass(kw_only=True)
class LogConfig:
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
    level: str = "info"
    """Log level."""
    all_ranks: bool = False
    """Every rank logs at log.level (each line names its rank); default: rank 0 only, other ranks warnings and errors."""


@dataclass(kw_only=True)
class HubConfig:
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


@dataclass(kw_only=True)
class ClassifyConfig:
    label_field: str = "label"
    """jsonl field, csv/tsv column or parquet/arrow column holding the label (a csv label column is left out of the
    text; a `datasets` ClassLabel column gives its names, not its integer codes)."""
    label_files: dict = field(default_factory=dict)
    """Labels per file instead: {glob or file name: label}, e.g. {"normal*": normal, "anomalous*": attack}."""
    labels: list[str] = field(default_factory=list)
    """Fixed label order (ids 0, 1, ...); empty: the sorted labels of the training set."""
    unseen: str = "error"
    """A validation/test label never seen in training."""
    class_weights: str = "none"
    """none | inverse (inverse class frequency, normalised to mean 1) | comma-separated weights in label order."""
    label_smoothing: float = 0.0
    """Label smoothing of the cross-entropy (seed 002: 0.05)."""
    head_lr_mult: float = 1.0
    """Learning rate of the new classification head as a multiple of train.lr (seed 003: 10)."""
    metric: str = "macro_f1"
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


@dataclass(kw_only=True)
class EmbedConfig:
    pooling: str = "mean"
    """How launch/embed.py and launch/anomaly.py pool a document's token states into one vector."""
    normal_label: str = "normal"
    """anomaly: the label of normal data; the detector is fitted on normal training documents only."""
    max_fpr: float = 0.05
    """anomaly: the false-positive rate allowed on normal validation data; it sets the threshold."""
    shrinkage: str = "ledoit_wolf"
    """anomaly: covariance shrinkage, ledoit_wolf or a fixed coefficient in [0, 1] (e.g. 0.1)."""
    score: str = "mahalanobis"
    """anomaly: how a document is scored."""
    mask_patterns: int = 4
    """anomaly, mlm: K, the fixed mask patterns every document is scored under (one forward pass each)."""
    mask_rate: float = 0.25
    """anomaly, mlm: the share of tokens each pattern masks; K * rate <= 1 keeps the patterns disjoint, and 1 / rate
    patterns (the default 4 x 0.25) score every token exactly once: an attack is a few tokens, none may be missed."""
    token_score: str = "auto"
    """anomaly, mlm: how the token surprises of a document become its score."""
    token_surprise: str = "auto"
    """anomaly, mlm: what a token's surprise is."""
    top_k: int = 5
    """anomaly, mlm: the k of token_score=topk, and how many surprising tokens the report lists per finding."""
    knn_k: int = 5
    """anomaly, knn: a document's distance is to its k-th nearest normal training embedding (k > 1: one stray normal
    document does not make its neighbourhood normal)."""
    fuse: list[str] = field(default_factory=lambda: ["mahalanobis", "knn", "mlm", "lexical"])
    """anomaly, fused: the scores that may be combined, each first calibrated on normal validation documents. With
    attacks in the validation set (embed.valid_from_test) the choice that separates them best is used: one of these
    scores alone, or a combination of two or more by a rule; without, all of them."""
    fuse_rule: str = "auto"
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
    fitted on every normal training document. 0: all."""
    report_top: int = 50
    """anomaly: the findings shown in anomaly_report.md (anomaly_report.jsonl has every flagged document)."""


@dataclass(kw_only=True)
class AblationConfig:
    base: str = ""
    """The base encoder (hub id or folder) that DAPT starts from and that is evaluated as the first row."""
    dapt_recipe: str = ""
    """launch/mlm.py recipe of the domain-adaptive stage (its model.name_or_path becomes `base`)."""
    tapt_recipe: str = ""
    """launch/mlm.py recipe of the task-adaptive stage (it starts from the DAPT output); empty: no TAPT row."""
    eval_recipe: str = ""
    """The recipe of the evaluation run on each checkpoint (launch/classify.py or launch/anomaly.py protocol)."""
    protocol: str = "classify"
    """How each checkpoint is evaluated."""
    score: str = ""
    """anomaly protocol: the embed.score every checkpoint is evaluated by (mahalanobis, knn, mlm, lexical, fused);
    empty: the eval recipe's. A model without a trained MLM head (the base, often) gets no mlm row, with the reason."""
    overrides: list[str] = field(default_factory=list)
    """Extra --section.field=value arguments given to every stage (e.g. --train.max_steps=100 for a quick look)."""


@dataclass(kw_only=True)
class RunConfig:
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


GPUS = NAMES  # dapt.config.gpus: the one table of GPU facts
# The allowed values of every choice field, written once (with what each means, where that needs saying): --help
# prints them under the field, and the loader checks values against them.
CHOICES = {
    "model.attn_implementation": ("auto", "flash_attention_2", "sdpa", "eager"),
    "data.format": {
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
    "data.packing": {
        "concat": "documents joined and cut into rows (run_mlm's group_texts)",
        "packed": "whole documents packed by best fit, attention kept within each document",
        "pad": "one document per row, truncated, padded per micro-batch to a multiple of 8",
    },
    "data.on_error": {
        "raise": "stop at the first bad record",
        "skip": "skip it and count it in metrics and summary",
    },
    "data.volatile": {  # data/volatile.py applies them, in this order
        "cookie": "the values of Cookie: header lines' name=value pairs, and the first of Set-Cookie:, when "
        "identifier-shaped (6+ letters, digits, . _ ~ -: an attack's quote, space, % or + keeps a value)",
        "session_id": "identifier-shaped values of session and token parameters (jsessionid, phpsessid, sid, sessionid, "
        "token, csrf...) in URLs, paths and form bodies",
        "hex": "runs of 16 or more hex digits with at least one digit and one letter (hashes, ids), not right after a %",
        "base64": "runs of 24 or more base64 characters with upper case, lower case and a digit (tokens, keys)",
    },
    "train.lr_schedule": ("linear", "cosine", "wsd", "constant"),
    "train.precision": ("auto", "bf16", "fp16", "fp32"),
    "train.optimizer_impl": ("auto", "deepspeed", "torch"),
    "train.compile": ("off", "inductor", "aot_eager", "cudagraphs"),
    "log.level": ("debug", "info", "warning"),
    "classify.metric": ("accuracy", "macro_f1", "micro_f1", "weighted_f1", "roc_auc"),
    "classify.unseen": {"error": "stop, naming file and line", "skip": "leave such records out, counted"},
    "embed.pooling": {"cls": "the first token's state", "mean": "the average over real tokens"},
    "embed.score": {
        "mahalanobis": "squared Mahalanobis distance of the pooled embedding to the normal training ones (seed 000)",
        "knn": "cosine distance of the pooled embedding to its embed.knn_k-th nearest normal training embedding, all "
        "centred on the normal training mean first",
        "mlm": "the MLM's surprise at the document's masked tokens (needs a trained MLM head: a dapt MLM run's final/)",
        "lexical": "the share of character n-grams never seen in normal training documents",
        "fused": "the embed.fuse scores, each turned into its tail probability among normal validation documents, "
        "combined by embed.fuse_rule",
    },
    "embed.fuse_rule": {
        "sum": "Fisher's method, the sum of -log p: evidence from several scores adds up",
        "max": "Tippett's method, the largest -log p (ties broken by the sum): what one score alone sees is not "
        "diluted by the others",
        "auto": "whichever of the two, with the combination, separates attacks from normal validation documents "
        "best (needs attacks in validation, e.g. embed.valid_from_test); sum without them. One score chosen alone "
        "needs no rule (fuse_rule null in anomaly.json)",
    },
    "embed.token_score": {
        "mean": "mean surprise of the masked tokens",
        "max": "the most surprising token",
        "topk": "mean of the embed.top_k most surprising tokens",
        "novel": "the surprise of the tokens that touch a character n-gram never seen in normal training documents "
        "(as lexical finds them), summed and divided by the number of masked tokens: surprise where the text is new "
        "too (needs a fast tokenizer; auto leaves it out without one)",
        "auto": "whichever of these separates attacks from normal validation documents best (needs attacks in "
        "validation, e.g. embed.valid_from_test); topk without them",
    },
    "embed.token_surprise": {
        "nll": "the negative log-likelihood of the true token at its masked position",
        "excess": "that NLL minus the entropy of the model's prediction there: surprise beyond what the model "
        "expected (a random name where any name may come is not, a quote where only a digit may is)",
        "auto": "whichever of the two, with the token score, separates attacks from normal validation documents "
        "best (needs attacks in validation); nll without them",
    },
    "embed.fuse": {
        "mahalanobis": "embedding distance to a Gaussian",
        "knn": "embedding distance to the nearest normal documents",
        "mlm": "MLM surprise",
        "lexical": "character n-gram novelty",
    },
    "ablation.protocol": ("classify", "anomaly"),
    "ablation.score": ("", "mahalanobis", "knn", "mlm", "lexical", "fused"),
    "checkpoint.disk_check": ("refuse", "warn", "off"),
    "checkpoint.export": {
        "best": "the best evaluation's checkpoint when there is an evaluation set (and keep_best), else the last",
        "last": "the last checkpoint",
    },
    "numerics.spike_action": ("warn", "stop"),
    "plan.gpu": GPUS,
    "cluster.gpu": ("", "cpu", *GPUS),
    "submit.scheduler": {
        "slurm": "an sbatch script",
        "skypilot": "a SkyPilot task YAML",
        "nodes": "one script run on every node with NODE_RANK and MASTER_ADDR set",
        "pdsh": "DeepSpeed's ssh launcher over cluster.hostfile, with its env file",
    },
}
# Values DESIGN.md names that the streaming data layer will bring; refused with that reason until then.
NOT_YET: dict[str, tuple[str, ...]] = {}


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


def save_resolved(cfg: RunConfig, path: Path) -> None:
    """Write the full config and the final DeepSpeed config as YAML."""
    doc = cfg.to_dict()
    doc["deepspeed"] = cfg.ds_config
    path.write_text(yaml.safe_dump(redact(doc), sort_keys=False))
