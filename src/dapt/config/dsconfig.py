"""The DeepSpeed JSON: read it, fill its "auto" values from the recipe, and refuse contradictions.

"auto" is an HF/Accelerate convention that DeepSpeed itself silently drops (its pydantic configs fall back to
defaults), so every "auto" must be resolved here, as the HF Trainer does. A value written in both files
must agree; a recipe field left at its default takes the DeepSpeed value instead.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import logging
import os
from pathlib import Path
from typing import Any

AUTO = "auto"

DEFAULT_DS: dict[str, Any] = {
    "train_batch_size": AUTO,
    "train_micro_batch_size_per_gpu": AUTO,
    "gradient_accumulation_steps": AUTO,
    "gradient_clipping": AUTO,
    "zero_optimization": {"stage": 0},
    "optimizer": {"type": "AdamW", "params": {"lr": AUTO, "betas": AUTO, "eps": AUTO, "weight_decay": AUTO}},
    "bf16": {"enabled": AUTO},
}

# "auto" values that need the model or the step count; finalize_ds_config fills them later.
DEFERRED = {
    ("zero_optimization", "reduce_bucket_size"),
    ("zero_optimization", "stage3_prefetch_bucket_size"),
    ("zero_optimization", "stage3_param_persistence_threshold"),
    ("scheduler", "params", "total_num_steps"),
    ("scheduler", "params", "warmup_num_steps"),
}
ADAM_TYPES = ("adam", "adamw")


def load_ds_json(path: str | None, problems: list[str]) -> dict:
    """The DeepSpeed config: dapt's built-in one without --ds, else the file (a shipped one by name: zero2_bf16)."""
    from dapt.config import shipped

    if path is None:
        return copy.deepcopy(DEFAULT_DS)
    path = str(shipped.resolve("ds_configs", path) or path)
    if not Path(path).is_file():
        known = ", ".join(shipped.names("ds_configs"))
        problems.append(f"ds {path}: file not found (the shipped configs, by name: {known})")
        return {}
    try:
        data = json.loads(Path(path).read_text())
    except OSError as e:
        problems.append(f"ds {path}: cannot read ({e.strerror})")
        return {}
    except json.JSONDecodeError as e:
        problems.append(f"ds {path} line {e.lineno}, column {e.colno}: not valid JSON ({e.msg})")
        return {}
    if not isinstance(data, dict):
        problems.append(f"ds {path}: the top level must be an object")
        return {}
    return data


def resolve_ds_config(cfg, world: int, accelerator: str, problems: list[str]) -> dict:
    """Return the DeepSpeed config with every recipe-owned "auto" filled; append problems found."""
    ds = load_ds_json(cfg.ds, problems)
    if not ds or not _well_formed(ds, problems):
        return ds
    unknown = unknown_keys(ds)
    problems += [f"ds {cfg.ds or 'config'}: {message}" for _, message in unknown]
    for path, value in cfg.ds_set.items():  # accelerate launch's DeepSpeed flags, when it gave no config file
        given = _get(ds, path)
        if cfg.ds and given is not None and given != value:
            problems.append(
                f"contradiction: ds {cfg.ds} has {'.'.join(path)} = {given!r}, accelerate launch says "
                f"{value!r}"
            )
        _set(ds, path, value)
    _fill_batch(ds, cfg, world, problems)
    _fill(ds, ("gradient_clipping",), cfg, "train.grad_clip", problems)
    _fill_precision(ds, cfg, accelerator, problems)
    _fill_optimizer(ds, cfg, accelerator, problems)
    _check_scheduler(ds, cfg, problems)
    ds.setdefault("steps_per_print", 10**9)  # dapt logs its own metrics
    misspelt = [path for path, _ in unknown]
    for path in _autos(ds):
        if path not in DEFERRED and not any(path[: len(m)] == m for m in misspelt):
            problems.append(f'ds {".".join(path)}: "auto" that dapt cannot fill; give a value')
    return ds


# ---------------------------------------------------------------- keys DeepSpeed would ignore


