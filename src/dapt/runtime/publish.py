"""hub.push: final/ uploaded to the Hugging Face hub with huggingface_hub's own API, once it is exported, verified and
has its model card. One commit, from rank 0; the token is read from the environment and never logged or written."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from dapt.runtime import group

log = logging.getLogger("dapt")

# what a Hugging Face folder needs before it is worth uploading; export_hf wrote and reloaded these
REQUIRED = ("config.json", "model.safetensors", "README.md")


class PushFailed(SystemExit):
    """The run trained and exported final/, but the upload failed: exit 5, final/ kept, the message says how to
    upload it by hand."""

    code_number = 5

    def __init__(self, message: str):
        super().__init__(self.code_number)
        self.message = message


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() in ("1", "true", "yes", "on")


def hub_token(env: str) -> str | None:
    """The token in $env, else the one `hf auth login` saved; None when there is none."""
    from huggingface_hub import get_token

    return os.environ.get(env) or get_token() or None


def push_final(folder: Path, repo_id: str, private: bool, token_env: str, message: str) -> dict:
    """Upload `folder` (a verified final/) as one commit to the model repository `repo_id`, created when missing.
    Returns what summary.json records: the repository, its URL and the commit, or the error."""
    from huggingface_hub import HfApi

    missing = [name for name in REQUIRED if not (folder / name).is_file()]
    if missing:
        raise RuntimeError(f"hub.push: {folder} lacks {', '.join(missing)}; it is not uploaded")
    log.info(
        "hub.push: uploading %s to the hub repository %s (private=%s if created)", folder, repo_id, private
    )
    result = {"repo": repo_id, "private": private, "pushed": False}
    try:
        api = HfApi(token=hub_token(token_env))
        repo = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        commit = api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=message)
    except Exception as e:  # noqa: BLE001  (HTTP, connection, permission: every failure gets the same advice)
        first = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
        result["error"] = f"{type(e).__name__}: {first}"
        log.error("hub.push: the upload to %s failed (%s)", repo_id, result["error"])
        return result
    result |= {"pushed": True, "url": str(repo), "commit": commit.oid}
    log.info("hub.push: %s is on the hub at %s (commit %s)", folder, repo, commit.oid)
    return result


def failure_message(result: dict, folder: Path) -> str:
    return (
        f"the upload of {folder} to the hub repository {result['repo']} failed ({result['error']}); {folder} is "
        f"complete and verified: upload it with `hf upload {result['repo']} {folder} .{' --private' * result['private']}`"
    )


def publish(cfg, out: Path, summary: dict) -> None:
    """hub.push, on rank 0 once every rank is done (an upload may outlast the ranks' collective timeout): the upload,
    its result in summary["hub"] and summary.json; a failed upload then ends the run with exit 5, final/ kept."""
    h = cfg.hub
    if not h.push or group.rank() != 0:
        return
    message = (
        f"dapt: {out.name}, the weights of step {summary.get('final_step')} ({summary.get('final_from')})"
    )
    summary["hub"] = push_final(out / "final", h.model_id, h.private, h.token_env, message)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    if not summary["hub"]["pushed"]:
        raise PushFailed(failure_message(summary["hub"], out / "final"))
