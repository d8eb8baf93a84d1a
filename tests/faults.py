"""Numeric faults for tests: a forward hook on a real model turns chosen training forwards into NaN, Inf or a
loss spike. Used in-process (`inject`) and by faulty_mlm.py under the DeepSpeed launcher (env FAULT_*)."""

from __future__ import annotations

import os

import torch


def add_fault(model: torch.nn.Module, forwards: set[int], kind: str) -> torch.nn.Module:
    """On this rank's training forwards numbered in `forwards` (1-based): nan (embeddings become NaN), inf (a logit
    becomes +inf, so the loss is not finite) or spike (logits x 300, a large but finite loss)."""
    count = [0]

    def hook(module, args, output):
        if not module.training:
            return output
        count[0] += 1
        if count[0] not in forwards:
            return output
        if kind == "nan":
            output.logits = output.logits * float("nan")
        elif kind == "inf":
            output.logits = output.logits.clone().index_fill(-1, torch.tensor([0]), float("inf"))
        else:
            output.logits = output.logits * 300
        return output

    model.register_forward_hook(hook)
    return model


def inject(monkeypatch, forwards, kind: str, builder: str = "dapt.tasks.mlm.build_model") -> None:
    """Patch a model builder of dapt's own (build_model, or dapt.tasks.classify.build_model) so the model it builds
    carries the fault."""
    import importlib

    module_name, name = builder.rsplit(".", 1)
    module = importlib.import_module(module_name)
    build = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: add_fault(build(*a, **k), set(forwards), kind))


def from_env() -> None:
    """FAULT_FORWARDS=3,4 FAULT_KIND=nan FAULT_RANK=1: patch dapt.tasks.mlm.build_model in this process."""
    import dapt.tasks.mlm

    if os.environ.get("FAULT_RANK", os.environ.get("RANK", "0")) != os.environ.get("RANK", "0"):
        return
    forwards = {int(x) for x in os.environ.get("FAULT_FORWARDS", "").split(",") if x}
    build = dapt.tasks.mlm.build_model
    dapt.tasks.mlm.build_model = lambda *a, **k: add_fault(
        build(*a, **k), forwards, os.environ.get("FAULT_KIND", "nan")
    )
