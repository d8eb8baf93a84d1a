"""Turn command-line arguments into a validated RunConfig: YAML recipe, --section.field=value overrides, the
DeepSpeed JSON. Every problem is collected and raised once, as a ConfigError, before any process group exists."""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from dapt.config import shipped
from dapt.config.schema import CHOICES, NOT_YET, ConfigError, RunConfig, section_problems, tool_of, type_name
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
    return cfg


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
    recipe, overrides, _ = parse_argv(argv)
    if any(key.startswith("ds.") for key in overrides):
        raise ConfigError(
            [
                f"--{next(k for k in overrides if k.startswith('ds.'))}: the DeepSpeed config is a file, not a section: "
                "--ds zero2_bf16 (a shipped one: "
                + ", ".join(shipped.names("ds_configs"))
                + ") or --ds PATH.json; "
                "the ZeRO stage, precision and offload are set there"
            ]
        )
    from dapt.config.accelerate import accelerate_settings

    added, ds_set, launch_notes, problems = accelerate_settings(dict(os.environ), overrides)
    problems += section_problems(list(overrides), tool_of(prog or ""), prog or "")
    if "ds" in added:
        overrides = {**overrides, "ds": added.pop("ds")}
    if recipe:
        values = _read_yaml(recipe, problems)
        if problems:  # nothing else can be judged without the recipe (its model, its data)
            raise ConfigError(problems)
        model = values.get("model")
        if "model.name_or_path" in overrides and isinstance(model, dict) and "model.config" not in overrides:
            # the command line beats the recipe: a pretrained model replaces the recipe's from-scratch config
            values["model"] = {k: v for k, v in model.items() if k not in ("config", "tokenizer_vocab_size")}
    else:
        values = embedded_default(overrides, task or task_of(prog))
    notes = _epochs_over_steps(values, overrides, recipe)
    values = _merge(values, _nest(overrides))
    explicit: set[str] = set()
    cfg = _build(RunConfig, values, "", problems, explicit)
    cfg.explicit, cfg.notes, cfg.ds_set = explicit, launch_notes + notes, ds_set
    cfg.task = task or task_of(prog)  # task: launch/doctor.py checks the run of the script it names
    if "output_dir" not in explicit:
        cfg.output_dir = folder.default_output_dir(cfg.task)
    cfg.notes += _format_from_extensions(cfg)
    if cfg.task == "predict":
        problems += _predict_problems(cfg)
    problems += _adopt_launcher_settings(cfg, added)
    from dapt.config.dsconfig import check_with_deepspeed, resolve_ds_config
    from dapt.runtime import elastic

    world = world_size or int(os.environ.get("WORLD_SIZE", "1"))
    cfg.ds_config = resolve_ds_config(cfg, world, accelerator or _accelerator(), problems)
    problems += folder.problems(
        cfg, cfg.task
    )  # another task's run, or another configuration's, in output_dir
    if cfg.task in (None, *RESUMES) and not problems:
        cfg.notes += elastic.plan(cfg, world, problems)  # a resume on another world size or ZeRO stage
        problems += _continuation_problems(cfg)
    if cfg.data.streams % world:
        problems.append(
            f"data.streams: {cfg.data.streams} is not a multiple of the world size {world} (each rank "
            f"reads its own streams); set --data.streams={world * -(-cfg.data.streams // world)} or "
            "another multiple of every world size the run will resume on"
        )
    for problem in validate(cfg, check_files):
        key = problem.split(":", 1)[0]
        problems.append(
            f"{problem} (value taken from ds {cfg.adopted[key]})" if key in cfg.adopted else problem
        )
    if cfg.ds_config:
        check_with_deepspeed(cfg.ds_config, problems)
    return cfg, list(dict.fromkeys(problems))


# The entry scripts that resume from output_dir's checkpoints (the others only write results there, or nothing)
RESUMES = ("mlm", "classify")


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