class _Asked(dict):
    """A config mapping that records every key DeepSpeed's parser asks it for (get, [], in, `in d.keys()`), by its
    path: the keys a DeepSpeed version knows, read off DeepSpeed itself rather than kept in a list here."""

    def __init__(self, data: dict, path: tuple, asked: set):
        super().__init__(
            {k: _Asked(v, (*path, k), asked) if isinstance(v, dict) else v for k, v in data.items()}
        )
        self.path, self.asked = path, asked

    def _ask(self, key) -> None:
        self.asked.add((*self.path, key))

    def get(self, key, default=None):
        self._ask(key)
        return super().get(key, default)

    def __getitem__(self, key):
        self._ask(key)
        return super().__getitem__(key)

    def __contains__(self, key) -> bool:
        self._ask(key)
        return super().__contains__(key)

    def keys(self):
        return _AskedKeys(self)


class _AskedKeys:
    def __init__(self, mapping: _Asked):
        self.mapping = mapping

    def __contains__(self, key) -> bool:
        return key in self.mapping

    def __iter__(self):
        return iter(dict.keys(self.mapping))

    def __len__(self) -> int:
        return len(self.mapping)


def _asked_by_deepspeed(ds: dict) -> set[tuple]:
    """The key paths DeepSpeed's config parser asks `ds` for (all of them up to where it stops, if it rejects it)."""
    from deepspeed.runtime.config import DeepSpeedConfig

    asked: set[tuple] = set()
    with contextlib.suppress(Exception), _quiet_deepspeed():
        DeepSpeedConfig(_Asked(_trial(ds), (), asked))
    return asked


_MINIMAL = {
    "train_batch_size": 1,
    "optimizer": {"type": "AdamW", "params": {}},
    "scheduler": {"type": "WarmupLR"},
}


@functools.cache
def _minimal_asked() -> frozenset[tuple]:
    """What DeepSpeed asks any config for (parsed once): the keys it reads unconditionally."""
    return frozenset(_asked_by_deepspeed(_MINIMAL))


@functools.cache
def _deepspeed_names() -> frozenset[str]:
    """Every upper-case string constant of DeepSpeed's constants and config modules: its config keys (and values),
    including those it reads only in some configurations (bfloat16 for bf16, ...)."""
    import importlib
    import pkgutil

    import deepspeed

    names: set[str] = set()
    for module in pkgutil.walk_packages(deepspeed.__path__, "deepspeed."):
        if module.name.rsplit(".", 1)[-1] in ("constants", "config"):
            with contextlib.suppress(Exception):
                found = vars(importlib.import_module(module.name))
                names |= {v for k, v in found.items() if k.isupper() and isinstance(v, str)}
    return frozenset(names)


def unknown_keys(ds: dict) -> list[tuple[tuple, str]]:
    """(path, problem) for each key of the DeepSpeed config that DeepSpeed would silently ignore: at the top level and
    in the optimizer and scheduler blocks, a key DeepSpeed's parser never asks for (this config's parse and a
    minimal config's) and none of its constants names; in optimizer.params (Adam/AdamW) and scheduler.params, a
    name the optimizer's or schedule's constructor does not take. The blocks DeepSpeed parses with its own models
    (zero_optimization, bf16, ...) are checked by those (check_with_deepspeed)."""
    import difflib

    asked = _asked_by_deepspeed(ds) | _minimal_asked()
    names = _deepspeed_names()
    found = []
    for path, keys in [((), ds)] + [
        ((b,), ds[b]) for b in ("optimizer", "scheduler") if isinstance(ds.get(b), dict)
    ]:
        known = {p[-1] for p in asked if p[:-1] == path}
        for key in keys:
            if key not in known and key not in names:
                where = f"in {path[0]}" if path else "at the top level"
                close = difflib.get_close_matches(str(key), sorted(known), n=1, cutoff=0.6)
                hint = (
                    f"; did you mean {close[0]!r}?"
                    if close
                    else f"; DeepSpeed's keys here: {', '.join(sorted(known))}"
                )
                found.append(
                    (
                        (*path, key),
                        f"unknown key {key!r} {where}, which DeepSpeed would silently ignore{hint}",
                    )
                )
    for block in ("optimizer", "scheduler"):
        taken = _constructor_parameters(ds.get(block))
        params = ds.get(block, {}).get("params") if isinstance(ds.get(block), dict) else None
        for key in params if taken and isinstance(params, dict) else ():
            if key not in taken and key not in names:
                close = difflib.get_close_matches(str(key), sorted(taken), n=1, cutoff=0.6)
                hint = f"; did you mean {close[0]!r}?" if close else f"; it takes: {', '.join(sorted(taken))}"
                found.append(
                    (
                        (block, "params", key),
                        f"unknown key {key!r} in {block}.params ({ds[block].get('type')}){hint}",
                    )
                )
    return found


