"""The DeepSpeed configs and recipes that come with dapt (ds_configs/, recipes/): found in this checkout, or where pip
installed them (<prefix>/share/dapt/, setup.cfg's data_files), so that `--ds zero2_bf16` and
`--recipe recipes/secbert_http_mlm.yaml` work from any folder, also for the installed `dapt` command."""

from __future__ import annotations

import sys
from pathlib import Path

KINDS = {"ds_configs": ".json", "recipes": ".yaml"}


def folder(kind: str) -> Path | None:
    """Where the shipped `kind` (ds_configs or recipes) lie: the checkout's own, else the installed copy."""
    for root in (Path(__file__).resolve().parents[3], Path(sys.prefix) / "share" / "dapt"):
        if (root / kind).is_dir():
            return root / kind
    return None


def names(kind: str) -> list[str]:
    """The shipped files of `kind` by name, without their extension (zero2_bf16, ...)."""
    where = folder(kind)
    return sorted(p.stem for p in where.glob(f"*{KINDS[kind]}")) if where else []


def resolve(kind: str, given: str) -> Path | None:
    """The shipped file `given` names, when it is no file here: a bare name (zero2_bf16), a name with its extension,
    or a path inside the shipped folder (ds_configs/zero2_bf16.json, recipes/smoke/http_anomaly.yaml)."""
    where = folder(kind)
    if where is None or Path(given).is_file():
        return None
    relative = given.split(f"{kind}/", 1)[-1] if f"{kind}/" in given else given
    for candidate in (where / relative, where / f"{relative}{KINDS[kind]}"):
        if candidate.is_file():
            return candidate
    return None