def _continuation_problems(cfg: RunConfig) -> list[str]:
    """A resume with another train.max_steps whose learning rate would jump: refused now, before any rank starts (with
    train.epochs the run itself checks, once the data is counted)."""
    from dapt.runtime import elastic
    from dapt.runtime.runner import continuation
    from dapt.runtime.schedule import schedule_of

    point = elastic.resume_candidate(cfg)
    if cfg.resume != "auto" or not cfg.train.max_steps or point is None or "scheduler" in cfg.ds_config:
        return []  # a named checkpoint is verified first, by the run (which checks this then)
    if not (point / "manifest.json").is_file():
        return []  # a damaged latest: the run falls back to an older one, or says none is complete
    problem = continuation(cfg, point, schedule_of(cfg.train, cfg.train.max_steps))
    return [problem] if problem else []


def _predict_problems(cfg: RunConfig) -> list[str]:
    """launch/predict.py: a trained model and the files to predict; the model's training text settings adopted."""
    from dapt.data.prepare import adopt_text_settings

    p = []
    if not cfg.model.name_or_path:
        p.append("model.name_or_path: the trained model to predict with (a dapt run's final/, or a hub id)")
    if not cfg.data.test:
        p.append(
            "data.test: the files to predict (any format dapt reads; with the label field, also evaluated)"
        )
    cfg.notes += adopt_text_settings(cfg)
    return p


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
    from dapt.data.corpus import DEFAULT_OVERRIDES

    chosen = dict(DEFAULT_OVERRIDES)
    if task not in (None, "mlm"):
        chosen = {k: v for k, v in chosen.items() if k == "model.config"}
    if "model.name_or_path" in overrides or "model.config" in overrides:
        chosen = {k: v for k, v in chosen.items() if not k.startswith("model.")}
    return _nest(chosen)


def _accelerator() -> str:
    import torch

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


def validate(cfg: RunConfig, check_files: bool = True) -> list[str]:
    """Value and cross-field checks, each section by its own function; returns every problem found at once.
    check_files=False: data files may exist only on the machines the run is for."""
    from dapt.runtime.hosts import cluster_problems

    problems = _check_choices(cfg) + _check_run(cfg) + _check_log(cfg)
    problems += _check_model(cfg, check_files) + _check_data(cfg, check_files)
    for check in (
        _check_embed,
        _check_classify,
        _check_masking,
        _check_train,
        _check_checkpoint,
        _check_profile,
        _check_plan,
        _check_fill,
        _check_numerics,
    ):
        problems += check(cfg)
    problems += _check_hub(cfg, check_files)
    return problems + cluster_problems(cfg)


def _check_choices(cfg: RunConfig) -> list[str]:
    p = []
    for key, allowed in CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if isinstance(value, list):  # a list field: each entry is one of the choices
            p += [f"{key}: {v!r} is not one of {', '.join(allowed)}" for v in value if v not in allowed]
        elif value not in allowed:
            p.append(f"{key}: {value!r} is not one of {', '.join(allowed)}")
        elif value in NOT_YET.get(key, ()):
            p.append(
                f"{key}: {value!r} comes with the streaming data layer and is not implemented yet; "
                f"use one of {', '.join(v for v in allowed if v not in NOT_YET[key])}"
            )
    return p


def _check_log(cfg: RunConfig) -> list[str]:
    import importlib.util

    if cfg.log.tensorboard and importlib.util.find_spec("tensorboard") is None:
        return ['log.tensorboard=true needs the tensorboard package: pip install "dapt[tensorboard]"']
    return []


def _check_run(cfg: RunConfig) -> list[str]:
    p = []
    if not cfg.output_dir.strip():
        p.append("output_dir: empty (where should the run write?)")
    if cfg.resume not in ("auto", "never") and (not cfg.resume or not Path(cfg.resume).is_dir()):
        p.append(f"resume: {cfg.resume!r} is neither auto, never nor an existing checkpoint folder")
    _positive(p, "seed", cfg.seed, minimum=0)  # numpy's generators refuse negative seeds
    return p


