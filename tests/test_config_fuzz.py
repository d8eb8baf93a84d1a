"""Config fuzz: wrong types, out-of-range and negative sizes, NaN and infinities, batch sizes that do not divide,
contradictory DeepSpeed configs. Each field has an expected verdict for each wrong value (accepted, or one ConfigError
naming it), checked both ways; a mix of problems is reported at once, before any process group or output exists;
under the DeepSpeed launcher every rank exits 2 and nothing starts."""

from __future__ import annotations

import dataclasses
import json
import random
import typing

import pytest
import yaml
from conftest import DS, TINY_MODEL, launch

from dapt.cli.load import load_config
from dapt.config.schema import ConfigError, RunConfig, _sections

NASTY = [
    -1,
    0,
    -7.5,
    3.5,
    "",
    "x",
    "-3",
    [1, "a"],
    {"a": 1},
    None,
    True,
    1e30,
    float("nan"),
    "auto",
    float("inf"),
]

# The expected verdict of every field for each NASTY value, in order: A accepted (loads), R rejected (a ConfigError
# naming the field). Read with the fields' types and meanings in mind: a type that cannot hold the value rejects it;
# every float rejects NaN and infinities; sizes, counts, rates and seeds are checked against their ranges; names,
# paths and labels of other tools (submit.*, cluster.hostfile, data.columns, ...) are accepted here and checked by
# the tool that uses them, model.tokenizer when it is loaded. model.revision needs a hub model, which the fuzz recipe
# does not name; hub.push=true needs a token and the network, which these tests (HF_HUB_OFFLINE) have not. The fuzz recipe runs 4 steps on 2 ranks, so
# train.max_steps decides the length whatever train.epochs says (which must still be > 0).
VERDICTS = """
model.name_or_path             R R R R A R R R R A R R R R R
model.config                   R R R R R R R R R R R R R R R
model.revision                 R R R R R R R R R A R R R R R
model.tokenizer                A A A A A A A R R A R A A A A
model.tokenizer_vocab_size     R R R R R R R R R R R R R R R
model.mark_capitals            R R R R R R R R R R A R R R R
model.attn_implementation      R R R R R R R R R R R R R A R
model.gradient_checkpointing   R R R R R R R R R R A R R R R
model.trust_remote_code        R R R R R R R R R R A R R R R
model.char_vocab               R R R R R R R R R R R R R R R
data.train                     R R R R R R R R R R R R R R R
data.train_weights             R R R A R R R R R R R A R R R
data.valid                     R R R R R R R R R R R R R R R
data.test                      R R R R R R R R R R R R R R R
data.format                    R R R R R R R R R R R R R R R
data.text_field                A A A A A A A R R R R A A A A
data.records_field             A A A A A A A R R R R A A A A
data.columns                   A A A A A A A A R R R A A A A
data.column_names              A A A A A A A A R R R A A A A
data.round_digits              A A R R R R R R R A R R R R R
data.omit_zeros                R R R R R R R R R R A R R R R
data.packing                   R R R R R R R R R R R R R R R
data.max_seq_length            R R R R R R R R R R R R R R R
data.valid_fraction            R A R R R R R R R R R R R R R
data.on_error                  R R R R R R R R R R R R R R R
data.log_sample_ids            R R R R R R R R R R A R R R R
data.num_workers               R A R R R R R R R R R R R R R
data.streams                   R R R R R R R R R R R R R R R
data.block_docs                R R R R R R R R R R R R R R R
data.min_chars                 R A R R R R R R R R R R R R R
data.max_chars                 R A R R R R R R R R R R R R R
data.max_record_bytes          R R R R R R R R R R R R R R R
data.volatile                  R R R R R R R R R R R R R R R
data.num_samples               R A R R R R R R R R R R R R R
data.max_records_per_file      R A R R R R R R R R R R R R R
data.dedupe                    R R R R R R R R R R A R R R R
data.max_tokens                R A R R R R R R R R R R R R R
data.valid_max_docs            R A R R R R R R R R R R R R R
data.tokenizer_docs            R R R R R R R R R R R R R R R
masking.rate                   R R R R R R R R R R R R R R R
masking.eval_rate              R R R R R R R R R A R R R R R
masking.mask_prob              R A R R R R R R R R R R R R R
masking.random_prob            R A R R R R R R R R R R R R R
masking.mask_token_id          R A R R R R R R R A R R R R R
masking.whole_word             R R R R R R R R R R A R R R R
train.max_steps                R A R R R R R R R R R R R R R
train.epochs                   R R R A R R R R R R R A R R R
train.micro_batch_size         R R R R R R R R R R R R R R R
train.grad_accum               R R R R R R R R R R R R R R R
train.lr                       R R R A R R R R R R R A R R R
train.weight_decay             R A R A R R R R R R R A R R R
train.betas                    R R R R R R R R R R R R R R R
train.eps                      R R R A R R R R R R R A R R R
train.grad_clip                R A R A R R R R R R R A R R R
train.lr_schedule              R R R R R R R R R R R R R R R
train.rebuild_schedule         R R R R R R R R R R A R R R R
train.warmup_steps             R A R R R R R R R R R R R R R
train.warmup_ratio             R A R R R R R R R R R R R R R
train.decay_ratio              R A R R R R R R R R R R R R R
train.min_lr_ratio             R A R R R R R R R R R R R R R
train.precision                R R R R R R R R R R R R R A R
train.optimizer_impl           R R R R R R R R R R R R R A R
train.eval_every               R A R R R R R R R R R R R R R
train.eval_batches             R A R R R R R R R R R R R R R
train.log_every                R R R R R R R R R R R R R R R
train.compile                  R R R R R R R R R R R R R R R
train.sparse_prediction        R R R R R R R R R R A R R R R
checkpoint.every               R A R R R R R R R R R R R R R
checkpoint.keep                R R R R R R R R R R R R R R R
checkpoint.keep_best           R R R R R R R R R R A R R R R
checkpoint.disk_check          R R R R R R R R R R R R R R R
checkpoint.export              R R R R R R R R R R R R R R R
numerics.max_skipped_steps     R A R R R R R R R R R R R R R
numerics.spike_factor          R A R A R R R R R R R A R R R
numerics.spike_steps           R R R R R R R R R R R R R R R
numerics.spike_window          R R R R R R R R R R R R R R R
numerics.spike_action          R R R R R R R R R R R R R R R
profile.warmup                 R A R R R R R R R R R R R R R
profile.steps                  R R R R R R R R R R R R R R R
profile.trace                  R R R R R R R R R R A R R R R
profile.ds_flops_profiler      R R R R R R R R R R A R R R R
profile.peak_tflops            R A R A R R R R R R R A R R R
plan.gpu                       R R R R R R R R R R R R R R R
plan.gpus                      R R R R R R R R R R R R R R R
plan.micro_batches             R R R R R R R R R R R R R R R
plan.min_micro_batch           R R R R R R R R R R R R R R R
plan.headroom                  R R R R R R R R R R R R R R R
plan.write_ds                  A A A A A A A R R R R A A A A
plan.measure                   R R R R R R R R R R A R R R R
plan.measure_tokens            R R R R R R R R R R R R R R R
plan.mfu                       R R R R R R R R R R R R R R R
plan.tokens                    R A R R R R R R R R R R R R R
plan.chars_per_token           R R R A R R R R R R R A R R R
fill.text                      A A A A A A A A R R R A A A A
fill.top_k                     R R R R R R R R R R R R R R R
fill.placeholder               A A A A R A A R R R R A A A A
cluster.nodes                  R R R R R R R R R R R R R R R
cluster.gpus_per_node          R R R R R R R R R R R R R R R
cluster.gpu                    R R R R A R R R R R R R R R R
cluster.hostfile               A A A A A A A R R R R A A A A
cluster.master_addr            A A A A A A A R R R R A A A A
cluster.master_port            R R R R R R R R R R R R R R R
cluster.env                    R R R R R A R R R R R R A A A
submit.scheduler               R R R R R R R R R R R R R R R
submit.entry                   A A A A A A A R R R R A A A A
submit.job_name                A A A A R A A R R R R A A A A
submit.partition               A A A A A A A R R R R A A A A
submit.account                 A A A A A A A R R R R A A A A
submit.time                    A A A A A A A R R R R A A A A
submit.cpus_per_node           R A R R R R R R R R R R R R R
submit.instance                A A A A A A A R R R R A A A A
submit.cloud                   A A A A A A A R R R R A A A A
submit.use_spot                R R R R R R R R R R A R R R R
submit.workdir                 A A A A A A A R R R R A A A A
submit.venv                    A A A A A A A R R R R A A A A
submit.out                     A A A A A A A R R R R A A A A
submit.dry_run                 R R R R R R R R R R A R R R R
log.wandb                      R R R R R R R R R R A R R R R
log.wandb_project              A A A A A A A R R R R A A A A
log.run_name                   A A A A A A A R R A R A A A A
log.progress                   R R R R R R R R R R A R R R R
log.plots                      R R R R R R R R R R A R R R R
log.level                      R R R R R R R R R R R R R R R
log.all_ranks                  R R R R R R R R R R A R R R R
log.tensorboard                R R R R R R R R R R A R R R R
hub.push                       R R R R R R R R R R R R R R R
hub.model_id                   A A A A A A A R R R R A A A A
hub.private                    R R R R R R R R R R A R R R R
hub.token_env                  A A A A A A A R R R R A A A A
classify.label_field           A A A A A A A R R R R A A A A
classify.label_files           R R R R R R R R A R R R R R R
classify.label_map             R R R R R R R R A R R R R R R
classify.labels                A A A A A A A A R R R A A A A
classify.unseen                R R R R R R R R R R R R R R R
classify.class_weights         R R R A R R R R R R R A R R R
classify.label_smoothing       R A R R R R R R R R R R R R R
classify.head_lr_mult          R R R A R R R R R R R A R R R
classify.metric                R R R R R R R R R R R R R R R
classify.patience              R A R R R R R R R R R R R R R
classify.collapse_warn         R A R R R R R R R R R R R R R
classify.collapse_stop         R R R R R R R R R R A R R R R
classify.seeds                 R A R R R R R R R R R R R R R
embed.pooling                  R R R R R R R R R R R R R R R
embed.normal_label             A A A A A A A R R R R A A A A
embed.max_fpr                  R R R R R R R R R R R R R R R
embed.calibration              R R R R R R R R R R R R R R R
embed.confidence               R R R R R R R R R R R R R R R
embed.shrinkage                R A R R R R R R R R R R R R R
embed.score                    R R R R R R R R R R R R R R R
embed.mask_patterns            R R R R R R R R R R R R R R R
embed.mask_rate                R R R R R R R R R R R R R R R
embed.token_score              R R R R R R R R R R R R R A R
embed.token_surprise           R R R R R R R R R R R R R A R
embed.top_k                    R R R R R R R R R R R R R R R
embed.knn_k                    R R R R R R R R R R R R R R R
embed.fuse                     R R R R R R R R R R R R R R R
embed.fuse_rule                R R R R R R R R R R R R R A R
embed.ngram                    R R R R R R R R R R R R R R R
embed.ngram_digits             R R R R R R R R R R A R R R R
embed.valid_from_test          R A R R R R R R R R R R R R R
embed.sample                   R A R R R R R R R R R R R R R
embed.report_top               R R R R R R R R R R R R R R R
ablation.base                  A A A A A A A R R R R A A A A
ablation.dapt_recipe           A A A A A A A R R R R A A A A
ablation.tapt_recipe           A A A A A A A R R R R A A A A
ablation.eval_recipe           A A A A A A A R R R R A A A A
ablation.protocol              R R R R R R R R R R R R R R R
ablation.score                 R R R R A R R R R R R R R R R
ablation.overrides             A A A A A A A A R R R A A A A
output_dir                     A A A A R A A R R R R A A A A
seed                           R A R R R R R R R R R R R R R
resume                         R R R R R R R R R R R R R A R
ds                             R R R R R R R R R A R R R R R
"""
EXPECTED = {line.split()[0]: line.split()[1:] for line in VERDICTS.strip().splitlines()}


