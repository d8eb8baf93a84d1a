"""Elastic resume: a checkpoint written on N ranks continues on M, at every ZeRO stage.

ZeRO 1-3 partition the optimizer state by rank, and DeepSpeed refuses to load it on another world size. dapt
converts such a checkpoint once to DeepSpeed's universal format (every parameter's fp32 weights and Adam moments,
whole), into the checkpoint's own folder, written and verified like every checkpoint, and loads it with
`load_universal`. The data continues from the canonical streams' positions, which do not depend on the world
size, and the global batch is kept by changing the accumulation (decided with the config, before any rank starts).

Each checkpoint carries `dapt_checkpoint.json`: the world size, ZeRO stage, batch and parameter shapes it was
written with; it is what the config check and launch/doctor.py read.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
from argparse import Namespace
from pathlib import Path

import torch

from dapt.config.schema import BadInput
from dapt.runtime import group

log = logging.getLogger("dapt")

INFO = "dapt_checkpoint.json"
UNIVERSAL = "universal"


def checkpoint_info(engine, cfg) -> dict:
    """What a checkpoint was written with (world size, ZeRO stage, batch, parameter shapes)."""
    shapes = {
        name: list(getattr(p, "ds_shape", None) or p.shape) for name, p in engine.module.named_parameters()
    }
    ds = cfg.ds_config
    return {
        "world_size": group.world(),
        "zero_stage": engine.zero_optimization_stage(),
        "train_batch_size": ds.get("train_batch_size"),
        "micro_batch_size": ds.get("train_micro_batch_size_per_gpu"),
        "grad_accum": ds.get("gradient_accumulation_steps"),
        "deepspeed": _deepspeed_version(),
        "parameters": shapes,
    }


def read_info(point: Path) -> dict | None:
    try:
        return json.loads((Path(point) / INFO).read_text())
    except (OSError, json.JSONDecodeError):
        return None  # written by a dapt before 0.2, or not a dapt checkpoint


def resume_candidate(cfg) -> Path | None:
    """The checkpoint a run would resume from, as the config check sees it (the index's latest; the run itself then
    verifies it, and falls back to an older one only when the latest is damaged)."""
    if cfg.resume == "never":
        return None
    if cfg.resume != "auto":
        return Path(cfg.resume)
    index = Path(cfg.output_dir) / "checkpoints" / "index.json"
    try:
        latest = json.loads(index.read_text()).get("latest")
    except (OSError, json.JSONDecodeError):
        return None
    return index.parent / latest if latest else None


def needs_conversion(info: dict | None, world: int, stage: int) -> bool:
    """Whether DeepSpeed can load this checkpoint only through the universal format."""
    if info is None:
        return False
    partitioned = info["zero_stage"] > 0 or stage > 0
    return partitioned and (info["world_size"] != world or info["zero_stage"] != stage)


def plan(cfg, world: int, problems: list[str]) -> list[str]:
    """Config time, before any rank starts: for a resume on another world size, keep the checkpoint's global batch
    (a new accumulation, or a config error naming values that would keep it), and refuse what cannot be converted.
    Returns the notes to log. (Which checkpoints to convert is decided at each load: Checkpoints.load.)"""
    point = resume_candidate(cfg)
    info = read_info(point) if point else None
    if info is None or not cfg.ds_config:
        return []
    stage = cfg.ds_config.get("zero_optimization", {}).get("stage", 0)
    notes: list[str] = []
    if info["world_size"] != world:
        notes += _keep_global_batch(cfg, info, world, point, problems)
    if not needs_conversion(info, world, stage):
        return notes
    problem = convertible(info, stage, point)
    if problem:
        problems.append(problem)
        return notes
    notes.append(
        f"resume: {point} was written on {info['world_size']} rank(s) at ZeRO stage {info['zero_stage']}; this run "
        f"has {world} at stage {stage}: it is converted once to DeepSpeed's universal format and loaded from it"
    )
    return notes


@contextlib.contextmanager
def universal_load(engine):
    """DeepSpeed reads its load_universal setting when a checkpoint is loaded, not before: on for this one load, so
    that other checkpoints (written on this world size) still load as they are."""
    config = engine._config
    before = config.load_universal_checkpoint
    config.load_universal_checkpoint = True
    try:
        yield
    finally:
        config.load_universal_checkpoint = before


def _keep_global_batch(cfg, info: dict, world: int, point: Path, problems: list[str]) -> list[str]:
    total, micro, ds = info["train_batch_size"], cfg.train.micro_batch_size, cfg.ds_config
    if total % (micro * world) == 0:
        accum = total // (micro * world)
        before = cfg.train.grad_accum
        cfg.train.grad_accum = accum
        ds["gradient_accumulation_steps"], ds["train_batch_size"] = accum, total
        return [
            f"resume on {world} rank(s) from {point} (written on {info['world_size']}): the global batch stays "
            f"{total} rows = micro {micro} x accumulation {accum} x world {world}"
            + (f" (train.grad_accum {before} -> {accum})" if before != accum else "")
        ]
    fits = [(m, total // (m * world)) for m in range(1, total // world + 1) if total % (m * world) == 0]
    ways = ", ".join(f"--train.micro_batch_size={m} --train.grad_accum={a}" for m, a in fits[-3:][::-1])
    problems.append(
        f"resume: {point} was trained with a global batch of {total} rows on {info['world_size']} rank(s); on "
        f"{world}, micro batch {micro} cannot make {total} rows (micro x accumulation x {world}): "
        + (
            f"use {ways}"
            if fits
            else f"{total} is not a multiple of {world}: resume on a world size that divides it"
        )
        + ", or start over with --resume=never"
    )
    return []


def convertible(info: dict, stage: int, point: Path) -> str | None:
    """Why a checkpoint cannot be converted for this run, or None."""
    if info["zero_stage"] == 0 or stage == 0:
        return (
            f"resume: {point} was written at ZeRO stage {info['zero_stage']} and this run has stage {stage}; "
            "DeepSpeed converts only ZeRO 1-3 checkpoints between world sizes and stages, and loads them only into "
            "ZeRO 1-3: keep the ZeRO stage of the checkpoint (its config.resolved.yaml), or --resume=never"
        )
    if not _has_universal():
        return (
            f"resume: {point} needs DeepSpeed's universal checkpoint conversion, which DeepSpeed "
            f"{_deepspeed_version()} lacks (0.14 or newer has it): upgrade deepspeed, resume on "
            f"{info['world_size']} rank(s), or --resume=never"
        )
    return None


def check_same_model(point: Path, engine) -> None:
    """A checkpoint of another model is refused before anything is converted or loaded."""
    info = read_info(point) or {}
    saved = info.get("parameters", {})
    mine = {n: list(getattr(p, "ds_shape", None) or p.shape) for n, p in engine.module.named_parameters()}
    if saved != mine:
        differ = sorted(set(saved) ^ set(mine)) or [n for n in mine if saved.get(n) != mine[n]]
        raise BadInput(
            f"resume: checkpoint {point} is of another model ({len(saved)} parameters saved, {len(mine)} here; "
            f"first difference: {differ[0] if differ else '?'}): use a new output_dir, or --resume=never"
        )


def universal(point: Path) -> Path:
    """`point`/universal: made once by rank 0 (weights-only check first, written under a temporary name, a
    manifest, then renamed), reused when it is there and verifies. Every rank must call; returns its path."""
    from dapt.runtime.checkpoint import check_unpickling, verify, write_manifest

    target = point / UNIVERSAL
    error = [None]
    if group.rank() == 0:
        if target.is_dir() and verify(target) is None:
            log.info("resume: using the universal conversion of %s made before", point)
        else:
            shutil.rmtree(target, ignore_errors=True)
            check_unpickling(point)  # DeepSpeed's converter unpickles with weights_only=False
            tmp = point / f".tmp-{UNIVERSAL}"
            shutil.rmtree(tmp, ignore_errors=True)  # left by a conversion that was killed
            log.info("resume: converting %s to DeepSpeed's universal format (once) ...", point)
            try:
                _convert(point, tmp)
                _loadable_at_every_stage(tmp)
                write_manifest(tmp)
                os.replace(tmp, target)
                log.info("resume: converted %s -> %s", point, target)
            except Exception as e:  # noqa: BLE001  (DeepSpeed's converter raises assertions, KeyErrors, ...)
                first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                error = [
                    f"resume: converting {point} to DeepSpeed's universal format failed ({type(e).__name__}: "
                    f"{first[:300]}; the converter's output is in {tmp / 'convert.log'}): resume on the world size it "
                    "was written on, or start over with --resume=never"
                ]
    if group.world() > 1:  # every rank learns the outcome, and none waits on a rank that failed
        torch.distributed.broadcast_object_list(error, src=0)
    if error[0]:
        raise BadInput(error[0])
    return target


def _convert(point: Path, out: Path) -> None:
    from deepspeed.checkpoint import ds_to_universal

    args = Namespace(
        input_folder=str(point),
        output_folder=str(out),
        num_extract_workers=1,  # in this process: no worker processes forked from a rank
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,  # dapt checkpoints carry no Megatron-style universal info
    )
    out.mkdir(parents=True)
    printed = io.StringIO()  # its prints and progress bars
    try:
        with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
            ds_to_universal.main(args)
    finally:
        (out / "convert.log").write_text(printed.getvalue())


def _loadable_at_every_stage(folder: Path) -> None:
    """DeepSpeed writes a universal checkpoint in the layout of the stage it converts from, and its ZeRO 1/2 and ZeRO 3
    readers expect two layouts: a ZeRO-2 checkpoint could not be continued at ZeRO 3 ("assert len(self.ckpt_list) >
    0", then KeyError 'optimizer_state_dict'), nor a ZeRO-3 one at ZeRO 1/2 ("Empty ds_version in checkpoint").
    Completed here to hold both, with the same values:
    - rank 0's model-states file (counters and client state; the weights come from zero/) under both names,
      mp_rank_00_model_states.pt (ZeRO 1/2) and zero_pp_rank_0_mp_rank_00_model_states.pt (ZeRO 3), a hard link where
      the file system allows one;
    - zero/optimizer_state.pt with ZeRO 3's optimizer_state_dict (the Adam step, the parameter groups) and ZeRO 1/2's
      ds_version;
    - each parameter's fp32, exp_avg and exp_avg_sq files as ZeRO 1/2 read them ({"param": tensor, "cat_dim": 0}, which
      ZeRO 3 reads too) and its step.pt."""
    import deepspeed

    from dapt.runtime.checkpoint import safe_load

    names = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")
    have = [folder / n for n in names if (folder / n).is_file()]
    for target in (folder / n for n in names):
        if have and not target.exists():
            try:
                os.link(have[0], target)
            except OSError:
                shutil.copy2(have[0], target)
    zero = folder / "zero"
    params = sorted(d for d in zero.iterdir() if d.is_dir())
    state = safe_load(zero / "optimizer_state.pt", mmap=False)
    if "optimizer_state_dict" in state:  # from ZeRO 3
        step = next(iter(state["optimizer_state_dict"]["state"].values()))["step"]
        for d in params:
            for key in ("fp32", "exp_avg", "exp_avg_sq"):
                value = safe_load(d / f"{key}.pt", mmap=False)
                if torch.is_tensor(value):
                    torch.save({"param": value.detach(), "cat_dim": 0}, d / f"{key}.pt")
            if not (d / "step.pt").exists():
                torch.save(step, d / "step.pt")
    else:  # from ZeRO 1/2: every parameter's step.pt holds the same count
        step = safe_load(params[0] / "step.pt", mmap=False)
        state["optimizer_state_dict"] = {"state": {0: {"step": step}}, "param_groups": state["param_groups"]}
    state.setdefault("ds_version", deepspeed.__version__)
    torch.save(state, zero / "optimizer_state.pt")


def repair_universal_load(engine, folder: Path) -> None:
    """Three things DeepSpeed's universal load gets wrong, set right from the converted checkpoint:
    - every parameter group gets the hyperparameters of the first one (ZeRO-3), so biases and norms would get weight
      decay (and a classifier's head the encoder's learning rate);
    - every group's Adam `step` is one shared tensor (ZeRO-3), so an optimizer step would count once per group, and
      the bias correction would drift from an uninterrupted run's;
    - `step` is loaded onto the CPU, where torch's fused AdamW (dapt's default) refuses it on a GPU: place_steps."""
    from dapt.runtime.checkpoint import safe_load

    torch_optimizer = getattr(engine.optimizer, "optimizer", engine.optimizer)
    place_steps(torch_optimizer)
    state = safe_load(folder / "zero" / "optimizer_state.pt")
    saved = (
        state["optimizer_state_dict"]["param_groups"]
        if "optimizer_state_dict" in state
        else state["param_groups"]
    )
    groups = torch_optimizer.param_groups
    if len(saved) != len(groups):
        raise BadInput(
            f"resume: {folder} has {len(saved)} optimizer parameter groups, this run {len(groups)}: it was written "
            "for another model or optimizer; use a new output_dir, or --resume=never"
        )
    for group_now, group_then in zip(groups, saved):
        group_now.update({k: v for k, v in group_then.items() if k != "params"})


def place_steps(optimizer: torch.optim.Optimizer) -> None:
    """Each parameter's Adam `step` a tensor of its own, placed as torch's own load_state_dict places it: on the
    parameter's device in fp32 for a fused or capturable group (else the fused kernel fails at the first step on a
    GPU: "Expected all tensors to be on the same device ... _fused_adamw_"), where it is otherwise. DeepSpeed's
    universal load sets the state directly, on the CPU, bypassing that placement. ZeRO-3 empties the groups'
    parameter lists between steps: a state whose parameter is in no group follows the optimizer's defaults."""
    groups = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    for p, state in optimizer.state.items():
        settings = groups.get(id(p), optimizer.defaults)
        step = state.get("step")
        if torch.is_tensor(step):
            on_device = settings.get("fused") or settings.get("capturable")
            state["step"] = step.to(p.device, torch.float32, copy=True) if on_device else step.clone()


def conversion_bytes(info: dict) -> int:
    """Disk the conversion needs at its peak: each parameter's fp32 weights and two Adam moments, whole (12 bytes), the
    model states file DeepSpeed copies (up to 4 more), and the per-rank fragments it writes first and deletes after
    merging (12 more)."""
    numel = sum(_numel(shape) for shape in info.get("parameters", {}).values())
    return numel * 28


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _has_universal() -> bool:
    try:
        from deepspeed.checkpoint import ds_to_universal

        return hasattr(ds_to_universal, "main")
    except ImportError:
        return False


def _deepspeed_version() -> str:
    try:
        import deepspeed

        return deepspeed.__version__
    except ImportError:
        return "?"
