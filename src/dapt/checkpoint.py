"""Checkpoints: DeepSpeed engine state + client state + per-rank RNG, an index written last, retention, and the
Hugging Face export of the final weights (verified by reloading)."""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from dapt import dist

log = logging.getLogger("dapt")


def rank_state(extra: dict) -> dict:
    """This rank's RNG streams (dropout and anything else random) plus `extra`, saveable with weights_only."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (kind, keys.tolist(), pos, has_gauss, cached),
             "torch": torch.get_rng_state(), **extra}
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


class Checkpointer:
    """Saves under `root/<tag>/`; `root/index.json` (written after every rank finished) names the latest complete
    checkpoint, the best one by eval loss, and the ones kept."""

    def __init__(self, root: Path, keep: int, keep_best: bool = True):
        self.root, self.keep, self.keep_best = Path(root), keep, keep_best
        self.index_path = self.root / "index.json"

    def index(self) -> dict:
        if not self.index_path.exists():
            return {"latest": None, "saved": [], "best": None}
        return json.loads(self.index_path.read_text())

    def latest(self) -> Path | None:
        tag = self.index()["latest"]
        return self.root / tag if tag else None

    def save(self, engine, step: int, client_state: dict, rank_extra: dict, eval_loss: float | None) -> Path:
        tag = f"step_{step:08d}"
        engine.save_checkpoint(str(self.root), tag=tag, client_state=client_state)
        torch.save(rank_state(rank_extra), self.root / tag / f"rank_state{dist.rank()}.pt")
        dist.barrier()  # every rank's files are on disk before the index points at them
        if dist.rank() == 0:
            self._update_index(tag, eval_loss)
        dist.barrier()
        return self.root / tag

    def _update_index(self, tag: str, eval_loss: float | None) -> None:
        idx = self.index()
        saved = [t for t in idx["saved"] if t != tag] + [tag]
        best = idx["best"]
        if eval_loss is not None and (best is None or eval_loss < best["eval_loss"]):
            best = {"tag": tag, "eval_loss": eval_loss}
        keep = set(saved[-self.keep:]) | ({best["tag"]} if best and self.keep_best else set())
        for old in saved:
            if old not in keep:
                shutil.rmtree(self.root / old, ignore_errors=True)
        tmp = self.index_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"latest": tag, "saved": [t for t in saved if t in keep], "best": best}, indent=1))
        os.replace(tmp, self.index_path)

    def load(self, engine, path: Path) -> tuple[dict, dict]:
        """Load engine state from checkpoint folder `path`; return (client state, this rank's extra state)."""
        loaded, client = engine.load_checkpoint(str(path.parent), tag=path.name)
        if loaded is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint {path}")
        state = torch.load(path / f"rank_state{dist.rank()}.pt", weights_only=True)
        return client, restore_rank_state(state)


def full_state_dict(engine, checkpoint: Path) -> dict[str, torch.Tensor] | None:
    """fp32 weights on rank 0 (None elsewhere): from ZeRO partitions of `checkpoint` for stages 1-3, else the
    module (its fp32 master copies under bf16)."""
    if dist.rank() != 0:
        return None
    if engine.zero_optimization_stage() > 0:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.parent), tag=checkpoint.name)
    masters = {}
    opt = engine.optimizer
    for low, high in zip(getattr(opt, "fp16_groups", []), getattr(opt, "fp32_groups", [])):
        masters |= {id(p): m for p, m in zip(low, high)}
    # keep_vars keeps Parameter objects, so tied names (embeddings and decoder) both find the fp32 master.
    return {name: masters.get(id(t), t).detach().float().clone()
            for name, t in engine.module.state_dict(keep_vars=True).items()}


def export_hf(engine, tokenizer, checkpoint: Path, out_dir: Path, auto_class: str = "AutoModelForMaskedLM") -> Path | None:
    """Write final weights as a Hugging Face folder (safetensors, config, tokenizer) and verify it reloads."""
    import transformers

    auto = getattr(transformers, auto_class)
    state = full_state_dict(engine, checkpoint)
    if dist.rank() == 0:
        model = auto.from_config(engine.module.config)
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if k not in _tied_keys(model)]
        if missing or unexpected:
            raise RuntimeError(f"export: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
        out_dir.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out_dir, safe_serialization=True)
        tokenizer.save_pretrained(out_dir)
        verify_export(out_dir, state, auto)
    dist.barrier()
    return out_dir if dist.rank() == 0 else None


def _tied_keys(model) -> set[str]:
    tied = getattr(model, "_tied_weights_keys", None) or {}
    return set(tied.keys() if isinstance(tied, dict) else tied)


def verify_export(out_dir: Path, expected: dict[str, torch.Tensor], auto=None) -> None:
    """Reload the folder with Auto classes; fail on empty tensors or weights that differ from `expected`."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    AutoTokenizer.from_pretrained(out_dir)
    reloaded = (auto or AutoModelForMaskedLM).from_pretrained(out_dir).state_dict()
    empty = [k for k, v in reloaded.items() if v.numel() == 0]
    if empty:
        raise RuntimeError(f"export {out_dir}: empty tensors {empty[:5]} (ZeRO-3 weights not gathered?)")
    for key, value in expected.items():
        if key in reloaded and not torch.allclose(reloaded[key].float(), value.float(), atol=1e-6):
            raise RuntimeError(f"export {out_dir}: {key} differs from the trained weights after reload")
    log.info("exported %s (%d tensors, reload verified)", out_dir, len(reloaded))
