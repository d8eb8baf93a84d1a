"""Turn command-line arguments into a RunConfig: the YAML recipe (or the embedded default), --section.field=value
overrides, accelerate launch's settings and the DeepSpeed JSON, parsed, merged and coerced into the dataclasses.

The checks are not here: each section's rules sit beside its fields in dapt.config.schema, and those that need the
files, the hub, the output folder, a resume or DeepSpeed in dapt.cli.check. load_config runs both and raises every
problem at once, as one ConfigError, before any process group exists."""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from pathlib import Path
from typing import Any

import torch
import yaml

from dapt.cli.check import check
from dapt.config import shipped
from dapt.config.accelerate import accelerate_settings
from dapt.config.dsconfig import resolve_ds_config
from dapt.config.schema import ConfigError, RunConfig, freeze, section_problems, tool_of, type_name
from dapt.data.corpus import DEFAULT_OVERRIDES
from dapt.data.prepare import adopt_text_settings
from dapt.runtime import folder


class _Loader(yaml.SafeLoader):
    """YAML with 1.2's booleans: only true/false. YAML 1.1 also reads on/off/yes/no/y/n as booleans, which would turn
    --checkpoint.disk_check=off or --train.compile=off into False."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, pattern) for tag, pattern in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def read_yaml_value(text: str):
    return yaml.load(text, Loader=_Loader)


def split_options(argv: list[str]) -> list[tuple[str | None, str, list[str]]]:
    """(key, value, tokens) per option: `--k=v`, `--k v`, a bare `--flag` (value "true"); key "help" for -h/--help,
    None for a stray argument."""
    groups, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            groups.append(("help", "", [arg]))
        elif not arg.startswith("--"):
            groups.append((None, arg, [arg]))
        else:
            key, sep, value = arg[2:].partition("=")
            if not sep and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                value = argv[i + 1]
                groups.append((key, value, argv[i : i + 2]))
                i += 1
            else:
                groups.append(
                    (key, value if sep else "true", [arg])
                )  # "true": a bare flag such as --log.wandb
        i += 1
    return groups


def parse_argv(argv: list[str]) -> tuple[str | None, dict[str, Any], bool]:
    """Split argv into (recipe path, dotted overrides, help asked). Accepts `--k=v` and `--k v`."""
    recipe, overrides, want_help, problems = None, {}, False, []
    for key, value, _ in split_options(argv):
        if key == "help":
            want_help = True
            continue
        if key is None:
            problems.append(f"unexpected argument {value!r}: options look like --section.field=value")
            continue
        if key == "local_rank":  # the DeepSpeed launcher appends it; LOCAL_RANK carries the same
            continue
        if key == "recipe":
            recipe = value
        else:
            try:
                overrides[key] = read_yaml_value(value) if value != "" else ""
            except yaml.YAMLError as e:
                problems.append(f"--{key}: not a valid value ({getattr(e, 'problem', e)})")
                continue
            if expanded_size(overrides[key]) > MAX_CONFIG_VALUES:
                problems.append(
                    f"--{key}: expands to more than {MAX_CONFIG_VALUES} values through YAML aliases"
                )
                overrides.pop(key)
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
        finite = [e for e in errs if "expected a finite number" in e]
        problems.append(finite[0] if finite else f"{key}: expected {type_name(typ)}, got {value!r}")
        return value
    if origin is list:
        items = (
            value if isinstance(value, list) else ([value] if isinstance(value, str | int | float) else None)
        )
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
        number = None
        if isinstance(value, int | float) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None and math.isfinite(number):
            return number
        if number is not None:  # NaN passes every `x <= 0` check; infinities are no setting either
            problems.append(f"{key}: expected a finite number, got {value!r}")
            return value
    elif typ is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
    elif typ is dict:
        if isinstance(value, dict):
            return value
    problems.append(f"{key}: expected {type_name(typ)}, got {value!r} ({type(value).__name__})")
    return value


def _build(cls: type, values: dict, prefix: str, problems: list[str], explicit: set) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if not f.metadata.get("internal")]
    kwargs = {}
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            problems.append(
                f"unknown key {dotted!r}; valid keys{' in ' + prefix[:-1] if prefix else ''}: "
                + ", ".join(names)
            )
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


def load_config(
    argv: list[str], world_size: int | None = None, accelerator: str | None = None, prog: str | None = None
) -> RunConfig:
    """Build the validated config tree from command-line arguments.

    Args:
        argv: arguments after the program name (`--recipe`, `--ds`, `--section.field=value`).
        world_size: number of ranks; default: $WORLD_SIZE or 1.
        accelerator: "cuda" or "cpu"; default: what torch sees.
        prog: the entry script ("launch/classify.py"): command-line keys of sections it does not read are refused.

    Raises:
        ConfigError: listing every problem found.
    """
    cfg, problems = collect_config(argv, world_size, accelerator, prog=prog)
    if problems:
        raise ConfigError(problems)
    return freeze(cfg)  # a run reads its config, never changes it


def collect_config(
    argv: list[str],
    world_size: int | None = None,
    accelerator: str | None = None,
    check_files: bool = True,
    prog: str | None = None,
    task: str | None = None,
) -> tuple[RunConfig, list[str]]:
    """The config tree and every problem found in it, without raising for them (launch/doctor.py reports each;
    launch/submit.py checks a run for other machines, where data files need not exist here: check_files=False).

    Raises:
        ConfigError: for command-line arguments that cannot be parsed at all.
    """
    world = world_size or int(os.environ.get("WORLD_SIZE", "1"))
    cfg, problems = read_config(argv, world, accelerator, prog, task)
    check(cfg, world, problems, check_files)
    return cfg, list(dict.fromkeys(problems))


def read_config(
    argv: list[str], world: int, accelerator: str | None, prog: str | None, task: str | None
) -> tuple[RunConfig, list[str]]:
    """Parse and merge, checking nothing but what cannot be read: the recipe (or the embedded default), the command
    line, accelerate launch's settings and the DeepSpeed JSON, coerced into the config tree; with the problems of
    reading them.

    Raises:
        ConfigError: for command-line arguments that cannot be parsed at all, or a recipe that cannot be read.
    """
    recipe, overrides, _ = parse_argv(argv)
    _refuse_ds_section(overrides)
    added, ds_set, launch_notes, problems = accelerate_settings(dict(os.environ), overrides)
    problems += section_problems(list(overrides), tool_of(prog or ""), prog or "")
    if "ds" in added:
        overrides = {**overrides, "ds": added.pop("ds")}
    task = task or task_of(prog)  # task: launch/doctor.py checks the run of the script it names
    if recipe:
        values = _recipe_values(recipe, overrides, problems)
    else:
        values = embedded_default(overrides, task)
    notes = _epochs_over_steps(values, overrides, recipe)
    values = _merge(values, _nest(overrides))
    explicit: set[str] = set()
    cfg = _build(RunConfig, values, "", problems, explicit)
    cfg.explicit, cfg.notes, cfg.ds_set, cfg.task = explicit, launch_notes + notes, ds_set, task
    if "output_dir" not in explicit:
        cfg.output_dir = folder.default_output_dir(cfg.task)
    cfg.notes += _format_from_extensions(cfg)
    if (
        cfg.task == "predict"
    ):  # the trained model's text settings, where the recipe and command line say nothing
        cfg.notes += adopt_text_settings(cfg)
    problems += _adopt_launcher_settings(cfg, added)
    cfg.ds_config = resolve_ds_config(cfg, world, accelerator or _accelerator(), problems)
    return cfg, problems


def _refuse_ds_section(overrides: dict[str, Any]) -> None:
    keys = [k for k in overrides if k.startswith("ds.")]
    if keys:
        raise ConfigError(
            [
                f"--{keys[0]}: the DeepSpeed config is a file, not a section: --ds zero2_bf16 (a shipped one: "
                + ", ".join(shipped.names("ds_configs"))
                + ") or --ds PATH.json; the ZeRO stage, precision and offload are set there"
            ]
        )


def _recipe_values(recipe: str, overrides: dict[str, Any], problems: list[str]) -> dict:
    values = _read_yaml(recipe, problems)
    if problems:  # nothing else can be judged without the recipe (its model, its data)
        raise ConfigError(problems)
    model = values.get("model")
    if "model.name_or_path" in overrides and isinstance(model, dict) and "model.config" not in overrides:
        # the command line beats the recipe: a pretrained model replaces the recipe's from-scratch config
        values["model"] = {k: v for k, v in model.items() if k not in ("config", "tokenizer_vocab_size")}
    return values


def task_of(prog: str | None) -> str | None:
    """The entry script's name: "launch/classify.py" and "dapt classify" -> "classify"; None without one."""
    return Path(prog.split()[-1]).stem if prog and prog.strip() else None


