"""The package layout shows the architecture: no lower layer imports a higher one, no task imports another task,
each entry script in launch/ is a thin call of its task's or tool's run(cfg), and the loop and set-up paths have no
function over ~60 lines."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from conftest import ROOT

SRC = ROOT / "src" / "dapt"
# bottom to top; tasks and cli are side by side (neither imports the other), tools sit above both
LAYERS = {"config": 0, "runtime": 1, "model": 2, "data": 3, "tasks": 4, "cli": 4, "tools": 5}


def _imports(path: Path) -> set[str]:
    """Every dapt module `path` imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("dapt.")}
        elif isinstance(node, ast.ImportFrom) and node.module == "dapt":
            found |= {f"dapt.{a.name}" for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dapt."):
            found.add(node.module)
    return found


def _package(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else None


def _modules() -> list[Path]:
    return sorted(p for p in SRC.rglob("*.py") if p.parent != SRC)


def test_every_module_lives_in_a_layer():
    flat = sorted(p.name for p in SRC.glob("*.py") if p.name not in ("__init__.py", "__main__.py"))
    assert flat == [], f"modules outside the layers: {flat}"
    assert {p.parent.name for p in _modules()} == set(LAYERS)


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(SRC)))
def test_no_lower_layer_imports_a_higher_one_and_no_task_imports_another(path):
    own = path.parent.name
    for module in _imports(path):
        other = _package(module)
        assert other is not None, f"{path.name} imports {module}, which is in no layer"
        assert LAYERS[other] <= LAYERS[own] and not (own != other and LAYERS[other] == LAYERS[own]), (
            f"{own}/{path.name} (layer {LAYERS[own]}) imports {module} (layer {LAYERS[other]})"
        )
        if own == "tasks" and other == "tasks":
            raise AssertionError(f"task {path.name} imports another task: {module}")


def test_the_check_above_finds_an_upward_import(tmp_path):
    """The layering check can fail: a runtime module importing a task is caught."""
    bad = tmp_path / "runtime" / "x.py"
    bad.parent.mkdir()
    bad.write_text("def f():\n    from dapt.tasks.mlm import run\n    return run\n")
    with pytest.raises(AssertionError, match="layer 1"):
        test_no_lower_layer_imports_a_higher_one_and_no_task_imports_another(bad)


def test_each_entry_script_runs_its_namesake():
    """launch/<name>.py calls dapt.tasks.<name>.run or dapt.tools.<name> (the module named after the script)."""
    for script in sorted((ROOT / "launch").glob("*.py")):
        name = script.stem
        text = script.read_text()
        homes = [f"dapt.tasks.{name}", f"dapt.tools.{name}"]
        assert any(f"from {home} import" in text for home in homes), f"{script.name} does not import {homes}"
        assert any((SRC / home.split(".")[1] / f"{name}.py").exists() for home in homes)


LOOP_AND_SET_UP = [
    "runtime/runner.py",
    "runtime/train.py",
    "tasks/mlm.py",
    "tasks/classify.py",
    "tools/profile.py",
    "data/labelled.py",
    "model/build.py",
]


@pytest.mark.parametrize("name", LOOP_AND_SET_UP)
def test_no_function_in_the_loop_and_set_up_paths_is_over_60_lines(name):
    tree = ast.parse((SRC / name).read_text())
    long = [
        (node.name, node.end_lineno - node.lineno + 1)
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno - node.lineno + 1 > 60
    ]
    assert long == [], f"{name}: {long}"


def test_the_training_loop_is_written_once():
    """One loop for every task: only dapt.runtime.train calls optimizer_step, opens a progress bar or raises
    Preempted and Diverged; the tasks and the profiler call train()."""
    owners = {}
    for path in _modules():
        text = path.read_text()
        for name in ("optimizer_step(", "tqdm(", "raise Preempted(", "raise Diverged(", ".export_point("):
            if name in text:
                owners.setdefault(name, set()).add(str(path.relative_to(SRC)))
    assert owners["optimizer_step("] == {"runtime/runner.py", "runtime/train.py"}  # defined, called
    for name in ("tqdm(", "raise Preempted(", "raise Diverged(", ".export_point("):
        assert owners[name] == {"runtime/train.py"}, (name, owners[name])
    for task in ("tasks/mlm.py", "tasks/classify.py", "tools/profile.py"):
        assert "train(cfg, " in (SRC / task).read_text(), f"{task} does not run through dapt.runtime.train"
