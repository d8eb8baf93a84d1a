"""The checks of a loaded config that need more than the config: the files and models it names, the hub, the output
folder's claim, a resume and its continuation, DeepSpeed's own reading of the DeepSpeed config, the world size.

The config's own rules live beside its fields (dapt.config.schema: each section's problems(), and RunConfig's for
rules that join sections); `check` runs them with these, so every problem is reported at once, before any rank
starts.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from dapt.config.dsconfig import check_with_deepspeed
from dapt.config.schema import RunConfig
from dapt.data.sources import local_exists
from dapt.model.archs import model_config, position_limit
from dapt.model.hub import HubError, availability_problem
from dapt.runtime import elastic, folder
from dapt.runtime.publish import hub_token, offline
from dapt.runtime.runner import continuation
from dapt.runtime.schedule import schedule_of

# The entry scripts that resume from output_dir's checkpoints (the others only write results there, or nothing)
RESUMES = ("mlm", "classify")


def check(cfg: RunConfig, world: int, problems: list[str], check_files: bool = True) -> None:
    """Append every problem of `cfg` to `problems` (which holds the loader's): the output folder, a resume, the
    world size, the config's own rules and those of its files, then DeepSpeed's reading of cfg.ds_config.
    check_files=False: the data files and models may exist only on the machines the run is for."""
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
    found = cfg.problems() + _resume_problems(cfg) + _log_problems(cfg) + _model_problems(cfg, check_files)
    for problem in found + _data_problems(cfg, check_files) + _hub_problems(cfg, check_files):
        key = problem.split(":", 1)[0]
        problems.append(
            f"{problem} (value taken from ds {cfg.adopted[key]})" if key in cfg.adopted else problem
        )
    if cfg.ds_config:
        check_with_deepspeed(cfg.ds_config, problems)


def _continuation_problems(cfg: RunConfig) -> list[str]:
    """A resume with another train.max_steps whose learning rate would jump: refused now, before any rank starts (with
    train.epochs the run itself checks, once the data is counted)."""
    point = elastic.resume_candidate(cfg)
    if cfg.resume != "auto" or not cfg.train.max_steps or point is None or "scheduler" in cfg.ds_config:
        return []  # a named checkpoint is verified first, by the run (which checks this then)
    if not (point / "manifest.json").is_file():
        return []  # a damaged latest: the run falls back to an older one, or says none is complete
    problem = continuation(cfg, point, schedule_of(cfg.train, cfg.train.max_steps))
    return [problem] if problem else []


def _resume_problems(cfg: RunConfig) -> list[str]:
    if cfg.resume not in ("auto", "never") and (not cfg.resume or not Path(cfg.resume).is_dir()):
        return [f"resume: {cfg.resume!r} is neither auto, never nor an existing checkpoint folder"]
    return []


def _log_problems(cfg: RunConfig) -> list[str]:
    if cfg.log.tensorboard and importlib.util.find_spec("tensorboard") is None:
        return ['log.tensorboard=true needs the tensorboard package: pip install "dapt[tensorboard]"']
    return []


def _model_problems(cfg: RunConfig, check_files: bool) -> list[str]:
    """The model, its config and its tokenizer can be fetched; a revision names a hub model."""
    p, m = [], cfg.model
    if m.name_or_path and check_files:
        p += _pretrained_problems(cfg, m.name_or_path)
        if m.tokenizer and m.tokenizer != m.name_or_path and cfg.task != "plan":
            p += [x for x in [availability_problem(m.tokenizer, "model.tokenizer")] if x]
    elif isinstance(m.config, str) and m.config and check_files:
        p += _pretrained_problems(cfg, m.config, "model.config")
    p += _marks_problems(cfg, check_files)
    if m.revision is not None and (not m.name_or_path or Path(m.name_or_path).expanduser().exists()):
        p.append(
            f"model.revision: {m.revision!r} applies to hub models; model.name_or_path "
            f"{m.name_or_path!r} is {'a local folder' if m.name_or_path else 'not given'}"
        )
    return p


def _marks_problems(cfg: RunConfig, check_files: bool) -> list[str]:
    """model.mark_capitals on a prediction or fill-mask run whose model's saved tokenizer does not mark: refused here,
    before the run starts (and claims its folder), as the run itself would refuse it."""
    from dapt.model.build import TRAINED_FOR, unmarked_model
    from dapt.runtime.card import saved_tokenizer_marks

    source = cfg.model.tokenizer or cfg.model.name_or_path
    if not (cfg.model.mark_capitals and cfg.task in TRAINED_FOR and source and check_files):
        return []
    saved = Path(source).expanduser()
    if (saved / "tokenizer.json").is_file() and not saved_tokenizer_marks(saved):
        return [unmarked_model(source, TRAINED_FOR[cfg.task])]
    return []


def _pretrained_problems(cfg: RunConfig, name: str, field: str = "model.name_or_path") -> list[str]:
    """A pretrained model (or a model.config path) that cannot be fetched, or rows longer than a pretrained model's
    position embeddings (a from-scratch model is given enough positions instead). Its config comes from a folder,
    dapt's table of the seeds' models (no network) or the hub; an earlier stage's output that does not exist yet is
    left for the run to name."""
    revision = cfg.model.revision if field == "model.name_or_path" else None
    # dapt's table of sizes says nothing of whether the run can load the model; launch/plan.py only sizes it
    missing = availability_problem(name, field, revision) if cfg.task != "plan" else None
    if missing:
        return [missing]
    try:
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


def _data_problems(cfg: RunConfig, check_files: bool) -> list[str]:
    """Every data file named exists; an arrow folder is one split."""
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
    return p


def _hub_problems(cfg: RunConfig, check_files: bool) -> list[str]:
    """hub.push: a token on this machine, and the hub reachable (the run must not find out after training)."""
    h = cfg.hub
    if not h.push or not check_files:
        return []
    p = []
    if (
        h.token_env and os.environ.get("RANK", "0") == "0" and hub_token(h.token_env) is None
    ):  # rank 0 uploads
        p.append(
            f"hub.push=true but there is no hub token: set {h.token_env} (hub.token_env) to a token with write "
            "access, or run `hf auth login` once on this machine"
        )
    if offline():
        p.append(
            "hub.push=true but HF_HUB_OFFLINE is set: nothing can be uploaded (unset it, or hub.push=false)"
        )
    return p