def _fields() -> list[str]:
    keys = []
    for section, cls in _sections().items():
        keys += [f"{section}.{f.name}" for f in dataclasses.fields(cls)]
    hints = typing.get_type_hints(RunConfig)
    return keys + [
        f.name
        for f in dataclasses.fields(RunConfig)
        if not f.metadata.get("internal") and f.name not in _sections() and hints[f.name]
    ]


def _recipe(tmp_path, corpus_file, changes: dict, name: str = "recipe.yaml"):
    doc = {
        "model": {"config": dict(TINY_MODEL), "tokenizer_vocab_size": 400},
        "data": {"train": [str(corpus_file)], "max_seq_length": 32},
        "train": {"max_steps": 4},
    }
    for key, value in changes.items():
        *path, last = key.split(".")
        node = doc
        for part in path:
            node = node.setdefault(part, {})
        node[last] = value
    path = tmp_path / name
    path.write_text(yaml.safe_dump(doc))
    return path


def test_every_field_has_expected_verdicts():
    assert sorted(EXPECTED) == sorted(_fields()), "a new config field needs its row in VERDICTS"
    assert all(len(v) == len(NASTY) and set(v) <= {"A", "R"} for v in EXPECTED.values())


@pytest.mark.parametrize("key", _fields())
def test_every_field_with_nasty_values_gets_its_expected_verdict(key, tmp_path, corpus_file):
    for i, (value, verdict) in enumerate(zip(NASTY, EXPECTED[key])):
        path = _recipe(tmp_path, corpus_file, {key: value}, f"r{i}.yaml")
        argv = ["--recipe", str(path)] + (
            [] if key == "output_dir" else ["--output_dir", str(tmp_path / "out")]
        )
        if verdict == "A":
            load_config(argv, world_size=2, accelerator="cpu")  # a wrong rejection raises here
        else:
            with pytest.raises(ConfigError) as e:
                load_config(argv, world_size=2, accelerator="cpu")
            assert key.split(".")[-1] in str(e.value), (key, value, str(e.value))
        # anything else (TypeError, KeyError, ValueError, ...) escapes and fails the test
        assert not (tmp_path / "out").exists()


