"""Process-group set-up for the DeepSpeed launcher, torchrun, or one plain `python` process; rank-aware logging."""

from __future__ import annotations

import logging
import os
import re
import socket
import sys
import warnings

import torch

from dapt.config.redact import RedactingFilter

log = logging.getLogger("dapt")


class LaunchError(ValueError):
    """Ranks started by a scheduler without the facts to find each other; nothing has started."""


# One process per rank started by a scheduler, with no torch launcher: (name, rank, world size, local rank, local
# world size) variables. srun sets SLURM_STEP_NUM_TASKS in a job step only, not in an sbatch script's own body, so a
# plain `python launch/mlm.py` in a batch script stays one process.
# The MPI launchers come first: an mpirun inside a SLURM allocation starts its daemons with srun, so its ranks also
# carry SLURM_PROCID and SLURM_STEP_NUM_TASKS, of that step (one task per node), not theirs.
SCHEDULERS = [
    (
        "mpirun (Open MPI)",
        "OMPI_COMM_WORLD_RANK",
        "OMPI_COMM_WORLD_SIZE",
        "OMPI_COMM_WORLD_LOCAL_RANK",
        "OMPI_COMM_WORLD_LOCAL_SIZE",
    ),
    ("mpirun (MPICH / Intel MPI)", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
    ("srun", "SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID", "SLURM_STEP_TASKS_PER_NODE"),
]


def scheduler_env(env: dict[str, str], devices: int = 0) -> tuple[str, dict[str, str]] | None:
    """The torch.distributed variables for ranks that srun or mpirun started one process each: (launcher, RANK,
    WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT to set), or None when a launcher already set RANK and WORLD_SIZE
    (deepspeed, torchrun, accelerate launch) or no scheduler started this process. `devices`: the GPUs this process
    sees; with fewer than the node's ranks (srun --gpus-per-task=1 binds one to each) the local rank indexes those.

    Raises:
        LaunchError: ranks on several nodes with no way to know the first one.
    """
    if "RANK" in env and "WORLD_SIZE" in env:
        return None
    for spec in SCHEDULERS:
        name, rank, size, local, _ = spec
        if rank not in env or size not in env:
            continue
        local_rank = int(env.get(local, "0"))
        return name, {
            "RANK": env[rank],
            "WORLD_SIZE": env[size],
            "LOCAL_RANK": str(local_rank % devices if devices else local_rank),
            "MASTER_ADDR": env.get("MASTER_ADDR") or _first_node(spec, env),
            "MASTER_PORT": env.get("MASTER_PORT") or _agreed_port(env),
        }
    return None


def _first_node(spec: tuple[str, ...], env: dict[str, str]) -> str:
    name, rank, size, _, local_size = spec
    if name == "srun" and (env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")):
        return first_host(env.get("SLURM_STEP_NODELIST") or env["SLURM_JOB_NODELIST"])
    if name != "srun" and env.get(local_size) == env[size]:
        return "127.0.0.1"  # every rank on this node
    raise LaunchError(
        f"{name} started this process as rank {env[rank]} of {env[size]} on several nodes, and nothing "
        "says which node is the first: export MASTER_ADDR=<the first node's address> (and MASTER_PORT) "
        "where the job starts (mpirun -x MASTER_ADDR -x MASTER_PORT), or start the ranks with the "
        "deepspeed launcher or torchrun"
    )


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: "gpu-[03-05,9],cpu1" -> "gpu-03" (what `scontrol show hostnames` gives
    first)."""
    depth, end = 0, len(nodelist)
    for i, c in enumerate(nodelist):  # the first host expression: up to a comma outside brackets
        depth += (c == "[") - (c == "]")
        if c == "," and depth == 0:
            end = i
            break
    # each bracket stands for its first number: "rack[1-2]-n[01-04]-ib" -> "rack1-n01-ib"
    return re.sub(r"\[([^\]]*)\]", lambda m: m.group(1).split(",")[0].split("-")[0], nodelist[:end].strip())


def _agreed_port(env: dict[str, str]) -> str:
    """The same port on every rank without talking: from the SLURM job id, else PyTorch's usual 29500."""
    job = env.get("SLURM_JOB_ID", "")
    return str(20000 + int(job) % 20000) if job.isdigit() else "29500"


def launcher_name(env) -> str:
    """Which launcher started this rank, from the variables each sets."""
    if "ACCELERATE_MIXED_PRECISION" in env:
        return "accelerate launch"
    if "TORCHELASTIC_RUN_ID" in env:
        return "torchrun"
    if "CROSS_RANK" in env:
        return "the deepspeed launcher"
    return "a launcher" if "RANK" in env else "one plain process"


def adopt_scheduler_env() -> str | None:
    """Set RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous for srun/mpirun-started ranks (see scheduler_env); the
    launcher's name, or None."""
    found = scheduler_env(dict(os.environ), torch.cuda.device_count() if torch.cuda.is_available() else 0)
    if found is None:
        return None
    name, values = found
    os.environ.update(values)
    os.environ["DAPT_LAUNCHER"] = name
    return name


def single_process_env() -> None:
    """Without a launcher, set the environment DeepSpeed needs for a world of one (else it looks for MPI)."""
    adopt_scheduler_env()
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init() -> None:
    """Start the process group once: NCCL on CUDA, gloo on CPU."""
    import deepspeed
    import torch.distributed as tdist

    if tdist.is_available() and tdist.is_initialized():
        return
    single_process_env()
    if not torch.cuda.is_available():
        # The shm op serves only inference_all_reduce, never training; skipping it avoids a ~45 s JIT build.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    else:
        # a launcher that binds one GPU to each process leaves one visible: the local rank indexes what is visible
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")


def describe(extra_env: list[str]) -> str:
    """Where this rank runs and what environment reached it (log.all_ranks=true prints it for every rank): NCCL
    settings with their values, the carried variables by name only (they may hold secrets)."""
    from dapt.runtime.hosts import carried_names

    nccl = " ".join(f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("NCCL_")) or "none"
    here = [n for n in carried_names(extra_env) if n in os.environ]
    started = os.environ.get("DAPT_LAUNCHER") or launcher_name(os.environ)
    return (
        f"rank {rank()} of {world()} on {socket.gethostname()} (local rank {os.environ.get('LOCAL_RANK', '0')}, "
        f"started by {started}), "
        f"rendezvous {os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}; NCCL: {nccl}; "
        f"carried: {', '.join(here) or 'none'}"
    )


def rank() -> int:
    return (
        torch.distributed.get_rank()
        if torch.distributed.is_initialized()
        else int(os.environ.get("RANK", "0"))
    )


def world() -> int:
    if torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def all_sum(*values: float) -> list[float]:
    """Sum numbers over all ranks (float64 so token counts stay exact)."""
    t = torch.tensor(values, dtype=torch.float64)
    if torch.distributed.is_initialized() and world() > 1:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        t = t.to(device)
        torch.distributed.all_reduce(t)
    return t.cpu().tolist()


def gather(obj) -> list:
    """`obj` from every rank, in rank order (a list of one without a process group)."""
    if world() == 1:
        return [obj]
    out = [None] * world()
    torch.distributed.all_gather_object(out, obj)
    return out


def setup_logging(level: str = "info", all_ranks: bool = False) -> None:
    """stdlib logging once, with a rank prefix; ranks other than 0 log warnings and errors only, unless all_ranks."""
    r = int(os.environ.get("RANK", "0"))
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter(f"[%(asctime)s rank{r}] %(levelname)s %(message)s", "%H:%M:%S"))
    handler.addFilter(RedactingFilter())
    log.handlers[:] = [handler]
    for name in ("DeepSpeed", "transformers"):  # their own loggers and handlers: mask secrets there too
        other = logging.getLogger(name)
        if not any(isinstance(f, RedactingFilter) for f in other.filters):
            other.addFilter(RedactingFilter())
    log.propagate = False
    log.setLevel(getattr(logging, level.upper()) if r == 0 or all_ranks else logging.WARNING)
    # torch deprecating the collectives DeepSpeed calls (all_gather_into_tensor, ...): nothing a user can act on
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    import transformers

    transformers.utils.logging.disable_progress_bar()  # "Loading weights" bars of every export and reload
