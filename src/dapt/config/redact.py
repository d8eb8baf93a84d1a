"""Secrets stay out of what a run writes: logs, error messages, config.resolved.yaml, the config copy in each
checkpoint and the W&B run config.

What counts as a secret: the value of any environment variable whose name says token, secret, password, API key,
access key, private key or credential (WANDB_API_KEY, HF_TOKEN, AWS_SECRET_ACCESS_KEY, ...); the password part of
a URL (https://user:password@host/...); a Hugging Face token (hf_...); and any config value under a key with one
of those words in its name.
"""

from __future__ import annotations

import logging
import os
import re

MASK = "***"
# whole words of a name (HF_TOKEN, WANDB_API_KEY, aws_secret_access_key), not parts (tokenizer_docs, author)
SECRET_NAME = re.compile(
    r"(?:^|_)(?:token|secret|password|passwd|api_?key|access_?key|private_?key|credentials?|"
    r"auth)(?:$|_)",
    re.IGNORECASE,
)
URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^/\s:@]+:)[^/\s@]+@")
HF_TOKEN = re.compile(r"\bhf_[A-Za-z0-9]{30,}\b")
MIN_SECRET = 6  # shorter values ("1", "true") would mask innocent text


def secret_values() -> list[str]:
    """Values of secret-named environment variables, longest first (so a value inside another is masked whole)."""
    values = {v for k, v in os.environ.items() if SECRET_NAME.search(k) and len(v) >= MIN_SECRET}
    return sorted(values, key=len, reverse=True)


def redact_text(text: str) -> str:
    for value in secret_values():
        text = text.replace(value, MASK)
    text = URL_PASSWORD.sub(lambda m: f"{m.group('head')}{MASK}@", text)
    return HF_TOKEN.sub(MASK, text)


def redact(obj):
    """A copy of a config tree with secrets masked: values under secret-named keys, and secrets inside strings."""
    if isinstance(obj, dict):
        return {
            k: (
                MASK
                if isinstance(k, str)
                and SECRET_NAME.search(k)
                and not k.endswith("_env")  # the name of a variable that holds a secret (hub.token_env)
                and obj[k] not in (None, "", False)
                and not isinstance(obj[k], dict | list)
                else redact(obj[k])
            )
            for k, v in obj.items()
        }
    if isinstance(obj, list | tuple):
        return type(obj)(redact(v) for v in obj)
    if isinstance(obj, str):
        return redact_text(obj)
    return obj


class RedactingFilter(logging.Filter):
    """Masks secrets in every record that passes through the handler it is attached to."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact_text(message)
        if clean != message:
            record.msg, record.args = clean, None
        return True