def _constructor_parameters(block: Any) -> set[str]:
    """What the optimizer (Adam/AdamW: torch's AdamW and DeepSpeed's FusedAdam and CPUAdam) or DeepSpeed schedule named
    by `block` takes as params; empty when dapt does not know (another optimizer: DeepSpeed checks it)."""
    import inspect

    if not isinstance(block, dict) or not isinstance(block.get("type"), str):
        return set()
    kind = block["type"]
    if kind.lower() in ADAM_TYPES:
        import torch
        from deepspeed.ops.adam import DeepSpeedCPUAdam, FusedAdam

        classes = [torch.optim.AdamW, torch.optim.Adam, FusedAdam, DeepSpeedCPUAdam]
    else:
        from deepspeed.runtime import lr_schedules

        schedule = getattr(lr_schedules, kind, None) if kind in lr_schedules.VALID_LR_SCHEDULES else None
        classes = [schedule] if schedule else []
    skip = {"self", "params", "optimizer", "model_params"}
    return {n for c in classes for n in inspect.signature(c).parameters if n not in skip}


# DeepSpeed's names for the pydantic models of its config blocks
BLOCKS = {
    "DeepSpeedZeroConfig": "zero_optimization",
    "DeepSpeedZeroOffloadOptimizerConfig": "zero_optimization.offload_optimizer",
    "DeepSpeedZeroOffloadParamConfig": "zero_optimization.offload_param",
    "DeepSpeedBF16Config": "bf16",
    "DeepSpeedFP16Config": "fp16",
    "DeepSpeedActivationCheckpointingConfig": "activation_checkpointing",
    "DeepSpeedFlopsProfilerConfig": "flops_profiler",
    "CommsConfig": "comms_logger",
}


def check_with_deepspeed(ds: dict, problems: list[str]) -> None:
    """Run DeepSpeed's own config parser now, so unknown keys and bad values inside its blocks (a ZeRO stage 7, a
    misspelt overlap_comm) are reported with the rest, before any rank starts, not when deepspeed.initialize runs.
    The batch sizes are checked by dapt for the real world size, so the trial states them for one rank."""
    from deepspeed.runtime.config import DeepSpeedConfig
    from pydantic import ValidationError

    try:
        with _quiet_deepspeed():
            DeepSpeedConfig(_trial(ds))
    except ValidationError as e:
        block = BLOCKS.get(e.title, e.title)
        for err in e.errors():
            where = ".".join(str(x) for x in err["loc"])
            problems.append(f"ds {block}.{where}: {err['msg']} (got {err.get('input')!r})")
    except (
        Exception
    ) as e:  # DeepSpeed's own asserts: they overlap dapt's checks, so only when those found nothing
        if not problems:
            problems.append(f"ds: DeepSpeed rejects the config: {type(e).__name__}: {str(e).splitlines()[0]}")


def _trial(ds: dict) -> dict:
    """`ds` as DeepSpeed's parser can take it here: "auto" (counts filled once the model is known) as 1, the batch
    stated for one rank (dapt checks it for the real world size)."""
    trial = copy.deepcopy(ds)
    for path in _autos(trial):
        _set(trial, path, 1)
    micro, accum = trial.get("train_micro_batch_size_per_gpu"), trial.get("gradient_accumulation_steps")
    if isinstance(micro, int) and isinstance(accum, int):
        trial["train_batch_size"] = micro * accum
    return trial


