"""Config fuzz: wrong types, out-of-range and negative sizes, batch sizes that do not divide, contradictory
DeepSpeed configs. Whatever the mix, loading either succeeds or raises one ConfigError that names every broken key,
before any process group or output exists; under the DeepSpeed launcher every rank exits 2 and nothing starts."""

from __future__ import annotations

import dataclasses
import json
import random
import typing

import pytest
import yaml
from conftest import DS, TINY_MODEL, launch

from dapt.config import ConfigError, RunConfig, _sections
from dapt.load import load_config

NASTY = [-1, 0, -7.5, 3.5, "", "x", "-3", [1, "a"], {"a": 1}, None, True, 1e30, float("nan"), "auto"]


def _fields() -> list[str]:
    keys = []
    for section, cls in _sections().items():
        keys += [f"{section}.{f.name}" for f in dataclasses.fields(cls)]
    hints = typing.get_type_hints(RunConfig)
    return keys + [f.name for f in dataclasses.fields(RunConfig)
                   if not f.metadata.get("internal") and f.name not in _sections() and hints[f.name]]


def _recipe(tmp_path, corpus_file, changes: dict, name: str = "recipe.yaml"):
    doc = {"model": {"config": dict(TINY_MODEL), "tokenizer_vocab_size": 400},
           "data": {"train": [str(corpus_file)], "max_seq_length": 32}, "train": {"max_steps": 4}}
    for key, value in changes.items():
        *path, last = key.split(".")
        node = doc
        for part in path:
            node = node.setdefault(part, {})
        node[last] = value
    path = tmp_path / name
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.mark.parametrize("key", _fields())
def test_every_field_with_nasty_values_loads_or_names_itself(key, tmp_path, corpus_file):
    for i, value in enumerate(NASTY):
        path = _recipe(tmp_path, corpus_file, {key: value}, f"r{i}.yaml")
        try:
            load_config(["--recipe", str(path), "--output_dir", str(tmp_path / "out")], world_size=2,
                        accelerator="cpu")
        except ConfigError as e:
            assert key.split(".")[-1] in str(e), (key, value, str(e))
        # anything else (TypeError, KeyError, ValueError, ...) escapes and fails the test
        assert not (tmp_path / "out").exists()


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
        load_config(["--recipe", str(_recipe(tmp_path, corpus_file, recipe)), "--ds", str(ds_path),
                     "--output_dir", str(tmp_path / "out")], world_size=2, accelerator="cpu")
    for _, _, fragment in chosen:
        assert fragment in str(e.value), (fragment, [c[2] for c in chosen], str(e.value))
    assert not (tmp_path / "out").exists()


def test_two_ranks_under_the_launcher_stop_before_starting(tmp_path, corpus_file):
    recipe = _recipe(tmp_path, corpus_file, {"train.micro_batch_size": -4, "data.streams": 3, "trian.lr": 1,
                                             "numerics.spike_action": "panic"})
    out = tmp_path / "never"
    proc = launch(["--recipe", recipe, "--output_dir", out], ranks=2, check=False)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 2, text[-3000:]
    for fragment in ("train.micro_batch_size", "data.streams", "'trian'", "numerics.spike_action"):
        assert text.count(fragment) >= 1, fragment
    assert text.count("invalid configuration") == 1  # said once, by rank 0
    assert "Traceback" not in text and "rank0]" not in text and not out.exists()  # no rank got to log anything


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
