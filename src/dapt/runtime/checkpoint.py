"""Checkpoints: DeepSpeed engine state + client state + per-rank RNG, an index written last, retention, and the
Hugging Face export of the final weights (verified by reloading)."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import pickle
import random
import re
import shutil
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from dapt.config.schema import BadInput
from dapt.runtime import group

log = logging.getLogger("dapt")


def rank_state(extra: dict) -> dict:
    """This rank's RNG streams (dropout and anything else random) plus `extra`, saveable with weights_only."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (kind, keys.tolist(), pos, has_gauss, cached),
        "torch": torch.get_rng_state(),
        **extra,
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rank_state(state: dict) -> dict:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    return state


class UnsafeCheckpoint(BadInput):
    """A checkpoint file that unpickling would let run code: dapt never writes one, so it is refused."""


def _deepspeed_records() -> list:
    """The only non-torch classes DeepSpeed's own checkpoints hold: plain data records with no code on load."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def safe_load(path: Path, mmap: bool = True):
    """torch.load(weights_only=True): tensors, plain Python data and DeepSpeed's data records; anything else (a
    class or function a pickle could call) raises UnsafeCheckpoint naming it. Tensors are memory-mapped, not read
    (mmap=False for files in torch's legacy format, which DeepSpeed's universal converter writes)."""
    try:
        with torch.serialization.safe_globals(_deepspeed_records()):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        found = re.search(r"(?:Unsupported global|Unsupported operand|unsupported)[^\n]*", str(e))
        raise UnsafeCheckpoint(
            f"{path}: refusing to unpickle it: it holds more than tensors and plain data "
            f"({found.group(0) if found else str(e).splitlines()[0]}); a checkpoint dapt wrote "
            "never does. Do not resume from checkpoints of unknown origin"
        ) from None
    except (RuntimeError, EOFError) as e:
        raise UnsafeCheckpoint(f"{path}: not a readable torch file ({str(e).splitlines()[0]})") from None


def check_unpickling(folder: Path) -> None:
    """Before DeepSpeed loads a checkpoint (its torch.load has weights_only=False), prove every .pt file in it loads
    under weights_only=True, so loading cannot run code."""
    for path in sorted(Path(folder).rglob("*.pt")):
        safe_load(path)


MANIFEST = "manifest.json"


def write_manifest(folder: Path) -> None:
    """Size and sha256 of every file in a finished checkpoint folder."""
    files = {
        str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    (folder / MANIFEST).write_text(json.dumps(files, indent=1))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def verify(folder: Path) -> str | None:
    """None when every file of the checkpoint is there with its size and checksum; else what is wrong."""
    try:
        files = json.loads((folder / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError):
        return "no readable manifest (an unfinished write?)"
    for name, meta in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != meta["bytes"]:
            return f"{name} has {path.stat().st_size} bytes, the manifest says {meta['bytes']} (truncated?)"
        if _sha256(path) != meta["sha256"]:
            return f"{name} does not match its checksum (corrupted)"
    return None


class Score(NamedTuple):
    """A checkpoint's evaluation as the index keeps it: the figure, its name and which way is better."""

    metric: str
    score: float
    higher_is_better: bool

    def beats(self, best: dict | None) -> bool:
        """Better than the index's `best` entry (dapt 0.2's {"eval_loss": x} entries: a loss, or a classifier's
        score stored negated, both lower-is-better)."""
        if best is None:
            return True
        old = best["score"] if "score" in best else best["eval_loss"]
        if best.get("higher_is_better", False) != self.higher_is_better:
            old = -old
        return self.score > old if self.higher_is_better else self.score < old


def step_in(index: dict, folder: Path) -> int:
    """The optimizer step checkpoint `folder` was written at: from the index, else its dapt_checkpoint.json."""
    if folder.name in index.get("steps", {}):
        return int(index["steps"][folder.name])
    return step_of(folder)


def step_of(folder: Path) -> int:
    """The optimizer step checkpoint `folder` was written at, from what the checkpoint says of itself (its
    dapt_checkpoint.json, else the client state's counters); never from the folder's name."""
    try:
        return int(json.loads((folder / "dapt_checkpoint.json").read_text())["step"])
    except (OSError, KeyError, ValueError):
        pass
    states = sorted(folder.glob("*model_states.pt"))
    if not states:
        raise BadInput(f"{folder} is not a dapt checkpoint: no dapt_checkpoint.json and no model states")
    return int(safe_load(states[0])["train_state"]["step"])