def _check_model(cfg: RunConfig, check_files: bool) -> list[str]:
    p, m = [], cfg.model
    if m.name_or_path and m.config is not None:
        p.append(
            "model.name_or_path and model.config are exclusive: load a pretrained model or build one from a config"
        )
    lexical = cfg.embed.score == "lexical"  # launch/anomaly.py scoring character n-grams needs no model
    if not m.name_or_path and m.config is None and not cfg.ablation.base and not lexical:
        p.append(
            "model: give model.name_or_path (a hub id or folder) or model.config (to build one from scratch)"
        )
    if isinstance(m.config, dict) and "model_type" not in m.config:
        p.append("model.config: a mapping needs model_type (bert, roberta, distilbert, modernbert, ...)")
    if m.name_or_path and check_files:
        p += _pretrained_problems(cfg, m.name_or_path)
        if m.tokenizer and m.tokenizer != m.name_or_path and cfg.task != "plan":
            from dapt.model.hub import availability_problem

            p += [x for x in [availability_problem(m.tokenizer, "model.tokenizer")] if x]
    elif isinstance(m.config, str) and check_files:
        p += _pretrained_problems(cfg, m.config, "model.config") if m.config else ["model.config: empty"]
    if m.revision is not None and (not m.name_or_path or Path(m.name_or_path).expanduser().exists()):
        p.append(
            f"model.revision: {m.revision!r} applies to hub models; model.name_or_path "
            f"{m.name_or_path!r} is {'a local folder' if m.name_or_path else 'not given'}"
        )
    if m.char_vocab < 2:
        p.append(f"model.char_vocab: {m.char_vocab} must be >= 2 (the classes of CANINE's character head)")
    if m.tokenizer_vocab_size < 100:
        p.append(f"model.tokenizer_vocab_size: {m.tokenizer_vocab_size} is too small (at least 100)")
    return p


def _check_data(cfg: RunConfig, check_files: bool) -> list[str]:
    from dapt.data.sources import local_exists

    p, d = [], cfg.data
    for name in ("train", "valid", "test"):
        for path in getattr(d, name) if check_files else ():
            if local_exists(path) is False:
                p.append(f"data.{name}: {path!r} matches no file")
            elif d.format == "arrow" and (Path(path) / "dataset_dict.json").is_file():
                p.append(
                    f"data.{name}: {path!r} is a DatasetDict folder (several splits): name one split's folder, "
                    f"e.g. {path.rstrip('/')}/train"
                )
    if not d.train and (d.valid or d.test) and cfg.task != "predict":  # predict reads data.test alone
        p.append("data.valid/data.test given without data.train")
    _positive(p, "data.max_seq_length", d.max_seq_length, minimum=8)
    if not 0 <= d.valid_fraction < 1:
        p.append(f"data.valid_fraction: {d.valid_fraction} must be in [0, 1)")
    for name in (
        "num_workers",
        "min_chars",
        "max_chars",
        "num_samples",
        "valid_max_docs",
        "max_records_per_file",
    ):
        _positive(p, f"data.{name}", getattr(d, name), minimum=0)
    for name in ("streams", "block_docs", "tokenizer_docs", "max_record_bytes"):
        _positive(p, f"data.{name}", getattr(d, name))
    if d.train_weights and len(d.train_weights) != len(d.train):
        p.append(f"data.train_weights: {len(d.train_weights)} weights for {len(d.train)} data.train entries")
    if any(w <= 0 for w in d.train_weights):
        p.append(f"data.train_weights: {d.train_weights} must all be > 0")
    if len(d.train_weights) > d.streams:
        p.append(
            f"data.train_weights: {len(d.train_weights)} sources need data.streams >= {len(d.train_weights)}"
        )
    if d.train_weights and d.max_tokens:
        p.append(
            "data.max_tokens applies to one ordered corpus; it cannot be combined with data.train_weights"
        )
    _positive(p, "data.max_tokens", d.max_tokens, minimum=0)
    if d.max_chars and d.max_chars < d.min_chars:
        p.append(f"data.max_chars: {d.max_chars} is below data.min_chars {d.min_chars}")
    if d.format in ("csv", "tsv") and d.columns and d.column_names:
        missing = [c for c in d.columns if c not in d.column_names]
        if missing:
            p.append(f"data.columns: {missing} not among data.column_names")
    return p


