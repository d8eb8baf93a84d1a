"""launch/doctor.py: a preflight check of a multi-node run, one verdict per item, before anything starts.

It validates the recipe and DeepSpeed config, the hostfile, the world size against the batch sizes, this node's GPUs,
a resume on another world size (the conversion it needs and its disk), free disk for the checkpoints the run keeps, the master address and port, and the environment the ranks will get.
It writes nothing and starts no process group; it runs on a CPU machine with no cluster (GPU items are then skipped).
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

from dapt.cli.main import front_door
from dapt.config.gpus import BY_NAME
from dapt.config.schema import RunConfig
from dapt.runtime.hosts import (
    carried_names,
    cluster_gpu,
    is_secret,
    nccl_settings,
    read_hostfile,
)
from dapt.tools.submit import gpus_per_node, load_for_cluster, world_size

OK, WARN, FAIL, SKIP = "OK", "WARN", "FAIL", "SKIP"


@dataclass
class Item:
    verdict: str
    name: str
    detail: str


def check_config(cfg: RunConfig, problems: list[str]) -> list[Item]:
    """Config problems that depend on the world size are the world-size item; the rest are the config item."""
    sized = [p for p in problems if "world size" in p]
    other = [p for p in problems if p not in sized]
    source = f"ds {cfg.ds}" if cfg.ds else "the built-in ds config"
    world, t = world_size(cfg), cfg.train
    items = [
        Item(FAIL, "recipe and ds config", "; ".join(other))
        if other
        else Item(
            OK,
            "recipe and ds config",
            f"valid ({source}, ZeRO {cfg.ds_config.get('zero_optimization', {}).get('stage', 0)})",
        )
    ]
    if sized:
        items.append(Item(FAIL, "world size", "; ".join(sized)))
    else:
        items.append(
            Item(
                OK,
                "world size",
                f"global batch = micro x accumulation x world size = {t.micro_batch_size} x "
                f"{t.grad_accum} x {world} = {t.micro_batch_size * t.grad_accum * world}",
            )
        )
    return items


def check_hostfile(cfg: RunConfig) -> Item:
    c = cfg.cluster
    if not c.hostfile:
        return Item(
            SKIP,
            "hostfile",
            "none given (SLURM, SkyPilot and per-node jobs from launch/submit.py make theirs)",
        )
    hostfile = read_hostfile(c.hostfile)
    if hostfile.problems:
        return Item(FAIL, "hostfile", "; ".join(hostfile.problems))
    notes = []
    if "cluster.nodes" in cfg.explicit and len(hostfile.hosts) != c.nodes:
        return Item(FAIL, "hostfile", f"{len(hostfile.hosts)} hosts but cluster.nodes = {c.nodes}")
    if "cluster.gpus_per_node" in cfg.explicit and set(hostfile.hosts.values()) != {c.gpus_per_node}:
        notes.append(
            f"slots {sorted(set(hostfile.hosts.values()))} differ from cluster.gpus_per_node = "
            f"{c.gpus_per_node}"
        )
    summary = f"{len(hostfile.hosts)} hosts, {hostfile.slots} slots ({', '.join(hostfile.hosts)})"
    return Item(WARN if notes else OK, "hostfile", "; ".join([summary, *notes]))


def check_gpus(cfg: RunConfig, expected: int) -> list[Item]:
    import torch

    gpu = cluster_gpu(cfg)
    if gpu == "cpu":
        return [Item(OK, "GPUs", f"CPU nodes: processes per node {expected}, {os.cpu_count()} CPUs here")]
    if not torch.cuda.is_available():
        return [
            Item(
                SKIP, "GPUs", "no CUDA GPU on this machine; run doctor on a node of the cluster to check them"
            )
        ]
    count = torch.cuda.device_count()
    names = sorted({torch.cuda.get_device_name(i) for i in range(count)})
    items = [
        Item(
            OK if count >= expected else FAIL,
            "GPU count",
            f"{count} GPUs here, {expected} ranks per node" + ("" if count >= expected else ": too few"),
        )
    ]
    if gpu:
        wrong = [n for n in names if BY_NAME[gpu].device not in n.lower()]
        items.append(Item(FAIL if wrong else OK, "GPU type", f"{', '.join(names)} (cluster.gpu = {gpu})"))
    missing = nccl_settings(gpu)
    if missing:
        items.append(
            Item(
                WARN,
                "NCCL",
                f"{gpu}: set {' '.join(f'{k}={v}' for k, v in missing.items())} (launch/submit.py's jobs do)",
            )
        )
    return items


def check_disk(cfg: RunConfig) -> Item:
    from dapt.runtime.checkpoint import disk_room, expected_bytes
    from dapt.tools.plan import model_facts

    try:
        params = model_facts(cfg)["parameters"]
    except (OSError, ValueError, KeyError) as e:
        return Item(WARN, "disk", f"cannot size the model here ({str(e).splitlines()[0][:160]})")
    kept = cfg.checkpoint.keep + int(cfg.checkpoint.keep_best)
    need, free, probe = disk_room(Path(cfg.output_dir) / "checkpoints", params, cfg.train.precision, kept)
    each = expected_bytes(params, cfg.train.precision)
    detail = (
        f"{kept} kept + 1 being written x {each / 2**30:.2f} GiB ({params / 1e6:.1f}M parameters) = "
        f"{need / 2**30:.1f} GiB; {free / 2**30:.1f} GiB free at {probe}"
    )
    return Item(OK if free >= need else FAIL, "disk", detail)


def check_resume(cfg: RunConfig, world: int) -> Item | None:
    """A checkpoint to resume from, written on another world size or ZeRO stage: the conversion it will need, and the
    disk for it. None when there is nothing to resume."""
    from dapt.runtime import elastic

    point = elastic.resume_candidate(cfg)
    info = elastic.read_info(point) if point else None
    if info is None:
        return None
    stage = cfg.ds_config.get("zero_optimization", {}).get("stage", 0)
    written = f"{point} (written on {info['world_size']} rank(s) at ZeRO stage {info['zero_stage']})"
    if not elastic.needs_conversion(info, world, stage):
        return Item(OK, "resume", f"continues from {written}")
    if (point / elastic.UNIVERSAL / "manifest.json").is_file():
        return Item(OK, "resume", f"continues from {written} through its universal conversion, made before")
    need, free = elastic.conversion_bytes(info), shutil.disk_usage(point).free
    detail = (
        f"continues from {written} on {world} rank(s) at stage {stage}: converted once to DeepSpeed's universal "
        f"format in {point / elastic.UNIVERSAL}, about {need / 2**30:.2f} GiB; {free / 2**30:.1f} GiB free there"
    )
    return Item(OK if free >= need else FAIL, "resume", detail)


def _local_addresses() -> set[str]:
    addresses = {"127.0.0.1", "::1", "localhost", socket.gethostname()}
    try:
        addresses |= {info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None)}
    except OSError:
        pass
    return addresses


def check_master(cfg: RunConfig, timeout: float = 3.0) -> Item:
    c = cfg.cluster
    hosts = read_hostfile(c.hostfile).hosts if c.hostfile else {}
    addr = c.master_addr or os.environ.get("MASTER_ADDR") or next(iter(hosts), "")
    if not addr:
        return Item(
            SKIP, "master address", "none given (SLURM and SkyPilot jobs take node 0 of the allocation)"
        )
    where = f"{addr}:{c.master_port}"
    try:
        infos = socket.getaddrinfo(addr, c.master_port, type=socket.SOCK_STREAM)
    except OSError as e:
        return Item(FAIL, "master address", f"{addr} does not resolve ({e.strerror or e})")
    ip = infos[0][4][0]
    if addr in _local_addresses() or ip in _local_addresses():
        with socket.socket(infos[0][0], socket.SOCK_STREAM) as s:
            try:
                s.bind((ip, c.master_port))
            except OSError as e:
                return Item(
                    FAIL,
                    "master address",
                    f"{where} is this machine, but the port is taken ({e.strerror}); "
                    "set cluster.master_port to a free one",
                )
        return Item(OK, "master address", f"{where} is this machine and the port is free")
    with socket.socket(infos[0][0], socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        code = s.connect_ex(infos[0][4])
    if code == 0:
        return Item(
            WARN,
            "master address",
            f"{where} reachable, but something already listens on the port (a job still running?)",
        )
    if code == errno.ECONNREFUSED:
        return Item(
            OK,
            "master address",
            f"{where} reachable ({ip}); the port is closed, as it should be before the job starts",
        )
    return Item(
        FAIL,
        "master address",
        f"{where} not reachable from here ({os.strerror(code) or 'timed out'}): "
        "check the address, the firewall or security group",
    )


def check_environment(cfg: RunConfig) -> Item:
    import deepspeed

    names = carried_names(cfg.cluster.env)
    missing = [n for n in cfg.cluster.env if n not in os.environ]
    shown = ", ".join(f"{n} (secret)" if is_secret(n) else n for n in names if n in os.environ) or "none"
    detail = (
        f"carried to every rank: {shown}; DeepSpeed {deepspeed.__version__} forwards NCCL*, PYTHON*, UCX*, "
        "MV2*, MLFLOW* by itself"
    )
    if missing:
        return Item(WARN, "environment", f"cluster.env names unset variables: {', '.join(missing)}; {detail}")
    return Item(OK, "environment", detail)


def check_optimizer(cfg: RunConfig) -> Item:
    """The optimizer the run will build; a DeepSpeed op (FusedAdam, CPUAdam) must be prebuilt or buildable here."""
    import torch

    from dapt.config.dsconfig import deepspeed_op, describe_optimizer, offload_device

    described = describe_optimizer(cfg.ds_config, "cuda")
    if not described.startswith(("DeepSpeed FusedAdam", "DeepSpeedCPUAdam")):
        return Item(OK, "optimizer", f"{described}: nothing to compile")
    if not torch.cuda.is_available():
        return Item(
            SKIP, "optimizer", f"{described}: run doctor on a GPU node to check that it can be built there"
        )
    name = "cpu_adam" if offload_device(cfg.ds_config, "offload_optimizer") else "fused_adam"
    ok, how = deepspeed_op(name, "cuda")
    return Item(
        OK if ok else FAIL,
        "optimizer",
        f"{described}: {how}"
        + ("" if ok else "; set train.optimizer_impl=torch (torch's fused AdamW needs no build)"),
    )


def check_launcher(cfg: RunConfig) -> Item:
    c = cfg.cluster
    if cfg.submit.scheduler == "pdsh" or c.hostfile and len(read_hostfile(c.hostfile).hosts) > 1:
        if not shutil.which("pdsh"):
            return Item(
                WARN,
                "launcher",
                "a hostfile launch over ssh needs pdsh, which is not installed here; "
                "or run the launcher on each node without ssh (launch/submit.py "
                "--submit.scheduler=nodes)",
            )
        return Item(
            OK,
            "launcher",
            "pdsh found (every host also needs passwordless ssh from this one, or run the "
            "launcher on each node without ssh)",
        )
    how = f"{cfg.submit.scheduler} job" if "submit.scheduler" in cfg.explicit else "launch/submit.py's jobs"
    return Item(
        OK, "launcher", f"{how}: the DeepSpeed launcher on each node, --no_ssh (no ssh or pdsh needed)"
    )


def diagnose(argv: list[str]) -> list[Item]:
    cfg, problems = load_for_cluster(argv, check_files=True, as_entry=True)
    world = world_size(cfg)
    items = check_config(cfg, problems)
    items.append(check_hostfile(cfg))
    items += check_gpus(cfg, gpus_per_node(cfg))
    refused = [p for p in problems if p.startswith(("output_dir ", "resume: "))]
    resume = (
        Item(SKIP, "resume", "not checked: the run's folder or checkpoint is refused (above)")
        if refused
        else check_resume(cfg, world)
    )
    items += [resume] if resume else []
    items += [
        check_disk(cfg),
        check_optimizer(cfg),
        check_master(cfg),
        check_environment(cfg),
        check_launcher(cfg),
    ]
    items.insert(
        0,
        Item(
            OK,
            "cluster",
            f"{cfg.cluster.nodes} nodes x {gpus_per_node(cfg)} ranks = world size {world}"
            if not cfg.cluster.hostfile
            else f"world size {world} from the hostfile",
        ),
    )
    return items


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 no item failed, 2 at least one did (or the arguments cannot be read)."""
    argv = sys.argv[1:] if argv is None else argv
    items, code = front_door(argv, "launch/doctor.py", lambda: diagnose(argv))
    if items is None:
        return code
    width = max(len(i.name) for i in items)
    for i in items:
        print(f"{i.verdict:<5} {i.name:<{width}}  {i.detail}")
    failed = [i.name for i in items if i.verdict == FAIL]
    print(
        f"verdict: {len(failed)} failed ({', '.join(failed)}); fix them before launching"
        if failed
        else "verdict: ready (nothing written, nothing started)"
    )
    return 2 if failed else 0