class Checkpointer:
    """Saves under `root/<tag>/`, atomically: written as `.tmp-<tag>`, given a manifest of sizes and checksums,
    renamed, and only then named in `root/index.json` (latest, best, kept). Resume verifies the manifest and falls
    back to the previous complete checkpoint when the latest is damaged."""

    def __init__(self, root: Path, keep: int, keep_best: bool = True):
        self.root, self.keep, self.keep_best = Path(root), keep, keep_best
        self.index_path = self.root / "index.json"

    def index(self) -> dict:
        if not self.index_path.exists():
            return {"latest": None, "saved": [], "best": None}
        try:
            return json.loads(self.index_path.read_text())
        except json.JSONDecodeError:
            saved = sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
            log.warning("%s is unreadable; rebuilt from the checkpoint folders: %s", self.index_path, saved)
            return {"latest": saved[-1] if saved else None, "saved": saved, "best": None}

    def latest(self) -> Path | None:
        tag = self.index()["latest"]
        return self.root / tag if tag else None

    def before(self, step: int) -> Path | None:
        """The newest kept checkpoint written before optimizer step `step`."""
        index = self.index()
        tags = [tag for tag in index["saved"] if step_in(index, self.root / tag) < step]
        return self.root / tags[-1] if tags else None

    def save(
        self,
        engine,
        step: int,
        client_state: dict,
        rank_extra: dict,
        score: Score | None,
        info: dict | None = None,
    ) -> Path:
        """Checkpoint `step` (all ranks); `score`: its evaluation, for the index's best."""
        tag = f"step_{step:08d}"
        tmp = self.root / f".tmp-{tag}"
        if group.rank() == 0 and tmp.exists():
            shutil.rmtree(tmp)  # left by a run killed while saving
        group.barrier()
        engine.save_checkpoint(str(self.root), tag=tmp.name, client_state=client_state, save_latest=False)
        torch.save(rank_state(rank_extra), tmp / f"rank_state{group.rank()}.pt")
        group.barrier()  # every rank's files are on disk before the manifest, the rename and the index
        if group.rank() == 0:
            if info is not None:  # what it was written with: world size, ZeRO stage, batch, shapes
                (tmp / "dapt_checkpoint.json").write_text(json.dumps(info))
            write_manifest(tmp)
            if (self.root / tag).exists():
                shutil.rmtree(self.root / tag)
            os.replace(tmp, self.root / tag)
            self._update_index(tag, step, score)
        group.barrier()
        return self.root / tag

    def latest_complete(self) -> Path | None:
        """The newest kept checkpoint whose manifest checks out (decided on rank 0, the same on every rank)."""
        choice = [None]
        if group.rank() == 0:
            for tag in reversed(self.index()["saved"]):
                problem = verify(self.root / tag)
                if problem is None:
                    choice = [tag]
                    break
                log.error(
                    "checkpoint %s is damaged: %s; falling back to the previous one", self.root / tag, problem
                )
            else:
                if self.index()["saved"]:
                    raise BadInput(
                        f"every checkpoint in {self.root} is damaged (see above): move the folder away "
                        "to start over, or pass --resume=never"
                    )
        if group.world() > 1:
            torch.distributed.broadcast_object_list(choice, src=0)
        return self.root / choice[0] if choice[0] else None

    def _update_index(self, tag: str, step: int, score: Score | None) -> None:
        idx = self.index()
        saved = [t for t in idx["saved"] if t != tag] + [tag]
        best = idx["best"]
        if score is not None and score.beats(best):
            best = {"tag": tag, "step": step} | score._asdict()
        keep = set(saved[-self.keep :]) | ({best["tag"]} if best and self.keep_best else set())
        for old in saved:
            if old not in keep:
                shutil.rmtree(self.root / old, ignore_errors=True)
        steps = {t: step if t == tag else step_in(idx, self.root / t) for t in saved if t in keep}
        tmp = self.index_path.with_suffix(".tmp")
        index = {"latest": tag, "saved": [t for t in saved if t in keep], "steps": steps, "best": best}
        tmp.write_text(json.dumps(index, indent=1))
        os.replace(tmp, self.index_path)

    def load(self, engine, path: Path, ranks: Path | None = None) -> tuple[dict, dict]:
        """Load engine state from checkpoint folder `path` (and the ranks' own state from `ranks`, default `path`);
        return (client state, this rank's extra state)."""
        from deepspeed.runtime.zero.utils import ZeRORuntimeException

        check_unpickling(path)
        try:
            loaded, client = engine.load_checkpoint(str(path.parent), tag=path.name)
        except (RuntimeError, KeyError, AssertionError, IndexError, ZeRORuntimeException) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise BadInput(
                f"checkpoint {path} does not fit this run ({type(e).__name__}: {first[:300]}); it was "
                "written for another model or DeepSpeed config: use a new output_dir, pass "
                "--resume=never to start over, or the settings it was written with"
            ) from None
        if loaded is None:
            raise BadInput(f"DeepSpeed could not load the checkpoint {path}")
        mine = (ranks or path) / f"rank_state{group.rank()}.pt"
        if not mine.exists():  # the world grew: this rank has no saved RNG streams
            log.warning(
                "%s has no state for rank %d (saved on fewer ranks): its RNG starts fresh", path, group.rank()
            )
            return client, {}
        return client, restore_rank_state(safe_load(mine))