def _check_embed(cfg: RunConfig) -> list[str]:
    p, e = [], cfg.embed
    if not 0 < e.max_fpr < 1:
        p.append(f"embed.max_fpr: {e.max_fpr} must be in (0, 1)")
    if e.shrinkage != "ledoit_wolf":
        try:
            ok = 0 <= float(e.shrinkage) <= 1
        except ValueError:
            ok = False
        if not ok:
            p.append(f"embed.shrinkage: {e.shrinkage!r} must be ledoit_wolf or a number in [0, 1]")
    for name in ("mask_patterns", "top_k", "knn_k", "ngram", "report_top"):
        _positive(p, f"embed.{name}", getattr(e, name))
    _positive(p, "embed.sample", e.sample, minimum=0)
    if not 0 < e.mask_rate <= 1:
        p.append(f"embed.mask_rate: {e.mask_rate} must be in (0, 1]")
    if not 0 <= e.valid_from_test < 1:
        p.append(f"embed.valid_from_test: {e.valid_from_test} must be in [0, 1)")
    elif e.valid_from_test and cfg.data.valid:
        p.append("embed.valid_from_test: the validation set is taken from data.test; leave data.valid empty")
    if cfg.ablation.score and cfg.ablation.protocol != "anomaly":
        p.append(
            f"ablation.score: {cfg.ablation.score!r} scores the anomaly protocol; set ablation.protocol=anomaly"
        )
    if e.score == "fused" and len(set(e.fuse)) < 2:
        p.append(
            f"embed.fuse: {e.fuse} fuses fewer than two scores; name two or more, or set embed.score to one"
        )
    return p


def _check_classify(cfg: RunConfig) -> list[str]:
    p, c = [], cfg.classify
    if not 0 <= c.label_smoothing < 1:
        p.append(f"classify.label_smoothing: {c.label_smoothing} must be in [0, 1)")
    if c.head_lr_mult <= 0:
        p.append(f"classify.head_lr_mult: {c.head_lr_mult} must be > 0")
    _positive(p, "classify.patience", c.patience, minimum=0)
    if any(seed < 0 for seed in c.seeds):
        p.append(f"classify.seeds: {c.seeds} must all be >= 0")
    if not 0 <= c.collapse_warn <= 1:
        p.append(f"classify.collapse_warn: {c.collapse_warn} must be in [0, 1]")
    if c.class_weights not in ("none", "inverse"):
        try:
            ok = all(0 < float(w) < math.inf for w in c.class_weights.split(","))
        except ValueError:
            ok = False
        if not ok:
            p.append(
                f"classify.class_weights: {c.class_weights!r} must be none, inverse or comma-separated weights "
                "> 0 in label order"
            )
    return p


def _check_masking(cfg: RunConfig) -> list[str]:
    p, k = [], cfg.masking
    for name in ("rate", "eval_rate"):
        rate = getattr(k, name)
        if rate is not None and not 0 < rate < 1:
            p.append(f"masking.{name}: {rate} must be in (0, 1)")
    if k.mask_prob < 0 or k.random_prob < 0 or k.mask_prob + k.random_prob > 1:
        p.append(
            f"masking.mask_prob + masking.random_prob = {k.mask_prob + k.random_prob} must be within [0, 1]"
        )
    if k.mask_token_id is not None:
        _positive(p, "masking.mask_token_id", k.mask_token_id, minimum=0)
    return p


def _check_train(cfg: RunConfig) -> list[str]:
    p, t = [], cfg.train
    for name in ("micro_batch_size", "grad_accum", "log_every"):
        _positive(p, f"train.{name}", getattr(t, name))
    for name in ("max_steps", "warmup_steps", "eval_every", "eval_batches"):
        _positive(p, f"train.{name}", getattr(t, name), minimum=0)
    if t.epochs <= 0:
        p.append(f"train.epochs: {t.epochs} must be > 0")
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


def _check_checkpoint(cfg: RunConfig) -> list[str]:
    p: list[str] = []
    _positive(p, "checkpoint.every", cfg.checkpoint.every, minimum=0)
    _positive(p, "checkpoint.keep", cfg.checkpoint.keep)
    return p


def _check_profile(cfg: RunConfig) -> list[str]:
    p: list[str] = []
    _positive(p, "profile.warmup", cfg.profile.warmup, minimum=0)
    _positive(p, "profile.steps", cfg.profile.steps)
    if cfg.profile.peak_tflops < 0:
        p.append(f"profile.peak_tflops: {cfg.profile.peak_tflops} must be >= 0")
    return p


