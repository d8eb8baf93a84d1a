"""What multi-node launches share: hostfiles, the environment carried to remote ranks, GPU and instance facts.

DeepSpeed's pdsh launcher forwards only NCCL*, PYTHON*, UCX*, MV2* and MLFLOW* variables to remote ranks; anything
else must be listed in its env file (`.deepspeed_env`, or the file named by DS_ENV_FILE). dapt always carries WANDB_*
and HF_* plus the names in cluster.env, in that file for pdsh and as exports in the scripts launch/submit.py writes.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from dapt.config.gpus import BY_NAME, INSTANCES
from dapt.config.redact import SECRET_NAME

CARRIED_PREFIXES = ("WANDB_", "HF_")
SAFE_PATH = re.compile(r"^[A-Za-z0-9._@+,:/-]*$")
HOST_LINE = re.compile(r"^(\S+)\s+slots=(\d+)")  # DeepSpeed's own pattern (launcher/runner.py)
# DeepSpeed's pdsh runner wraps values in double quotes for the remote shell, where these would still expand.
PDSH_UNSAFE = re.compile(r"[$`\"\\\n\r]")


@dataclass
class Hostfile:
    hosts: dict[str, int]
    problems: list[str]

    @property
    def slots(self) -> int:
        return sum(self.hosts.values())


def read_hostfile(path: str) -> Hostfile:
    """Parse a DeepSpeed hostfile as its launcher does (comments, blank lines, `host slots=N`), naming the line of
    each problem; stricter than DeepSpeed where it would start and fail later (slots=0, trailing words)."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        return Hostfile({}, [f"{path}: cannot read ({e.strerror})"])
    except UnicodeDecodeError:
        return Hostfile({}, [f"{path}: not a text file"])
    hosts, seen, problems = {}, {}, []
    for number, raw in enumerate(lines, 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = HOST_LINE.match(line)
        if not match or line[match.end() :].strip():
            problems.append(f"{path} line {number}: {raw.strip()!r} is not `host slots=N`")
            continue
        host, slots = match.group(1), int(match.group(2))
        if host in seen:
            problems.append(
                f"{path} line {number}: host {host} again (first on line {seen[host]}); DeepSpeed "
                "refuses repeated hosts (on one machine use localhost and 127.0.0.1)"
            )
        elif slots < 1:
            problems.append(f"{path} line {number}: {host} has slots={slots}; a host needs at least one")
        else:
            hosts[host], seen[host] = slots, number
    if not hosts and not problems:
        problems.append(f"{path}: no `host slots=N` line")
    return Hostfile(hosts, problems)


def carried_names(extra: list[str]) -> list[str]:
    """Names of the variables to carry to every rank: WANDB_* and HF_* set in this shell, then cluster.env."""
    names = sorted(k for k in os.environ if k.startswith(CARRIED_PREFIXES))
    return list(dict.fromkeys(names + list(extra)))


def is_secret(name: str) -> bool:
    return bool(SECRET_NAME.search(name))


def cluster_gpu(cfg) -> str:
    """cluster.gpu, or the GPU of a known submit.instance."""
    return cfg.cluster.gpu or INSTANCES.get(cfg.submit.instance, ("", 0))[0]


def nccl_settings(gpu: str) -> dict[str, str]:
    """NCCL variables a GPU type needs, unless this shell sets them already."""
    return {k: v for k, v in (BY_NAME[gpu].nccl if gpu in BY_NAME else {}).items() if k not in os.environ}