def test_every_float_field_refuses_nan_and_infinities(tmp_path, corpus_file):
    floats = [k for k in _fields() if _annotation(k) in (float, float | None, list[float])]
    assert len(floats) > 15
    for key in floats:
        for bad in (float("nan"), float("inf"), float("-inf"), "nan", "-inf"):
            value = [bad] if _annotation(key) == list[float] else bad
            with pytest.raises(ConfigError, match=f"{key.split('.')[-1]}.*expected a finite number"):
                load_config(
                    [
                        "--recipe",
                        str(_recipe(tmp_path, corpus_file, {key: value})),
                        "--output_dir",
                        str(tmp_path / "out"),
                    ],
                    world_size=1,
                    accelerator="cpu",
                )


def _annotation(key: str):
    section, _, name = key.rpartition(".")
    cls = _sections()[section] if section else RunConfig
    return typing.get_type_hints(cls)[name]


# (recipe changes, ds config changes, a fragment each problem must show)
MUTATIONS = [
    ({"train.micro_batch_size": -4}, {}, "train.micro_batch_size"),
    ({"train.grad_accum": "two"}, {}, "train.grad_accum"),
    ({"train.lr": -1e-3}, {}, "train.lr"),
    ({"data.max_seq_length": 0}, {}, "data.max_seq_length"),
    ({"data.streams": 3}, {}, "data.streams"),  # not a multiple of 2 ranks
    ({"checkpoint.keep": 0}, {}, "checkpoint.keep"),
    ({"numerics.spike_factor": 0.5}, {}, "numerics.spike_factor"),
    ({"masking.rate": 1.5}, {}, "masking.rate"),
    ({"train.warmup_ratio": 2}, {}, "warmup_ratio"),
    ({"data.packing": "zip"}, {}, "data.packing"),
    ({"train.betas": [0.9]}, {}, "train.betas"),
    ({"trian.lr": 1}, {}, "trian"),
    ({}, {"train_batch_size": 17}, "train_batch_size"),  # 17 rows do not divide over micro 8 x 2 ranks
    ({"train.micro_batch_size": 8}, {"train_micro_batch_size_per_gpu": 4}, "train_micro_batch_size_per_gpu"),
    ({"train.precision": "fp32"}, {"bf16": {"enabled": True}}, "bf16"),
    ({}, {"fp16": {"enabled": True}, "bf16": {"enabled": True}}, "fp16"),
    ({}, {"zero_optimization": {"stage": 7}}, "stage"),
    ({}, {"gradient_clipping": "lots"}, "gradient_clipping"),
]