@contextlib.contextmanager
def _quiet_deepspeed():
    """DeepSpeed logs config warnings at import-time level; a trial parse should not print them."""
    from deepspeed.utils import logger as ds_logger

    level = ds_logger.level
    ds_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        ds_logger.setLevel(level)


def _well_formed(ds: dict, problems: list[str]) -> bool:
    before = len(problems)
    for block in ("optimizer", "scheduler", "zero_optimization", "bf16", "fp16"):
        if block in ds and not isinstance(ds[block], dict):
            problems.append(f"ds {block}: expected an object, got {ds[block]!r}")
    for block in ("optimizer", "scheduler"):
        params = ds.get(block, {}).get("params", {}) if isinstance(ds.get(block), dict) else {}
        if not isinstance(params, dict):
            problems.append(f"ds {block}.params: expected an object, got {params!r}")
    return len(problems) == before


def _get(ds: dict, path: tuple) -> Any:
    node = ds
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def _set(ds: dict, path: tuple, value: Any) -> None:
    node = ds
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = value


def _fill(ds: dict, path: tuple, cfg, key: str, problems: list[str]) -> None:
    """Fill ds[path] from recipe `key` when auto or absent; when both are given they must agree."""
    section, name = key.split(".")
    mine = getattr(getattr(cfg, section), name)
    theirs = _get(ds, path)
    if theirs is None or theirs == AUTO:
        _set(ds, path, mine)
    elif _differs(theirs, mine):
        if key in cfg.explicit:
            problems.append(
                f"contradiction: ds {'.'.join(path)} = {theirs!r} but {key} = {mine!r}; "
                f'set one of them (or write "auto" in the ds config)'
            )
        elif not _same_kind(theirs, mine):
            problems.append(f"ds {'.'.join(path)}: expected {type(mine).__name__}, got {theirs!r}")
        else:
            setattr(getattr(cfg, section), name, list(theirs) if isinstance(theirs, list | tuple) else theirs)
            cfg.adopted[key] = ".".join(path)


def _same_kind(theirs: Any, mine: Any) -> bool:
    """Whether a ds value may replace the recipe default `mine` (an int where an int is due, and so on)."""
    if isinstance(mine, bool) or isinstance(theirs, bool):
        return isinstance(mine, bool) and isinstance(theirs, bool)
    if isinstance(mine, float):
        return isinstance(theirs, int | float)
    if isinstance(mine, list):
        return isinstance(theirs, list | tuple) and all(isinstance(v, int | float) for v in theirs)
    return isinstance(theirs, type(mine))


def _differs(a: Any, b: Any) -> bool:
    if isinstance(a, list | tuple) or isinstance(b, list | tuple):
        return list(a) != list(b) if isinstance(a, list | tuple) and isinstance(b, list | tuple) else True
    if isinstance(a, bool) or isinstance(b, bool):
        return a != b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return abs(a - b) > 1e-12 * max(abs(a), abs(b), 1)
    return a != b


def _fill_batch(ds: dict, cfg, world: int, problems: list[str]) -> None:
    t = cfg.train
    total, gas = ds.get("train_batch_size"), ds.get("gradient_accumulation_steps")
    _fill(ds, ("train_micro_batch_size_per_gpu",), cfg, "train.micro_batch_size", problems)
    if isinstance(total, int) and gas in (None, AUTO) and "train.grad_accum" not in cfg.explicit:
        # The ds config fixes the global batch: derive accumulation from it, as DeepSpeed would.
        per_step = t.micro_batch_size * world
        if total % per_step:
            problems.append(
                f"ds train_batch_size = {total} is not divisible by micro batch x world size "
                f"= {t.micro_batch_size} x {world}"
            )
            ds["gradient_accumulation_steps"] = t.grad_accum  # reported once, not again as a leftover "auto"
            return
        t.grad_accum = total // per_step
    _fill(ds, ("gradient_accumulation_steps",), cfg, "train.grad_accum", problems)
    expected = t.micro_batch_size * t.grad_accum * world
    if total in (None, AUTO):
        ds["train_batch_size"] = expected
    elif total != expected:
        problems.append(
            f"ds train_batch_size = {total} but micro x accumulation x world size = "
            f"{t.micro_batch_size} x {t.grad_accum} x {world} = {expected}"
        )