def expected_bytes(n_params: int, precision: str) -> int:
    """One checkpoint: fp32 master weights and two Adam moments (12 bytes per parameter, over all ranks together),
    plus the module's weights in the training precision."""
    return n_params * (12 + (2 if precision in ("bf16", "fp16") else 4))


def disk_room(root: Path, n_params: int, precision: str, keep: int) -> tuple[int, int, Path]:
    """(bytes that keep + 1 checkpoints need, bytes free, the existing folder measured) for checkpoints under root."""
    probe = root.resolve()
    while not probe.exists():
        probe = probe.parent
    return (
        (keep + 1) * expected_bytes(n_params, precision),
        shutil.disk_usage(probe).free,
        probe,
    )  # + the one written


def check_disk(root: Path, n_params: int, precision: str, keep: int, mode: str) -> None:
    """Refuse (or warn) before training when keep + 1 checkpoints cannot fit on the disk that will hold them."""
    if mode == "off":
        return
    need, free, probe = disk_room(root, n_params, precision, keep)
    if free >= need:
        return
    message = (
        f"checkpoints need about {need / 2**30:.1f} GiB ({keep} kept + 1 being written, "
        f"{expected_bytes(n_params, precision) / 2**30:.2f} GiB each) but {probe} has {free / 2**30:.1f} GiB "
        "free; lower checkpoint.keep, free space, or set checkpoint.disk_check=warn"
    )
    if mode == "refuse":
        raise BadInput(message)
    log.warning(message)


def masters(optimizer, module: torch.nn.Module) -> dict[int, torch.Tensor]:
    """The fp32 master copy of every trainable parameter of `module`, on the CPU, keyed by id(param), whatever wrapper
    DeepSpeed put around the engine's `optimizer` (rank 0 gets them all; every rank must call, since partitions are
    gathered):

    - FP16_Optimizer (DeepSpeed's FusedAdam in bf16/fp16 at ZeRO 0): one flat fp32 buffer per group;
    - FP16_UnfusedOptimizer (any other optimizer there, torch's AdamW included): one fp32 tensor per parameter;
    - BF16_Optimizer and ZeRO 1/2: this rank's slice of a flat fp32 buffer per group (ZeRO 1/2 in its round-robin
      order), gathered;
    - ZeRO 3: DeepSpeed's safe_get_full_fp32_param, parameter by parameter;
    - no wrapper (fp32 at ZeRO 0): the parameters are the masters.
    """
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
    from deepspeed.utils import safe_get_full_fp32_param

    opt, device, first = optimizer, next(module.parameters()).device, group.rank() == 0
    out: dict[int, torch.Tensor] = {}

    def keep(
        param, master: torch.Tensor
    ) -> None:  # on the CPU at once, and on rank 0 only: the GPUs stay free
        if first:
            out[id(param)] = master.detach().to("cpu", torch.float32)

    if isinstance(opt, FP16_Optimizer | FP16_UnfusedOptimizer):
        for p, m in _zero0_pairs(opt.fp16_groups, vars(opt)):
            keep(p, m)
    elif isinstance(opt, BF16_Optimizer):
        for i, low in enumerate(opt.bf16_groups):
            flat = _gathered(opt.fp32_groups_flat_partition[i].to(device), opt.real_dp_process_group[i])
            for p, a in zip(low, np.cumsum([0] + [p.numel() for p in low])) if flat is not None else ():
                keep(p, flat[a : a + p.numel()].view(p.shape))
    elif isinstance(opt, DeepSpeedZeroOptimizer):
        for i in range(len(opt.bit16_groups)):
            flat = _gathered(
                opt.single_partition_of_fp32_groups[i].to(device),  # offloaded: on the CPU
                opt.real_dp_process_group[i],
            )
            params, metas = opt.round_robin_bit16_groups[i], opt.round_robin_bit16_meta[i]
            # DeepSpeed releases before round_robin_bit16_offsets packed the parameters with no alignment padding
            offsets = getattr(opt, "round_robin_bit16_offsets", None)
            starts = offsets[i] if offsets else np.cumsum([0] + [m.numel() for m in metas])
            for p, meta, at in zip(params, metas, starts) if flat is not None else ():
                keep(p, flat[at : at + meta.numel()].view(meta.shape))
    elif isinstance(opt, DeepSpeedZeroOptimizer_Stage3):
        for p in module.parameters():
            if p.requires_grad:
                keep(p, safe_get_full_fp32_param(p))  # collective, one parameter at a time
    elif isinstance(
        opt, torch.optim.Optimizer
    ):  # ZeRO always wraps: a bare torch optimizer is fp32 at ZeRO 0
        for pg in opt.param_groups:
            for p in pg["params"]:
                keep(p, p)
    else:
        raise TypeError(
            f"export: dapt does not know where {type(opt).__name__} keeps the fp32 master weights"
        )
    return out


