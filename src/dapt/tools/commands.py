"""`dapt <command> [args]` and `python -m dapt <command> [args]`: the entry scripts of launch/, installed with the
package. `dapt mlm --recipe R.yaml` is `python launch/mlm.py --recipe R.yaml`; under DeepSpeed's launcher use
`deepspeed --module dapt mlm ...` or the script in launch/."""

from __future__ import annotations

import importlib
import sys

from dapt.config.schema import PURPOSE

# command -> (module, what it holds: a task's or tool's run(cfg), or a tool's own main(argv)); one per launch/ script
COMMANDS = {
    name: (module, entry, PURPOSE[name])
    for name, module, entry in [
        ("mlm", "dapt.tasks.mlm", "run"),
        ("classify", "dapt.tasks.classify", "run"),
        ("embed", "dapt.tasks.embed", "run"),
        ("anomaly", "dapt.tasks.anomaly", "run"),
        ("fill_mask", "dapt.tasks.fill_mask", "run"),
        ("predict", "dapt.tasks.predict", "run"),
        ("profile", "dapt.tools.profile", "run"),
        ("plan", "dapt.tools.plan", "run"),
        ("ablation", "dapt.tools.ablation", "run"),
        ("doctor", "dapt.tools.doctor", "main"),
        ("submit", "dapt.tools.submit", "main"),
    ]
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [
        "usage: dapt <command> [--recipe RECIPE.yaml] [--ds DS.json] [--section.field=value ...] | dapt --version",
        "",
        "commands (each is launch/<command>.py; `dapt <command> --help` lists its fields):",
    ]
    lines += [f"  {name:<{width}}  {about}" for name, (_, _, about) in COMMANDS.items()]
    return "\n".join(lines)


def version() -> str:
    """dapt's version and the versions of what it runs on."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    import dapt

    def of(name: str) -> str:
        try:
            return installed(name)
        except PackageNotFoundError:
            return "not installed"

    parts = ", ".join(f"{name} {of(name)}" for name in ("torch", "deepspeed", "transformers", "tokenizers"))
    return f"dapt {dapt.__version__} ({parts}; Python {sys.version.split()[0]})"


def console(argv: list[str] | None = None) -> int:
    """The `dapt` console script: the command's entry point with the rest of the arguments."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # DeepSpeed's launcher (deepspeed --module dapt mlm ...) puts --local_rank=N before the command
    at = next((i for i, a in enumerate(argv) if not a.startswith("--local_rank")), len(argv))
    if at == len(argv) or argv[at] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[at] in ("-V", "--version", "version"):
        print(version())
        return 0
    name, rest = argv[at].replace("-", "_"), argv[:at] + argv[at + 1 :]
    if name not in COMMANDS:
        print(f"dapt: unknown command {argv[at]!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module, entry, _ = COMMANDS[name]
    target = getattr(importlib.import_module(module), entry)
    if entry == "main":
        return target(rest)
    from dapt.cli.main import main

    return main(target, rest, prog=f"dapt {name}")