def gpu_capability() -> tuple[int, int] | None:
    """This machine's first CUDA device's compute capability (8, 0 for an A100), or None without one."""
    import torch

    return torch.cuda.get_device_capability() if torch.cuda.is_available() else None


def bf16_native(capability: tuple[int, int]) -> bool:
    """bf16 tensor cores: Ampere (sm_80) and newer. torch.cuda.is_bf16_supported() also says yes on V100/T4, where bf16
    is emulated (it counts emulation unless told not to)."""
    return tuple(capability) >= (8, 0)


def flash_attention_capable(capability: tuple[int, int]) -> bool:
    """flash-attn 2's kernels: Ampere (sm_80) and newer; Turing and Volta are not supported."""
    return tuple(capability) >= (8, 0)


def auto_precision(accelerator: str, capability: tuple[int, int] | None) -> tuple[str, str]:
    """train.precision=auto: (precision, why). bf16 where the hardware has it; fp16 with loss scaling on Volta and
    Turing tensor cores (V100, T4); fp32 otherwise, CPUs included (bf16 is ~10x slower there without AVX512-BF16)."""
    if accelerator != "cuda":
        return "fp32", "CPU"
    if (
        capability is None
    ):  # checked from a machine without a GPU (submit, doctor): dapt's GPU tables are Ampere+
        return "bf16", "the cluster's GPUs are Ampere or newer"
    if bf16_native(capability):
        return "bf16", f"compute capability {capability[0]}.{capability[1]} has bf16 tensor cores"
    if tuple(capability) >= (7, 0):
        return "fp16", (
            f"compute capability {capability[0]}.{capability[1]} has no bf16 tensor cores (bf16 would be "
            "emulated): fp16 with dynamic loss scaling"
        )
    return "fp32", f"compute capability {capability[0]}.{capability[1]} has no half-precision tensor cores"


def bf16_in_hardware(accelerator: str) -> bool:
    """True when bf16 math runs natively (CUDA Ampere+, or a CPU with AVX512-BF16 or AMX)."""
    if accelerator == "cuda":
        capability = gpu_capability()
        return capability is None or bf16_native(capability)
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def _fill_precision(ds: dict, cfg, accelerator: str, problems: list[str]) -> None:
    t = cfg.train
    bf16, fp16 = _get(ds, ("bf16", "enabled")), _get(ds, ("fp16", "enabled"))
    if bf16 is True and fp16 is True:
        problems.append("ds: bf16.enabled and fp16.enabled are both true; choose one")
        return
    fixed = "bf16" if bf16 is True else "fp16" if fp16 is True else None
    if fixed is None and AUTO not in (bf16, fp16) and (bf16 is False or fp16 is False):
        fixed = "fp32"  # the file turns half precision off explicitly
    if fixed and t.precision not in ("auto", fixed):
        problems.append(f"contradiction: the ds config runs {fixed} but train.precision = {t.precision!r}")
        return
    if fixed:
        t.precision = fixed
    elif t.precision == "auto":
        t.precision, why = auto_precision(accelerator, gpu_capability() if accelerator == "cuda" else None)
        cfg.notes.append(f"train.precision=auto: {t.precision} ({why})")
    if bf16 is not None or t.precision == "bf16":
        _set(ds, ("bf16", "enabled"), t.precision == "bf16")
    if fp16 is not None or t.precision == "fp16":
        _set(ds, ("fp16", "enabled"), t.precision == "fp16")
    if t.precision == "fp16" and accelerator == "cpu" and not _cpu_fp16():
        problems.append(
            'fp16 needs a GPU: DeepSpeed refuses fp16 on this CPU ("Type fp16 is not supported on '
            'your device"); use a bf16 or fp32 ds config here'
        )


def _cpu_fp16() -> bool:
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    except (AttributeError, RuntimeError):
        return False