def _zero0_pairs(groups: list[list[torch.Tensor]], state: dict):
    """(parameter, fp32 master) of DeepSpeed's ZeRO-0 half-precision wrappers, from the wrapper itself or the state it
    saved: FP16_Optimizer keeps one flat buffer per group (fp32_groups_flat), FP16_UnfusedOptimizer one tensor per
    parameter (fp32_groups); `groups` are the wrapper's fp16_groups, whose order both follow."""
    from torch._utils import _unflatten_dense_tensors

    if "fp32_groups_flat" in state:
        for low, flat in zip(groups, state["fp32_groups_flat"]):
            yield from zip(low, _unflatten_dense_tensors(flat.detach(), low))
    else:
        for low, high in zip(groups, state["fp32_groups"]):
            yield from zip(low, high)


def _gathered(part: torch.Tensor, pg) -> torch.Tensor | None:
    """Equal-sized flat partitions of all ranks of process group `pg`, concatenated in rank order, on rank 0 (None elsewhere):
    gathered to one rank, so that the full fp32 model never sits on every GPU at the end of a run."""
    n = torch.distributed.get_world_size(group=pg) if torch.distributed.is_initialized() else 1
    if n == 1:
        return part.detach()
    part = part.detach().contiguous()
    first = group.rank() == 0
    parts = [torch.empty_like(part) for _ in range(n)] if first else None
    torch.distributed.gather(part, parts, dst=0, group=pg)
    return torch.cat(parts) if first else None


