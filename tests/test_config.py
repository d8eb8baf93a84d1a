"""Config tree: recipe/ds-config/override loading, "auto" filling, contradictions and --help.

Pure and fast: only `load_config`, `finalize_ds_config` and `help_text`; no process group, model or data.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from dapt.cli.load import load_config
from dapt.config.dsconfig import AUTO, DEFERRED, _autos, finalize_ds_config
from dapt.config.schema import (
    CheckpointConfig,
    ConfigError,
    DataConfig,
    LogConfig,
    MaskingConfig,
    ModelConfig,
    RunConfig,
    TrainConfig,
    _sections,
    field_docs,
    help_text,
    save_resolved,
)

ROOT = Path(__file__).resolve().parents[1]
DS_DIR = ROOT / "ds_configs"
RECIPE_DIR = ROOT / "recipes"

# A recipe whose optimizer/batch values all differ from the dataclass defaults, so "filled from the recipe"
# cannot pass by accident. Floats are written with a dot: PyYAML reads `1e-8` as a string (see below).
TRAIN = {
    "max_steps": 10,
    "micro_batch_size": 4,
    "grad_accum": 3,
    "lr": 2.0e-4,
    "weight_decay": 0.05,
    "betas": [0.85, 0.95],
    "eps": 1.0e-8,
    "grad_clip": 0.5,
}
MODEL = {
    "config": {
        "model_type": "bert",
        "hidden_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "intermediate_size": 128,
    }
}


def write_yaml(tmp_path: Path, doc: dict, name: str = "recipe.yaml") -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return str(path)


def write_json(tmp_path: Path, doc: dict, name: str = "ds.json") -> str:
    path = tmp_path / name
    path.write_text(json.dumps(doc, indent=2))
    return str(path)


def recipe(tmp_path: Path, train: dict | None = None, ds: dict | str | None = None, **sections) -> str:
    """A valid recipe (tiny from-scratch BERT) with `train` and the ds config (a dict is written as JSON)."""
    doc: dict = {"output_dir": str(tmp_path / "run"), "model": MODEL}
    if train is not None:
        doc["train"] = train
    if isinstance(ds, dict):
        ds = write_json(tmp_path, ds)
    if ds is not None:
        doc["ds"] = ds
    doc.update(sections)
    return write_yaml(tmp_path, doc)


def load(argv: list[str], world_size: int = 1) -> RunConfig:
    return load_config(argv, world_size=world_size, accelerator="cpu")


def problems_of(argv: list[str], world_size: int = 1) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load(argv, world_size)
    err = info.value
    assert err.problems, "ConfigError without problems"
    for p in err.problems:  # the message lists every problem
        assert p in str(err)
    return err.problems


def one_matching(problems: list[str], *needles: str) -> str:
    hits = [p for p in problems if all(n in p for n in needles)]
    assert len(hits) == 1, f"expected one problem with {needles}, got {problems}"
    return hits[0]


def field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


# ------------------------------------------------------------------ 1. unknown keys, types, values


def test_misspelt_key_names_it_and_lists_valid_keys(tmp_path):
    path = write_yaml(tmp_path, {"model": MODEL, "train": {"max_step": 5}, "trainer": {"lr": 1.0}})
    problems = problems_of(["--recipe", path])
    assert len(problems) == 2, problems

    bad = one_matching(problems, "'train.max_step'")
    assert "valid keys in train" in bad
    for name in field_names(TrainConfig):
        assert name in bad
    assert bad.index("valid keys") < bad.index("max_steps")

    top = one_matching(problems, "'trainer'")
    valid = top.split("valid keys:")[1]
    for name in (
        "output_dir",
        "seed",
        "resume",
        "ds",
        "model",
        "data",
        "masking",
        "train",
        "checkpoint",
        "log",
    ):
        assert name in valid
    assert "ds_config" not in valid and "explicit" not in valid  # internal fields are not keys


@pytest.mark.parametrize(
    "section, cls",
    [
        ("model", ModelConfig),
        ("data", DataConfig),
        ("masking", MaskingConfig),
        ("checkpoint", CheckpointConfig),
        ("log", LogConfig),
    ],
)
def test_misspelt_key_in_every_section(tmp_path, section, cls):
    path = write_yaml(tmp_path, {"model": MODEL} | {section: {"nope_key": 1}})
    bad = one_matching(problems_of(["--recipe", path]), f"'{section}.nope_key'")
    assert f"valid keys in {section}: " + ", ".join(field_names(cls)) in bad


def test_key_and_type_problems_reported_together(tmp_path):
    path = write_yaml(
        tmp_path,
        {
            "model": MODEL,
            "bogus": 1,
            "train": {"max_step": 5, "micro_batch_size": "eight", "lr": [1]},
            "log": {"wandb": "yes please"},
        },
    )
    problems = problems_of(["--recipe", path])
    assert len(problems) == 5, problems
    one_matching(problems, "'bogus'")
    one_matching(problems, "'train.max_step'")
    assert "expected int" in one_matching(problems, "train.micro_batch_size", "'eight'")
    assert "expected float" in one_matching(problems, "train.lr")
    assert "expected bool" in one_matching(problems, "log.wandb")


def test_value_problems_reported_together(tmp_path):
    path = write_yaml(
        tmp_path,
        {
            "model": MODEL,
            "data": {"max_seq_length": -5, "packing": "zip"},
            "masking": {"rate": 1.5},
            "train": {"micro_batch_size": 0},
        },
    )
    problems = problems_of(["--recipe", path])
    assert len(problems) == 4, problems
    assert ">= 8" in one_matching(problems, "data.max_seq_length", "-5")
    assert "concat" in one_matching(problems, "data.packing", "'zip'")
    one_matching(problems, "masking.rate", "1.5")
    one_matching(problems, "train.micro_batch_size", ">= 1")


def test_all_kinds_of_problems_in_one_error(tmp_path):
    path = write_yaml(
        tmp_path,
        {
            "model": MODEL,
            "train": {"max_step": 5, "micro_batch_size": "eight"},
            "data": {"max_seq_length": -5, "packing": "zip"},
        },
    )
    problems = problems_of(["--recipe", path])
    one_matching(problems, "'train.max_step'", "valid keys in train")
    one_matching(problems, "train.micro_batch_size", "'eight'")
    one_matching(problems, "data.max_seq_length", "-5")
    one_matching(problems, "data.packing", "'zip'")
    assert len(problems) == 4, problems


def test_unreadable_and_invalid_recipe(tmp_path):
    problems = problems_of(["--recipe", str(tmp_path / "missing.yaml")])
    assert "cannot read" in one_matching(problems, "missing.yaml")

    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  max_steps: [1,\n")
    assert "not valid YAML" in one_matching(problems_of(["--recipe", str(bad)]), "bad.yaml")

    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    assert "mapping" in one_matching(problems_of(["--recipe", str(listing)]), "list.yaml")


def test_positional_argument_refused():
    problems = problems_of(["train.max_steps=3"])
    assert "unexpected argument" in one_matching(problems, "'train.max_steps=3'")


# ------------------------------------------------------------------ 2. command-line overrides


def test_overrides_are_typed_and_beat_the_recipe(tmp_path):
    path = recipe(tmp_path, train={"max_steps": 100, "lr": 0.01}, log={"wandb": False})
    cfg = load(
        [
            "--recipe",
            path,
            "--train.max_steps=7",
            "--train.lr",
            "3.0e-4",
            "--log.wandb",
            "--local_rank=0",
            "--train.warmup_ratio",
            "0.1",
            "--seed=5",
        ]
    )
    assert cfg.train.max_steps == 7 and type(cfg.train.max_steps) is int
    assert cfg.train.lr == pytest.approx(3e-4) and type(cfg.train.lr) is float
    assert cfg.log.wandb is True
    assert cfg.train.warmup_ratio == pytest.approx(0.1)
    assert cfg.seed == 5
    assert {"train.max_steps", "train.lr", "log.wandb", "seed"} <= cfg.explicit
    assert "local_rank" not in cfg.to_dict()
    # the overrides reach the ds config too
    assert cfg.ds_config["optimizer"]["params"]["lr"] == pytest.approx(3e-4)


def test_local_rank_space_form_and_bare_flag_before_option(tmp_path):
    path = recipe(tmp_path, train={"max_steps": 3})
    cfg = load(["--local_rank", "1", "--log.wandb", "--recipe", path, "--model.gradient_checkpointing"])
    assert cfg.log.wandb is True and cfg.model.gradient_checkpointing is True
    assert cfg.train.max_steps == 3  # --recipe after a bare flag is still read


def test_int_override_for_float_field_becomes_float(tmp_path):
    cfg = load(["--recipe", recipe(tmp_path), "--train.lr=1", "--train.epochs", "2"])
    assert type(cfg.train.lr) is float and cfg.train.lr == 1.0
    assert type(cfg.train.epochs) is float and cfg.train.epochs == 2.0


def test_override_type_error(tmp_path):
    problems = problems_of(["--recipe", recipe(tmp_path), "--train.max_steps=many", "--log.wandb=maybe"])
    assert len(problems) == 2
    one_matching(problems, "train.max_steps", "'many'")
    one_matching(problems, "log.wandb", "'maybe'")


def test_unknown_override_key(tmp_path):
    bad = one_matching(
        problems_of(["--recipe", recipe(tmp_path), "--train.max_stepz=3"]), "'train.max_stepz'"
    )
    assert "max_steps" in bad


@pytest.mark.parametrize("where", ["cli", "recipe"])
def test_exponent_float_without_dot(tmp_path, where):
    if where == "cli":
        cfg = load(["--recipe", recipe(tmp_path), "--train.lr", "3e-4"])
    else:
        path = tmp_path / "r.yaml"
        path.write_text("model:\n  config: {model_type: bert}\ntrain:\n  lr: 3e-4\n  eps: 1e-8\n")
        cfg = load(["--recipe", str(path)])
        assert cfg.train.eps == pytest.approx(1e-8)
    assert cfg.train.lr == pytest.approx(3e-4)


# ------------------------------------------------------------------ 3. "auto" filling from the shipped ds configs

SHIPPED = sorted(p.name for p in DS_DIR.glob("*.json") if "fp16" not in p.name)


def test_shipped_ds_configs_present():
    assert len(SHIPPED) >= 5, SHIPPED


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_ds_config_auto_filled(tmp_path, name):
    world = 2
    cfg = load(["--recipe", recipe(tmp_path, train=TRAIN, ds=str(DS_DIR / name))], world_size=world)
    ds = cfg.ds_config
    t = cfg.train
    assert (t.micro_batch_size, t.grad_accum) == (4, 3)
    assert ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 3
    assert ds["train_batch_size"] == 4 * 3 * world
    assert ds["gradient_clipping"] == pytest.approx(0.5)
    params = ds["optimizer"]["params"]
    assert params["lr"] == pytest.approx(2e-4)
    assert list(params["betas"]) == pytest.approx([0.85, 0.95])
    assert params["eps"] == pytest.approx(1e-8)
    assert params["weight_decay"] == pytest.approx(0.05)
    assert ds["bf16"]["enabled"] is True and t.precision == "bf16"
    # On CPU the optimizer is torch AdamW through DeepSpeed (no JIT-built op).
    assert params["torch_adam"] is True
    offloaded = "offload_optimizer" in ds["zero_optimization"]
    assert ("zero_force_ds_cpu_optimizer" in ds) == offloaded
    if offloaded:
        assert ds["zero_force_ds_cpu_optimizer"] is False

    left = set(_autos(ds))
    assert left <= DEFERRED, left - DEFERRED
    shipped = json.loads((DS_DIR / name).read_text())
    assert left == {
        p for p in DEFERRED if p[0] in shipped and p[1] in shipped[p[0]] and shipped[p[0]][p[1]] == AUTO
    }

    ds = finalize_ds_config(ds, total_steps=10, warmup_steps=1, hidden_size=64)
    assert _autos(ds) == []
    zero = ds["zero_optimization"]
    if ("zero_optimization", "reduce_bucket_size") in left:
        assert zero["reduce_bucket_size"] == 64 * 64
    if ("zero_optimization", "stage3_prefetch_bucket_size") in left:
        assert zero["stage3_prefetch_bucket_size"] == int(0.9 * 64 * 64)
        assert zero["stage3_param_persistence_threshold"] == 10 * 64
    # the shipped file on disk is untouched
    assert json.loads((DS_DIR / name).read_text()) == shipped


def test_zero3_offload_on_cpu_uses_torch_adam(tmp_path):
    cfg = load(
        ["--recipe", recipe(tmp_path, train=TRAIN, ds=str(DS_DIR / "zero3_offload_bf16.json"))], world_size=2
    )
    assert cfg.ds_config["optimizer"]["params"]["torch_adam"] is True
    assert cfg.ds_config["zero_force_ds_cpu_optimizer"] is False


def test_zero3_finalize_values(tmp_path):
    cfg = load(["--recipe", recipe(tmp_path, train=TRAIN, ds=str(DS_DIR / "zero3_bf16.json"))], world_size=2)
    ds = cfg.ds_config
    assert ds["zero_optimization"]["reduce_bucket_size"] == AUTO
    ds = finalize_ds_config(ds, total_steps=10, warmup_steps=1, hidden_size=64)
    assert (
        cfg.ds_config["zero_optimization"]["reduce_bucket_size"] == AUTO
    )  # the loaded config is not changed
    assert ds["zero_optimization"]["reduce_bucket_size"] == 4096
    assert ds["zero_optimization"]["stage3_prefetch_bucket_size"] == 3686
    assert ds["zero_optimization"]["stage3_param_persistence_threshold"] == 640


def test_finalize_fills_scheduler_steps_and_refuses_leftovers():
    ds = {
        "scheduler": {"type": "WarmupDecayLR", "params": {"total_num_steps": AUTO, "warmup_num_steps": AUTO}},
        "zero_optimization": {"stage": 2, "reduce_bucket_size": AUTO},
    }
    ds = finalize_ds_config(ds, total_steps=100, warmup_steps=6, hidden_size=32)
    assert ds["scheduler"]["params"] == {"total_num_steps": 100, "warmup_num_steps": 6}
    assert ds["zero_optimization"]["reduce_bucket_size"] == 32 * 32

    ds = {"zero_optimization": {"stage": 2, "reduce_bucket_size": AUTO}}
    with pytest.raises(ValueError, match="zero_optimization.reduce_bucket_size"):
        finalize_ds_config(ds, total_steps=1, warmup_steps=0, hidden_size=None)


def test_cuda_gets_torchs_fused_adamw_and_deepspeeds_only_when_asked(tmp_path):
    """Pure: with accelerator="cuda" and a fixed precision nothing touches the device. The default needs no build;
    optimizer_impl=deepspeed leaves DeepSpeed to build FusedAdam (its buildability is checked where the run starts,
    not on this machine without a GPU)."""
    argv = ["--recipe", recipe(tmp_path, train=TRAIN, ds=str(DS_DIR / "zero2_bf16.json"))]
    params = load_config(argv, world_size=2, accelerator="cuda").ds_config["optimizer"]["params"]
    assert params["torch_adam"] is True and params["fused"] is True
    params = load_config(
        argv + ["--train.optimizer_impl=deepspeed"], world_size=2, accelerator="cuda"
    ).ds_config["optimizer"]["params"]
    assert "torch_adam" not in params and "fused" not in params


def test_default_ds_config_on_cpu_runs_fp32(tmp_path):
    cfg = load(["--recipe", recipe(tmp_path, train=TRAIN), "--data.streams=6"], world_size=3)
    ds = cfg.ds_config
    assert cfg.train.precision == "fp32"
    assert ds["bf16"]["enabled"] is False
    assert ds["train_batch_size"] == 4 * 3 * 3
    assert ds["zero_optimization"]["stage"] == 0
    assert _autos(ds) == []


# ------------------------------------------------------------------ 4. fp16 on CPU


def test_fp16_ds_config_refused_on_cpu(tmp_path):
    import torch

    try:
        cpu_fp16 = bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    except (AttributeError, RuntimeError):
        cpu_fp16 = False
    argv = ["--recipe", recipe(tmp_path, train=TRAIN, ds=str(DS_DIR / "zero2_fp16.json"))]
    if cpu_fp16:
        cfg = load(argv, world_size=2)
        assert cfg.train.precision == "fp16"
        pytest.skip("this CPU supports fp16 (mkldnn), so dapt rightly accepts zero2_fp16.json here")
    problems = problems_of(argv, world_size=2)
    assert len(problems) == 1, problems
    assert "fp16" in problems[0] and "GPU" in problems[0]


# ------------------------------------------------------------------ 5. contradictions between recipe and ds config

FIXED_DS = {"train_micro_batch_size_per_gpu": 4, "optimizer": {"type": "AdamW", "params": {"lr": AUTO}}}


def test_ds_micro_batch_contradicts_explicit_recipe(tmp_path):
    problems = problems_of(["--recipe", recipe(tmp_path, train={"micro_batch_size": 8}, ds=FIXED_DS)])
    bad = one_matching(problems, "contradiction", "train_micro_batch_size_per_gpu")
    assert "= 4" in bad and "train.micro_batch_size = 8" in bad


def test_ds_micro_batch_contradicts_override(tmp_path):
    problems = problems_of(["--recipe", recipe(tmp_path, ds=FIXED_DS), "--train.micro_batch_size=8"])
    one_matching(problems, "train_micro_batch_size_per_gpu = 4", "train.micro_batch_size = 8")


def test_ds_micro_batch_adopted_when_recipe_silent(tmp_path):
    cfg = load(["--recipe", recipe(tmp_path, train={"grad_accum": 2}, ds=FIXED_DS)], world_size=2)
    assert cfg.train.micro_batch_size == 4
    assert cfg.ds_config["train_micro_batch_size_per_gpu"] == 4
    assert cfg.ds_config["train_batch_size"] == 4 * 2 * 2


def test_ds_values_adopted_with_their_own_values(tmp_path):
    ds = {
        "gradient_clipping": 2.0,
        "optimizer": {"type": "AdamW", "params": {"lr": 0.003, "betas": [0.8, 0.9]}},
    }
    cfg = load(["--recipe", recipe(tmp_path, ds=ds)])
    assert cfg.train.grad_clip == 2.0
    assert cfg.train.lr == pytest.approx(0.003)
    assert cfg.train.betas == [0.8, 0.9]


def test_ds_value_equal_to_recipe_is_no_contradiction(tmp_path):
    ds = {"train_micro_batch_size_per_gpu": 4, "gradient_clipping": 0.5}
    cfg = load(["--recipe", recipe(tmp_path, train=TRAIN, ds=ds)])
    assert cfg.train.micro_batch_size == 4 and cfg.ds_config["gradient_clipping"] == 0.5


def test_ds_train_batch_size_not_divisible(tmp_path):
    ds = {"train_batch_size": 30}
    problems = problems_of(["--recipe", recipe(tmp_path, train={"micro_batch_size": 4}, ds=ds)], world_size=2)
    bad = one_matching(problems, "train_batch_size = 30", "not divisible")
    assert "4 x 2" in bad


def test_ds_train_batch_size_not_divisible_reported_once(tmp_path):
    ds = {"train_batch_size": 30, "gradient_accumulation_steps": AUTO}
    problems = problems_of(["--recipe", recipe(tmp_path, train={"micro_batch_size": 4}, ds=ds)], world_size=2)
    assert len(problems) == 1, problems


@pytest.mark.parametrize("value", ["4", 0, -2])
def test_adopted_ds_value_is_validated(tmp_path, value):
    problems = problems_of(["--recipe", recipe(tmp_path, ds={"train_micro_batch_size_per_gpu": value})])
    one_matching(problems, "train_micro_batch_size_per_gpu")


@pytest.mark.parametrize(
    "ds",
    [{"scheduler": "WarmupLR"}, {"optimizer": {"type": "AdamW", "params": None}}],
    ids=["scheduler-str", "params-null"],
)
def test_malformed_ds_block_is_a_config_error(tmp_path, ds):
    problems = problems_of(["--recipe", recipe(tmp_path, ds=ds)])
    one_matching(problems, "expected an object")


def test_ds_train_batch_size_sets_grad_accum(tmp_path):
    ds = {"train_batch_size": 32}
    cfg = load(["--recipe", recipe(tmp_path, train={"micro_batch_size": 4}, ds=ds)], world_size=2)
    assert cfg.train.grad_accum == 4
    assert cfg.ds_config["gradient_accumulation_steps"] == 4
    assert cfg.ds_config["train_batch_size"] == 32


def test_ds_train_batch_size_contradicts_explicit_accum(tmp_path):
    ds = {"train_batch_size": 32}
    problems = problems_of(
        ["--recipe", recipe(tmp_path, train={"micro_batch_size": 4, "grad_accum": 3}, ds=ds)], world_size=2
    )
    one_matching(problems, "train_batch_size = 32", "4 x 3 x 2 = 24")


def test_bf16_and_fp16_both_enabled(tmp_path):
    ds = {"bf16": {"enabled": True}, "fp16": {"enabled": True}}
    problems = problems_of(["--recipe", recipe(tmp_path, ds=ds)])
    one_matching(problems, "bf16", "fp16", "both")


def test_ds_bf16_contradicts_recipe_fp32(tmp_path):
    ds = {"bf16": {"enabled": True}}
    problems = problems_of(["--recipe", recipe(tmp_path, train={"precision": "fp32"}, ds=ds)])
    one_matching(problems, "contradiction", "bf16", "'fp32'")


def test_ds_half_precision_off_means_fp32(tmp_path):
    ds = {"bf16": {"enabled": False}}
    problems = problems_of(["--recipe", recipe(tmp_path, train={"precision": "bf16"}, ds=ds)])
    one_matching(problems, "contradiction", "fp32", "'bf16'")


def test_ds_auto_precision_follows_recipe(tmp_path):
    ds = {"bf16": {"enabled": AUTO}}
    cfg = load(["--recipe", recipe(tmp_path, train={"precision": "bf16"}, ds=ds)])
    assert cfg.ds_config["bf16"]["enabled"] is True


def test_leftover_auto_in_unknown_place(tmp_path):
    ds = {
        "optimizer": {"type": "AdamW", "params": {"amsgrad": AUTO}}
    }  # a key AdamW takes, which dapt cannot fill
    problems = problems_of(["--recipe", recipe(tmp_path, ds=ds)])
    bad = one_matching(problems, "optimizer.params.amsgrad")
    assert "auto" in bad


def test_scheduler_in_ds_and_recipe_lr_schedule(tmp_path):
    ds = {"scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": AUTO}}}
    problems = problems_of(["--recipe", recipe(tmp_path, train={"lr_schedule": "cosine"}, ds=ds)])
    bad = one_matching(problems, "contradiction", "scheduler")
    assert "WarmupLR" in bad and "train.lr_schedule" in bad


def test_scheduler_in_ds_alone_is_filled(tmp_path):
    ds = {"scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": AUTO, "warmup_min_lr": AUTO}}}
    cfg = load(["--recipe", recipe(tmp_path, train=TRAIN, ds=ds)])
    params = cfg.ds_config["scheduler"]["params"]
    assert params["warmup_max_lr"] == pytest.approx(2e-4)
    assert params["warmup_min_lr"] == 0.0
    assert params["warmup_num_steps"] == AUTO  # deferred to finalize_ds_config


def test_ds_file_problems(tmp_path):
    problems = problems_of(["--recipe", recipe(tmp_path, ds=str(tmp_path / "nope.json"))])
    one_matching(problems, "nope.json", "not found")

    broken = tmp_path / "broken.json"
    broken.write_text('{"bf16": {"enabled": true},}')
    problems = problems_of(["--recipe", recipe(tmp_path, ds=str(broken))])
    assert "not valid JSON" in one_matching(problems, "broken.json")


# ------------------------------------------------------------------ 6. --help

DESIGN_NAMES = [
    "output_dir",
    "seed",
    "model.name_or_path",
    "model.config",
    "data.train",
    "data.valid",
    "data.test",
    "data.format",
    "data.packing",
    "data.max_seq_length",
    "data.on_error",
    "data.log_sample_ids",
    "masking.rate",
    "train.max_steps",
    "train.epochs",
    "train.eval_every",
    "checkpoint.every",
    "checkpoint.keep",
    "resume",
    "log.wandb",
]


def test_help_text_sections_and_docs():
    text = help_text()
    for section in SECTIONS:
        assert f"\n[{section}]\n" in text
    assert text.index("[model]") < text.index("[data]") < text.index("[train]") < text.index("[log]")
    assert "Rows per rank per forward pass (fills train_micro_batch_size_per_gpu)." in text
    assert "Share of maskable tokens selected for prediction (BERT 15%; ModernBERT recipes use 30%)." in text
    assert "Keep the last K checkpoints (the best one by eval loss is kept as well)." in text
    assert "--train.micro_batch_size=int  (default: 8)" in text
    assert "--seed=int  (default: 42)" in text


@pytest.mark.parametrize("name", DESIGN_NAMES)
def test_help_text_has_design_name(name):
    assert f"  --{name}=" in help_text()


SECTIONS = tuple(_sections())  # every section of the tree, whatever is added later


@pytest.mark.parametrize("cls", [RunConfig, *_sections().values()], ids=lambda cls: cls.__name__)
def test_every_field_documented_in_help(cls):
    docs = field_docs(cls)
    text = help_text()
    for f in dataclasses.fields(cls):
        if f.metadata.get("internal") or f.name in SECTIONS:
            continue
        assert docs.get(f.name), f"{cls.__name__}.{f.name} has no docstring"
        assert docs[f.name] in text


# ------------------------------------------------------------------ 7. embedded default


def test_embedded_default_without_recipe():
    cfg = load([])
    assert isinstance(cfg.model.config, dict) and cfg.model.config["model_type"] == "bert"
    assert cfg.model.name_or_path is None
    assert cfg.train.max_steps == 300 and cfg.train.micro_batch_size == 16
    assert cfg.ds_config["train_micro_batch_size_per_gpu"] == 16


def test_embedded_default_overridden_on_the_command_line():
    cfg = load(["--train.max_steps=5", "--data.max_seq_length", "32"])
    assert cfg.train.max_steps == 5 and cfg.data.max_seq_length == 32
    assert cfg.model.config["model_type"] == "bert"


def test_pretrained_model_drops_embedded_config(tmp_path):
    model_dir = tmp_path / "some" / "dir"
    model_dir.mkdir(parents=True)
    cfg = load([f"--model.name_or_path={model_dir}"])
    assert cfg.model.name_or_path == str(model_dir)
    assert cfg.model.config is None
    assert cfg.model.tokenizer_vocab_size == ModelConfig().tokenizer_vocab_size  # model.* defaults restored
    assert cfg.train.max_steps == 300  # the rest of the embedded default stays


def test_recipe_with_both_model_sources_is_exclusive(tmp_path):
    path = write_yaml(tmp_path, {"model": {"name_or_path": "x", "config": {"model_type": "bert"}}})
    one_matching(problems_of(["--recipe", path]), "exclusive")


# ------------------------------------------------------------------ 8. shipped recipes

RECIPES = sorted(RECIPE_DIR.glob("**/*.yaml")) + sorted(RECIPE_DIR.glob("**/*.yml"))


@pytest.mark.parametrize("path", RECIPES or [None], ids=lambda p: p.name if p else "none")
def test_shipped_recipe_loads(path, monkeypatch, tmp_path):
    if path is None:
        pytest.skip("no recipes under recipes/")
    monkeypatch.chdir(ROOT)  # recipes name data and ds files relative to the repository root
    if "../shared/" in path.read_text() and not (ROOT.parent / "shared" / "data").is_dir():
        pytest.skip(f"{path.name} reads ../shared/data, which is absent")
    # the hub models it names, fetched once before (offline here): their config.json in a Hugging Face cache
    import huggingface_hub.constants
    from conftest import hub_cache

    model = (yaml.safe_load(path.read_text()) or {}).get("model") or {}
    named = (model.get("name_or_path"), model.get("tokenizer"))
    hub = [m for m in named if m and m.count("/") <= 1 and not m.startswith(("runs/", ".", "/", "~"))]
    cache = hub_cache(tmp_path / "hub", hub)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    cfg = load(["--recipe", str(path)], world_size=2)
    for (
        line
    ) in path.read_text().splitlines():  # every field with a value carries a comment saying why (STYLE)
        depth = len(line) - len(line.lstrip())
        field = line.strip()
        if depth <= 2 and field and not field.startswith("#") and not field.rstrip().endswith(":"):
            assert "#" in line, f"{path.name}: field without a comment: {line!r}"
    assert cfg.ds_config["train_batch_size"] == cfg.train.micro_batch_size * cfg.train.grad_accum * 2


# ------------------------------------------------------------------ 9. streaming formats and what still waits


@pytest.mark.parametrize("fmt", ["lines", "docs", "http", "jsonl", "csv", "tsv", "parquet"])
def test_every_design_format_is_accepted(tmp_path, fmt):
    assert load(["--recipe", recipe(tmp_path), f"--data.format={fmt}"]).data.format == fmt


@pytest.mark.parametrize("packing", ["concat", "pad", "packed"])
def test_every_design_packing_is_accepted(tmp_path, packing):
    assert load(["--recipe", recipe(tmp_path), f"--data.packing={packing}"]).data.packing == packing


def test_streams_must_divide_by_world(tmp_path):
    one_matching(
        problems_of(["--recipe", recipe(tmp_path), "--data.streams=8"], world_size=3),
        "data.streams",
        "multiple of the world size 3",
    )
    assert load(["--recipe", recipe(tmp_path), "--data.streams=6"], world_size=3).data.streams == 6


def test_save_resolved_roundtrip(tmp_path):
    cfg = load(["--recipe", recipe(tmp_path, train=TRAIN)])
    out = tmp_path / "resolved.yaml"
    save_resolved(cfg, out)
    doc = yaml.safe_load(out.read_text())
    assert doc["train"]["micro_batch_size"] == 4
    assert doc["deepspeed"]["train_batch_size"] == 12
    assert "explicit" not in doc and "ds_config" not in doc


def test_command_line_pretrained_model_replaces_the_recipes_from_scratch_config(tmp_path):
    r = tmp_path / "r.yaml"
    r.write_text(yaml.safe_dump({"model": {"config": {"model_type": "bert"}, "tokenizer_vocab_size": 500}}))
    (tmp_path / "m").mkdir()
    cfg = load(["--recipe", str(r), f"--model.name_or_path={tmp_path / 'm'}"])
    assert cfg.model.config is None and cfg.model.name_or_path == str(tmp_path / "m")
    one_matching(
        problems_of(
            [
                "--recipe",
                str(r),
                f"--model.name_or_path={tmp_path / 'm'}",
                "--model.config={model_type: bert}",
            ]
        ),
        "exclusive",
    )


def test_a_recipe_without_a_model_is_a_config_error(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("train:\n  lr: 3.0e-4\n")
    one_matching(problems_of(["--recipe", str(path)]), "model.name_or_path", "model.config")


def test_off_on_yes_no_stay_words_as_in_yaml_1_2(tmp_path):
    """YAML 1.1 reads off/on/yes/no as booleans, which made --checkpoint.disk_check=off a type error."""
    cfg = load(["--checkpoint.disk_check=off", "--train.compile=off", "--log.wandb=true"])
    assert (cfg.checkpoint.disk_check, cfg.train.compile, cfg.log.wandb) == ("off", "off", True)
    path = Path(recipe(tmp_path))
    assert "checkpoint:" not in path.read_text()
    path.write_text(path.read_text() + "checkpoint:\n  disk_check: off\n")  # unquoted, as people write it
    assert load(["--recipe", str(path)]).checkpoint.disk_check == "off"
    one_matching(problems_of(["--log.wandb=yes"]), "log.wandb", "expected bool")


@pytest.mark.parametrize(
    "script, reads, not_read",
    [
        (
            "launch/classify.py",
            ["model", "data", "train", "checkpoint", "classify"],
            ["submit", "plan", "fill", "profile"],
        ),
        (
            "launch/mlm.py",
            ["model", "data", "masking", "train", "checkpoint"],
            ["submit", "plan", "fill", "classify"],
        ),
        ("launch/fill_mask.py", ["model", "fill"], ["train", "checkpoint", "submit", "plan"]),
        ("launch/submit.py", ["model", "submit", "plan", "cluster"], []),
    ],
)
def test_each_tool_lists_and_takes_only_the_sections_it_reads(script, reads, not_read):
    """--help shows the script's own sections only, with each choice field's allowed values from the one table; a
    command-line key of another section is refused, naming the sections the script reads (all problems at once)."""
    from dapt.cli.load import collect_config
    from dapt.config.schema import help_text

    text = help_text(script)
    for section in reads:
        assert f"\n[{section}]\n" in text
    for section in not_read:
        assert f"--{section}." not in text and f"[{section}]" not in text
    if "train" in reads:
        assert "--train.precision=auto | bf16 | fp16 | fp32  (default: 'auto')" in text
    if not not_read:
        return
    _, problems = collect_config(
        [f"--{not_read[0]}.x=1", "--train.lr=0", "--output_dir=/tmp/x"],
        world_size=1,
        accelerator="cpu",
        prog=script,
    )
    refused = [p for p in problems if "does not read" in p]
    assert refused and refused[0].startswith(
        f"--{not_read[0]}.x: {script} does not read the [{not_read[0]}] section"
    )
    assert all(section in refused[0] for section in reads)


def test_a_misspelt_deepspeed_key_at_any_level_is_a_config_error_naming_the_closest_key(tmp_path):
    """DeepSpeed ignores a top-level key it does not know (a run "with" zero_optimisation trained at ZeRO 0) and never
    looks inside optimizer/scheduler params until deepspeed.initialize: each is reported before any rank starts, with
    the key DeepSpeed knows that is closest. The known keys are read off DeepSpeed's own parser and constructors.
    An "auto" inside a misspelt block is not reported as a value dapt cannot fill: the key is the problem."""
    ds = json.loads((DS_DIR / "zero2_bf16.json").read_text())
    ds["zero_optimisation"] = ds.pop("zero_optimization")
    ds["gradient_acumulation_steps"] = 4
    ds["optimizer"]["params"]["betass"] = [0.9, 0.99]
    ds["scheduler"] = {"type": "WarmupLR", "params": {"warmup_num_step": 3}}
    problems = problems_of(["--recipe", recipe(tmp_path), "--ds", write_json(tmp_path, ds)])
    one_matching(
        problems, "unknown key 'zero_optimisation' at the top level", "did you mean 'zero_optimization'"
    )
    one_matching(problems, "'gradient_acumulation_steps'", "did you mean 'gradient_accumulation_steps'")
    one_matching(problems, "'betass' in optimizer.params (AdamW)", "did you mean 'betas'")
    one_matching(
        problems, "'warmup_num_step' in scheduler.params (WarmupLR)", "did you mean 'warmup_num_steps'"
    )
    assert not [p for p in problems if "cannot fill" in p], (
        problems
    )  # zero_optimisation.reduce_bucket_size: auto
    inside = json.loads((DS_DIR / "zero2_bf16.json").read_text())
    inside["zero_optimization"]["overlap_comms"] = True  # inside a block: DeepSpeed's own model says so
    one_matching(
        problems_of(["--recipe", recipe(tmp_path), "--ds", write_json(tmp_path, inside)]), "overlap_comms"
    )
    for shipped in sorted(
        DS_DIR.glob("*.json")
    ):  # every shipped config and the built-in one know only real keys
        from dapt.config.dsconfig import DEFAULT_DS, unknown_keys

        assert unknown_keys(json.loads(shipped.read_text())) == [] and unknown_keys(DEFAULT_DS) == [], shipped


def test_warmup_steps_and_ratio_both_given_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="warmup_steps and train.warmup_ratio are both set"):
        load(
            ["--recipe", recipe(tmp_path, train=TRAIN), "--train.warmup_steps=10", "--train.warmup_ratio=0.1"]
        )
    load(["--recipe", recipe(tmp_path, train=TRAIN), "--train.warmup_steps=10"])  # one of them is fine


def test_a_resume_path_that_is_no_checkpoint_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="neither auto, never nor an existing checkpoint folder"):
        load(["--recipe", recipe(tmp_path, train=TRAIN), f"--resume={tmp_path / 'no_such_checkpoint'}"])