def _fill_optimizer(ds: dict, cfg, accelerator: str, problems: list[str]) -> None:
    opt = ds.setdefault("optimizer", {"type": "AdamW", "params": {}})
    params = opt.setdefault("params", {})
    is_adam = str(opt.get("type", "")).lower() in ADAM_TYPES
    keys = {"lr": "train.lr", "weight_decay": "train.weight_decay"}
    if is_adam:
        keys |= {"betas": "train.betas", "eps": "train.eps"}
    for name, key in keys.items():
        _fill(ds, ("optimizer", "params", name), cfg, key, problems)
    if not is_adam:
        return
    impl, offloaded = cfg.train.optimizer_impl, offload_device(ds, "offload_optimizer")
    here = _runs_here(accelerator)  # submit and doctor check a GPU run from a machine without one
    if impl == "auto" and offloaded and accelerator == "cuda":
        ok, how = deepspeed_op("cpu_adam", accelerator) if here else (True, "where the job runs")
        impl = "deepspeed" if ok else "torch"
        cfg.notes.append(
            "train.optimizer_impl=auto: "
            + (
                f"DeepSpeedCPUAdam for the offloaded optimizer ({how})"
                if ok
                else f"torch AdamW on the CPU for the offloaded optimizer: DeepSpeedCPUAdam cannot be built here ({how}); "
                "it is several times faster, so install ninja and the CUDA toolkit"
            )
        )
    if params.get("fused") and params.get("foreach"):
        problems.append("ds optimizer.params: fused and foreach are both true; torch's AdamW takes one")
    if impl in ("auto", "torch") and params.get("torch_adam", True):
        # torch's AdamW through DeepSpeed (its own kernels, nothing to compile): fused where it may be, the same path
        # on a GPU and in the CPU tests. DeepSpeed's FusedAdam/CPUAdam are JIT-built with ninja, a C++ compiler and
        # nvcc inside deepspeed.initialize (minutes, and a crash where the toolkit is missing).
        params["torch_adam"] = True
        if not params.get("foreach"):
            params.setdefault("fused", True)
        if offloaded:
            ds.setdefault("zero_force_ds_cpu_optimizer", False)
        return
    if params.get(
        "fused"
    ):  # DeepSpeed's own optimizers (the ds file says torch_adam: false) take no such flag
        problems.append(
            "ds optimizer.params.fused is torch's AdamW's flag; DeepSpeed's FusedAdam/CPUAdam (torch_adam: "
            "false, or train.optimizer_impl=deepspeed) do not take it"
        )
    ok, how = deepspeed_op("cpu_adam" if offloaded else "fused_adam", accelerator) if here else (True, "")
    if not ok:
        problems.append(
            f"train.optimizer_impl=deepspeed: DeepSpeed's {'CPUAdam' if offloaded else 'FusedAdam'} op "
            f"is neither prebuilt nor buildable here ({how}); use train.optimizer_impl=torch, or install "
            "what it needs"
        )


def deepspeed_op(name: str, accelerator: str) -> tuple[bool, str]:
    """Can DeepSpeed's op `name` (fused_adam, cpu_adam) load here: prebuilt into the installed DeepSpeed
    (DS_BUILD_OPS=1), or JIT-buildable (ninja, a C++ compiler, and on CUDA machines nvcc)? (answer, how or why not)."""
    import shutil

    from deepspeed.git_version_info import installed_ops

    if installed_ops.get(name):
        return True, "prebuilt into the installed DeepSpeed"
    missing = [] if shutil.which("ninja") or _python_ninja() else ["ninja"]
    if not shutil.which(os.environ.get("CXX", "c++")) and not shutil.which("g++"):
        missing.append("a C++ compiler")
    if accelerator == "cuda":
        from torch.utils.cpp_extension import CUDA_HOME

        if not CUDA_HOME or not Path(CUDA_HOME, "bin", "nvcc").exists():
            missing.append("nvcc (the CUDA toolkit, CUDA_HOME)")
        elif mismatch := _cuda_mismatch(Path(CUDA_HOME, "bin", "nvcc")):
            missing.append(mismatch)
    if missing:
        return False, "missing " + ", ".join(missing)
    return True, "JIT-built on first use (a few minutes once, then cached in TORCH_EXTENSIONS_DIR)"