def named(engine, by_id: dict[int, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The module's state dict with each parameter replaced by its tensor in `by_id` (tied names share one); buffers
    as they are. All on the CPU in fp32."""
    # keep_vars keeps Parameter objects, so tied names (embeddings and decoder) both find their master.
    return {
        name: by_id.get(id(t), t).detach().to("cpu", torch.float32).clone()
        for name, t in engine.module.state_dict(keep_vars=True).items()
    }


def saved_masters(engine, checkpoint: Path) -> dict[int, torch.Tensor]:
    """ZeRO 0: the fp32 masters as DeepSpeed wrote them into `checkpoint` (its optimizer's fp32 groups, flat or
    per parameter; without a wrapper the saved module weights are the fp32 masters), keyed like masters()."""
    saved = safe_load(checkpoint / "mp_rank_00_model_states.pt")
    state = saved.get("optimizer") or {}
    if "fp32_groups_flat" in state or "fp32_groups" in state:
        return {id(p): m.float() for p, m in _zero0_pairs(engine.optimizer.fp16_groups, state)}
    params = dict(engine.module.named_parameters())
    return {id(params[name]): t.float() for name, t in saved["module"].items() if name in params}


def export_state(
    engine, checkpoint: Path
) -> tuple[dict[str, torch.Tensor] | None, dict[str, torch.Tensor] | None]:
    """(what final/ holds, an independent reference to check it against), fp32 on the CPU on rank 0 (None elsewhere);
    every rank must call. ZeRO 1-3: DeepSpeed's zero_to_fp32 over the checkpoint's partitions, checked against the
    live optimizer's masters. ZeRO 0: the live optimizer's masters, checked against those the checkpoint holds. So a
    wrong reading of either (bf16 weights for fp32 masters, a missed optimizer layout) fails the check."""
    live = masters(engine.optimizer, engine.module)
    if group.rank() != 0:
        return None, None
    if engine.zero_optimization_stage() > 0:
        # no check_unpickling here: the checkpoint is one this run wrote, or the one it resumed from (checked then)
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        quiet = io.StringIO()  # its progress lines and bars are not dapt's log
        with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
            state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.parent), tag=checkpoint.name)
        return {k: v.to("cpu", torch.float32) for k, v in state.items()}, named(engine, live)
    return named(engine, live), named(engine, saved_masters(engine, checkpoint))


def export_hf(
    engine, tokenizer, checkpoint: Path, out_dir: Path, auto_class: str = "AutoModelForMaskedLM"
) -> Path | None:
    """Write final weights as a Hugging Face folder (safetensors, config, tokenizer), verify that it reloads with the
    fp32 masters, and only then give it its name."""
    import transformers

    auto = getattr(transformers, auto_class)
    state, reference = export_state(engine, checkpoint)
    if group.rank() == 0:
        model = auto.from_config(
            engine.module.config, dtype=torch.float32
        )  # not the config's (maybe bf16) dtype
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if k not in _tied_keys(model)]
        if missing or unexpected:
            raise RuntimeError(f"export: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
        # written and verified under a temporary name, then renamed: a run killed here leaves no half a model
        tmp = out_dir.parent / f".tmp-{out_dir.name}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        params = {name for name, _ in engine.module.named_parameters(remove_duplicate=False)}
        verify_export(tmp, {k: v for k, v in reference.items() if k in params}, auto, tokenizer)
        shutil.rmtree(out_dir, ignore_errors=True)
        os.replace(tmp, out_dir)
        log.info(
            "exported %s (reloaded with %s: every weight equal to the fp32 masters)", out_dir, auto.__name__
        )
    group.barrier()
    return out_dir if group.rank() == 0 else None


def _tied_keys(model) -> set[str]:
    tied = getattr(model, "_tied_weights_keys", None) or {}
    return set(tied.keys() if isinstance(tied, dict) else tied)


PROBE = "GET /Shop?idA=2&Name=Ünïcode 42"


def verify_export(out_dir: Path, expected: dict[str, torch.Tensor], auto=None, tokenizer=None) -> None:
    """Reload the folder with Auto classes; fail on empty tensors, on weights that are missing or not exactly
    `expected` (fp32 masters), or on a tokenizer that reads a probe otherwise than `tokenizer` (the run's own; a
    class that rebuilds its normalizer would drop model.mark_capitals). The comparison is on the CPU, whatever
    device trained them."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    reloaded_tokenizer = AutoTokenizer.from_pretrained(out_dir)
    if tokenizer is not None and reloaded_tokenizer(PROBE)["input_ids"] != tokenizer(PROBE)["input_ids"]:
        raise RuntimeError(
            f"export {out_dir}: the reloaded tokenizer ({type(reloaded_tokenizer).__name__}) reads {PROBE!r} as "
            f"{reloaded_tokenizer.tokenize(PROBE)}, the run's as {tokenizer.tokenize(PROBE)}"
        )
    model = (auto or AutoModelForMaskedLM).from_pretrained(out_dir, dtype=torch.float32)
    reloaded = model.state_dict()
    empty = [k for k, v in reloaded.items() if v.numel() == 0]
    if empty:
        raise RuntimeError(f"export {out_dir}: empty tensors {empty[:5]} (ZeRO-3 weights not gathered?)")
    missing = [k for k in expected if k not in reloaded and k not in _tied_keys(model)]
    if missing:
        raise RuntimeError(f"export {out_dir}: {missing[:5]} missing after reload")
    for key, value in expected.items():
        if key in reloaded and not torch.equal(
            reloaded[key].to("cpu", torch.float32), value.to("cpu", torch.float32)
        ):
            raise RuntimeError(
                f"export {out_dir}: {key} is not the trained fp32 master weights after reload (largest "
                f"difference {float((reloaded[key].float().cpu() - value.float().cpu()).abs().max()):.3g})"
            )
