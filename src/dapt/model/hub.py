"""Loading from the Hugging Face hub or a folder, with one line naming the id when it cannot be fetched (offline, a
typo, a gated or private model) instead of transformers' long traceback."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dapt.config.schema import BadInput


class HubError(BadInput):
    """A model or tokenizer named in the config could not be loaded; the message names it and says what to try."""


def pretrained(load: Callable[..., Any], name: str, field: str = "model.name_or_path", **kwargs) -> Any:
    """`load(name, **kwargs)` (a from_pretrained), with an unfetchable `name` reported in one line.

    Raises:
        HubError: naming `field`, the id, transformers' own first line and what to try.
    """
    try:
        return load(name, **kwargs)
    except OSError as e:
        raise HubError(unfetchable(name, field, e)) from None


def unfetchable(name: str, field: str, error: BaseException) -> str:
    first = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
    if Path(name).expanduser().exists():
        hint = "the folder exists but does not hold a complete model (config.json, weights, tokenizer files)"
    elif offline():
        hint = (
            "HF_HUB_OFFLINE is set and it is not in the local cache: fetch it once with network access, or "
            "give a local folder"
        )
    else:
        hint = (
            "check the id (a typo?) and the network; a gated or private model needs `hf auth login` or "
            "HF_TOKEN, and its licence accepted on its hub page"
        )
    return f"{field} {name!r} cannot be loaded: {first} ({hint})"


def from_config(load: Callable[..., Any], m, tokenizer: bool = False, **kwargs) -> Any:
    """`load` (a from_pretrained) of the model that `m` (the config's model section) names, or of its tokenizer
    (model.tokenizer when given): at model.revision when loading model.name_or_path, with model.trust_remote_code.

    Raises:
        HubError: as `pretrained`.
    """
    name = (m.tokenizer or m.name_or_path) if tokenizer else m.name_or_path
    field = "model.tokenizer" if tokenizer and m.tokenizer else "model.name_or_path"
    if m.revision and name == m.name_or_path:
        kwargs["revision"] = m.revision
    return pretrained(load, name, field, trust_remote_code=m.trust_remote_code, **kwargs)


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def availability_problem(
    name: str, field: str = "model.name_or_path", revision: str | None = None
) -> str | None:
    """Why the model (or tokenizer) `name` cannot be loaded here, or None: a local folder that exists is there; a hub
    id with HF_HUB_OFFLINE set must be in the local cache (its config.json); online, the fetch decides (the run and
    launch/doctor.py fetch its config). The config check and launch/doctor.py both ask this, before any rank starts."""
    if Path(name).expanduser().exists() or not offline():
        return None
    if name.count("/") > 1 or name.startswith((".", "/", "~")):  # a folder to be (an earlier stage's final/)
        return None
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(name, "config.json", revision=revision)
    except ValueError:  # not a valid repository id either
        cached = None
    if isinstance(cached, str):
        return None
    return unfetchable(name, field, OSError(f"{name} is not in the local Hugging Face cache"))