def _cuda_mismatch(nvcc: Path) -> str | None:
    """DeepSpeed refuses to build with a CUDA toolkit of another major version than torch's."""
    import re
    import subprocess

    import torch

    try:
        found = re.search(
            r"release (\d+)\.",
            subprocess.run([str(nvcc), "--version"], capture_output=True, text=True, timeout=30).stdout,
        )
    except (OSError, subprocess.SubprocessError):
        return "a working nvcc"
    if found and torch.version.cuda and found.group(1) != torch.version.cuda.split(".")[0]:
        return f"nvcc of CUDA {torch.version.cuda.split('.')[0]} (this nvcc is CUDA {found.group(1)})"
    return None


def _runs_here(accelerator: str) -> bool:
    import torch

    return accelerator == ("cuda" if torch.cuda.is_available() else "cpu")


def _python_ninja() -> bool:
    try:
        import ninja  # noqa: F401  (pip's ninja puts its binary next to the interpreter's scripts)
    except ImportError:
        return False
    return True


def offload_device(ds: dict, block: str) -> str | None:
    device = _get(ds, ("zero_optimization", block, "device"))
    return device if device in ("cpu", "nvme") else None


def _check_scheduler(ds: dict, cfg, problems: list[str]) -> None:
    sched = ds.get("scheduler")
    if sched is None:
        return
    if "train.lr_schedule" in cfg.explicit:
        problems.append(
            f"contradiction: the ds config has a scheduler ({sched.get('type')}) and the recipe sets "
            "train.lr_schedule; keep one"
        )
    params = sched.setdefault("params", {})
    for name in ("warmup_max_lr",):
        if params.get(name) in (None, AUTO):
            params[name] = cfg.train.lr
    for name in ("warmup_min_lr", "warmup_min_ratio"):
        if params.get(name) == AUTO:
            params[name] = 0.0
    if params.get("cos_min_ratio") == AUTO:
        params["cos_min_ratio"] = cfg.train.min_lr_ratio


def _autos(node: Any, path: tuple = ()) -> list[tuple]:
    if isinstance(node, dict):
        return [p for k, v in node.items() for p in _autos(v, path + (k,))]
    return [path] if node == AUTO else []


def finalize_ds_config(loaded: dict, total_steps: int, warmup_steps: int, hidden_size: int | None) -> dict:
    """The engine's DeepSpeed config: the loaded one with the "auto" values that need the step count or the model's
    hidden size filled (HF's conventions). The loaded config is left as it is (a copy is filled)."""
    ds = copy.deepcopy(loaded)
    fills = {
        ("scheduler", "params", "total_num_steps"): total_steps,
        ("scheduler", "params", "warmup_num_steps"): warmup_steps,
    }
    if hidden_size:
        fills |= {
            ("zero_optimization", "reduce_bucket_size"): hidden_size * hidden_size,
            ("zero_optimization", "stage3_prefetch_bucket_size"): int(0.9 * hidden_size * hidden_size),
            ("zero_optimization", "stage3_param_persistence_threshold"): 10 * hidden_size,
        }
    for path, value in fills.items():
        if _get(ds, path) == AUTO:
            _set(ds, path, value)
    left = _autos(ds)
    if left:
        raise ValueError('ds config: "auto" left unfilled at ' + ", ".join(".".join(p) for p in left))
    return ds


def describe_optimizer(ds: dict, accelerator: str) -> str:
    """The optimizer DeepSpeed will build from this config, in words, for the log."""
    opt = ds.get("optimizer", {})
    kind = str(opt.get("type", "?"))
    if kind.lower() not in ADAM_TYPES:
        return f"DeepSpeed {kind}"
    params = opt.get("params", {})
    if params.get("torch_adam"):
        return (
            "torch.optim.AdamW ("
            + ("fused" if params.get("fused") else "foreach" if params.get("foreach") else "for-loop")
            + ")"
        )
    if offload_device(ds, "offload_optimizer"):
        return "DeepSpeedCPUAdam (optimizer offloaded to CPU; JIT-built on first use unless prebuilt)"
    return "DeepSpeed FusedAdam (JIT-built on first use unless prebuilt)"