EXTENSIONS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "json", ".parquet": "parquet"}


def _format_from_extensions(cfg: RunConfig) -> list[str]:
    """data.format from the data files' extension when the recipe and command line leave it unset and every file
    named agrees (a CSV given as data.train is read as CSV, not as lines of text); returns the note to log."""
    d = cfg.data
    files = [*d.train, *d.valid, *d.test]
    if "data.format" in cfg.explicit or not files:
        return []
    found = set()
    for name in files:
        suffixes = [x for x in Path(str(name)).suffixes if x not in (".gz", ".zst", ".bz2", ".xz")]
        found.add(EXTENSIONS.get(suffixes[-1].lower()) if suffixes else None)
    if len(found) != 1 or None in found:
        return []
    d.format = found.pop()
    return [
        f"data.format={d.format}: from the data files' extension (set data.format to read them otherwise)"
    ]


def _adopt_launcher_settings(cfg: RunConfig, settings: dict[str, Any]) -> list[str]:
    """accelerate launch's settings (precision, accumulation, clipping) where the recipe and the command line say
    nothing; where they say something else, a contradiction."""
    problems = []
    for key, value in settings.items():
        section, name = key.split(".")
        mine = getattr(getattr(cfg, section), name)
        if key in cfg.explicit and mine != value and not (key == "train.precision" and mine == "auto"):
            problems.append(
                f"contradiction: {key} = {mine!r} in the recipe or command line, but accelerate launch "
                f"says {value!r}; make them agree"
            )
        else:
            setattr(getattr(cfg, section), name, value)
            cfg.explicit.add(key)
    return problems


