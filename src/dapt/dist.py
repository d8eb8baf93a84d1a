"""Process-group set-up for the DeepSpeed launcher, torchrun, or one plain `python` process; rank-aware logging."""

from __future__ import annotations

import logging
import os
import socket
import sys

import torch

from dapt.redact import RedactingFilter

log = logging.getLogger("dapt")


def single_process_env() -> None:
    """Without a launcher, set the environment DeepSpeed needs for a world of one (else it looks for MPI)."""
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
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")


def describe(extra_env: list[str]) -> str:
    """Where this rank runs and what environment reached it (log.all_ranks=true prints it for every rank): NCCL
    settings with their values, the carried variables by name only (they may hold secrets)."""
    from dapt.hosts import carried_names

    nccl = " ".join(f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("NCCL_")) or "none"
    here = [n for n in carried_names(extra_env) if n in os.environ]
    return (f"rank {rank()} of {world()} on {socket.gethostname()} (local rank {os.environ.get('LOCAL_RANK', '0')}), "
            f"rendezvous {os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}; NCCL: {nccl}; "
            f"carried: {', '.join(here) or 'none'}")


def rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else int(os.environ.get("RANK", "0"))


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