@pytest.mark.parametrize("seed", range(40))
def test_random_mixes_of_problems_are_all_reported_at_once(seed, tmp_path, corpus_file):
    rng = random.Random(seed)
    chosen = rng.sample(MUTATIONS, rng.randint(2, 5))
    recipe, ds = {}, json.loads((DS / "zero2_bf16.json").read_text())
    for changes, ds_changes, _ in chosen:
        recipe |= changes
        ds |= ds_changes
    ds_path = tmp_path / "ds.json"
    ds_path.write_text(json.dumps(ds))
    with pytest.raises(ConfigError) as e:
        load_config(
            [
                "--recipe",
                str(_recipe(tmp_path, corpus_file, recipe)),
                "--ds",
                str(ds_path),
                "--output_dir",
                str(tmp_path / "out"),
            ],
            world_size=2,
            accelerator="cpu",
        )
    for _, _, fragment in chosen:
        assert fragment in str(e.value), (fragment, [c[2] for c in chosen], str(e.value))
    assert not (tmp_path / "out").exists()


def test_two_ranks_under_the_launcher_stop_before_starting(tmp_path, corpus_file):
    recipe = _recipe(
        tmp_path,
        corpus_file,
        {"train.micro_batch_size": -4, "data.streams": 3, "trian.lr": 1, "numerics.spike_action": "panic"},
    )
    out = tmp_path / "never"
    proc = launch(["--recipe", recipe, "--output_dir", out], ranks=2, check=False)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 2, text[-3000:]
    for fragment in ("train.micro_batch_size", "data.streams", "'trian'", "numerics.spike_action"):
        assert text.count(fragment) >= 1, fragment
    assert text.count("invalid configuration") == 1  # said once, by rank 0
    assert (
        "Traceback" not in text and "rank0]" not in text and not out.exists()
    )  # no rank got to log anything


def test_a_yaml_alias_bomb_is_refused_at_once(tmp_path):
    """Nine lines of anchors and aliases stand for about a billion values: refused from the count, not expanded."""
    lines = ['a0: &a0 ["x","x","x","x","x","x","x","x","x"]']
    lines += [f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9)]
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(lines) + "\ndata:\n  train: *a8\n")
    with pytest.raises(ConfigError, match=r"expands to 9.26e\+08 values through YAML aliases"):
        load_config(["--recipe", str(bomb)], world_size=1, accelerator="cpu")
    # the same on the command line: one flow sequence whose anchors nest ten-fold, six deep
    levels = ["&a0 [" + ",".join(["x"] * 10) + "]"]
    levels += [f"&a{i} [" + ",".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 6)]
    with pytest.raises(ConfigError, match="--data.train: expands to more than"):
        load_config(["--data.train", "[" + ", ".join(levels) + "]"], world_size=1, accelerator="cpu")


def test_a_malformed_yaml_override_is_a_config_error():
    with pytest.raises(ConfigError, match=r"--train.betas: not a valid value"):
        load_config(["--train.betas", "[0.9, 0.98"], world_size=1, accelerator="cpu")