def _epochs_over_steps(values: dict, overrides: dict[str, Any], recipe: str | None) -> list[str]:
    """--train.epochs on the command line beats the recipe's (or the embedded default's) train.max_steps, which would
    otherwise win silently (max_steps > 0 decides the length)."""
    train = values.get("train")
    if (
        "train.epochs" not in overrides
        or "train.max_steps" in overrides
        or not isinstance(train, dict)
        or not train.get("max_steps")
    ):
        return []
    values["train"] = {k: v for k, v in train.items() if k != "max_steps"}
    return [
        f"--train.epochs={overrides['train.epochs']} replaces the train.max_steps={train['max_steps']} of "
        f"{recipe or 'the embedded default'}: the run's length is counted in epochs"
    ]


def embedded_default(overrides: dict[str, Any], task: str | None = None) -> dict:
    """The recipe used without --recipe. launch/mlm.py: a tiny BERT from scratch on the corpus dapt generates
    (dapt.data.corpus.DEFAULT_OVERRIDES: 300 steps of 64-token rows, the README's first command). The other scripts
    get only its model, so a classifier given nothing but its data builds that tiny BERT and keeps the schema's own
    data and training defaults (128-token rows, not the demo's 64). Naming a pretrained model drops the model fields.
    """
    chosen = dict(DEFAULT_OVERRIDES)
    if task not in (None, "mlm"):
        chosen = {k: v for k, v in chosen.items() if k == "model.config"}
    if "model.name_or_path" in overrides or "model.config" in overrides:
        chosen = {k: v for k, v in chosen.items() if not k.startswith("model.")}
    return _nest(chosen)


def _accelerator() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _read_yaml(path: str, problems: list[str]) -> dict:

    path = str(shipped.resolve("recipes", path) or path)  # a shipped recipe, from any folder
    try:
        text = Path(path).read_text()
    except OSError as e:
        problems.append(
            f"recipe {path}: cannot read ({e.strerror}); the shipped recipes: {', '.join(shipped.names('recipes'))}"
        )
        return {}
    try:
        data = read_yaml_value(text) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problems.append(f"recipe {path}{where}: not valid YAML ({getattr(e, 'problem', e)})")
        return {}
    if not isinstance(data, dict):
        problems.append(
            f"recipe {path}: the top level must be a mapping of sections, got {type(data).__name__}"
        )
        return {}
    size = expanded_size(data)
    if size > MAX_CONFIG_VALUES:
        problems.append(
            f"recipe {path}: expands to {size:.3g} values through YAML aliases (&anchor / *alias), more "
            f"than the {MAX_CONFIG_VALUES} a config can hold; refusing to read it"
        )
        return {}
    return data


MAX_CONFIG_VALUES = 100_000


def expanded_size(obj, memo: dict[int, int] | None = None) -> int:
    """How many values `obj` holds once YAML aliases are expanded, counted without expanding them: each shared
    list or mapping is sized once (an alias bomb of a few lines stands for billions of values)."""
    memo = {} if memo is None else memo
    if not isinstance(obj, dict | list):
        return 1
    if id(obj) not in memo:
        memo[id(obj)] = 0  # a self-referencing structure counts as small here; the type checks reject it
        children = obj.values() if isinstance(obj, dict) else obj
        memo[id(obj)] = 1 + sum(expanded_size(child, memo) for child in children)
    return memo[id(obj)]