def _check_plan(cfg: RunConfig) -> list[str]:
    p, plan = [], cfg.plan
    _positive(p, "plan.gpus", plan.gpus)
    _positive(p, "plan.min_micro_batch", plan.min_micro_batch)
    _positive(p, "plan.tokens", plan.tokens, minimum=0)
    if not 0 < plan.mfu <= 1:
        p.append(f"plan.mfu: {plan.mfu} must be in (0, 1]")
    if plan.chars_per_token <= 0:
        p.append(f"plan.chars_per_token: {plan.chars_per_token} must be > 0")
    _positive(p, "plan.measure_tokens", plan.measure_tokens, minimum=16)
    if not plan.micro_batches or any(m < 1 for m in plan.micro_batches):
        p.append(f"plan.micro_batches: {plan.micro_batches} must be a non-empty list of sizes >= 1")
    if not 0 < plan.headroom <= 1:
        p.append(f"plan.headroom: {plan.headroom} must be in (0, 1]")
    return p


def _check_fill(cfg: RunConfig) -> list[str]:
    p: list[str] = []
    _positive(p, "fill.top_k", cfg.fill.top_k)
    if not cfg.fill.placeholder:
        p.append("fill.placeholder: must not be empty")
    return p


def _check_numerics(cfg: RunConfig) -> list[str]:
    p, n = [], cfg.numerics
    _positive(p, "numerics.max_skipped_steps", n.max_skipped_steps, minimum=0)
    _positive(p, "numerics.spike_steps", n.spike_steps)
    if n.spike_factor and n.spike_factor <= 1:
        p.append(f"numerics.spike_factor: {n.spike_factor} must be > 1 (or 0 to turn the watchdog off)")
    if n.spike_window < n.spike_steps:
        p.append(f"numerics.spike_window: {n.spike_window} must be >= numerics.spike_steps ({n.spike_steps})")
    return p


def _check_hub(cfg: RunConfig, check_files: bool) -> list[str]:
    """hub.push: a repository id, and a token on this machine (the run must not find out after training)."""
    from dapt.runtime.publish import REPO_ID, hub_token, offline

    p, h = [], cfg.hub
    if not h.push:
        return p
    if not REPO_ID.fullmatch(h.model_id):
        p.append(
            f"hub.model_id: {h.model_id!r} is not a hub repository id OWNER/NAME (hub.push=true needs one)"
        )
    if not h.token_env:
        p.append("hub.token_env: empty (the name of the environment variable that holds the hub token)")
    elif (
        check_files and os.environ.get("RANK", "0") == "0" and hub_token(h.token_env) is None
    ):  # rank 0 uploads
        p.append(
            f"hub.push=true but there is no hub token: set {h.token_env} (hub.token_env) to a token with write "
            "access, or run `hf auth login` once on this machine"
        )
    if check_files and offline():
        p.append(
            "hub.push=true but HF_HUB_OFFLINE is set: nothing can be uploaded (unset it, or hub.push=false)"
        )
    return p


def _pretrained_problems(cfg: RunConfig, name: str, field: str = "model.name_or_path") -> list[str]:
    """A pretrained model (or a model.config path) that cannot be fetched, or rows longer than a pretrained model's
    position embeddings (a from-scratch model is given enough positions instead). Its config comes from a folder,
    dapt's table of the seeds' models (no network) or the hub; an earlier stage's output that does not exist yet is
    left for the run to name."""
    from dapt.model.archs import model_config, position_limit
    from dapt.model.hub import HubError, availability_problem

    revision = cfg.model.revision if field == "model.name_or_path" else None
    # dapt's table of sizes says nothing of whether the run can load the model; launch/plan.py only sizes it
    missing = availability_problem(name, field, revision) if cfg.task != "plan" else None
    if missing:
        return [missing]
    try:
        revision = cfg.model.revision if field == "model.name_or_path" else None
        conf = model_config(name, cfg.model.trust_remote_code, field, revision)
    except HubError as e:
        return [str(e)]
    except (FileNotFoundError, ValueError):
        return []  # not written yet, or not a config transformers knows: the run reports it with its context
    limit, max_len = position_limit(conf), cfg.data.max_seq_length
    if field == "model.name_or_path" and limit is not None and max_len > limit:
        return [
            f"data.max_seq_length: {max_len} is longer than {name} has position embeddings for "
            f"({limit} tokens); set --data.max_seq_length={limit} or less"
        ]
    return []


def _positive(problems: list[str], key: str, value: int, minimum: int = 1) -> None:
    if value < minimum:
        problems.append(f"{key}: {value} must be >= {minimum}")
