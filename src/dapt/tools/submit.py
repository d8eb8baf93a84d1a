"""launch/submit.py: render the job that runs a recipe on several nodes, for SLURM, SkyPilot, any other scheduler
(one script per node, torchrun-style NODE_RANK / MASTER_ADDR / MASTER_PORT) or DeepSpeed's own pdsh launcher.

Every job runs the DeepSpeed launcher once per node without ssh (`--no_ssh --node_rank`), with a hostfile made from
the allocation, except the pdsh one, which is DeepSpeed's ssh launch over cluster.hostfile. The recipe is checked for
the job's world size before anything is written. Every value that reaches a shell is quoted with shlex.quote; values
in #SBATCH lines, which no shell reads, are checked against a safe alphabet instead. Secrets (WANDB_API_KEY, HF_TOKEN,
...) are never written into a script: it names them, and they come from the environment the job starts in.
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

import yaml

from dapt.cli.load import collect_config, split_options, task_of
from dapt.cli.main import front_door
from dapt.config.gpus import BY_NAME, INSTANCES
from dapt.config.redact import redact_text
from dapt.config.schema import ConfigError, RunConfig
from dapt.runtime.hosts import (
    PDSH_UNSAFE,
    SAFE_PATH,
    carried_names,
    cluster_gpu,
    is_secret,
    nccl_settings,
    read_hostfile,
)

ROOT = Path(__file__).resolve().parents[3]
FILES = {"slurm": "job.sbatch", "skypilot": "task.yaml", "nodes": "node.sh", "pdsh": "launch.sh"}
LAUNCH = (
    'deepspeed --hostfile "$hostfile" --no_ssh --node_rank="$NODE_RANK" --master_addr="$MASTER_ADDR" '
    '--master_port="$MASTER_PORT"'
)


def job_args(argv: list[str]) -> list[str]:
    """This command's arguments minus the cluster and submit sections: what each rank of the job is given."""
    return [
        t
        for key, _, tokens in split_options(argv)
        if not (key or "").startswith(("cluster.", "submit.", "dry_run"))
        for t in tokens
    ]


def gpus_per_node(cfg: RunConfig) -> int:
    c = cfg.cluster
    if "cluster.gpus_per_node" in cfg.explicit or cfg.submit.instance not in INSTANCES:
        return c.gpus_per_node
    return INSTANCES[cfg.submit.instance][1]


def world_size(cfg: RunConfig) -> int:
    """Ranks of the job: the hostfile's slots when there is one, else nodes x GPUs per node."""
    if cfg.cluster.hostfile:
        return read_hostfile(cfg.cluster.hostfile).slots or 1
    return cfg.cluster.nodes * gpus_per_node(cfg)


def load_for_cluster(
    argv: list[str], check_files: bool = False, as_entry: bool = False
) -> tuple[RunConfig, list[str]]:
    """The config checked for the world size the cluster section describes (read in a first pass), for GPUs; with
    `as_entry` (launch/doctor.py, on a node of the run), checked as the run of submit.entry checks it here: its
    output folder, its resume, its default output_dir."""
    first, _ = collect_config(argv, 1, "cuda", check_files)
    task = task_of(first.submit.entry) if as_entry else None
    return collect_config(argv, world_size(first), "cuda", check_files, task=task)


def submit_problems(cfg: RunConfig) -> list[str]:
    c, s, p = cfg.cluster, cfg.submit, []
    if not (ROOT / s.entry).is_file() and not Path(s.entry).is_file():
        p.append(
            f"submit.entry: {s.entry!r} is not a script of this checkout (launch/mlm.py, launch/classify.py, ...)"
        )
    if s.scheduler == "pdsh":
        if not c.hostfile:
            p.append("cluster.hostfile: a pdsh launch needs a hostfile (see hostfiles/)")
        else:
            hostfile = read_hostfile(c.hostfile)
            p += [f"cluster.hostfile: {problem}" for problem in hostfile.problems]
            if "cluster.nodes" in cfg.explicit and hostfile.hosts and len(hostfile.hosts) != c.nodes:
                p.append(f"cluster.nodes: {c.nodes} but {c.hostfile} lists {len(hostfile.hosts)} hosts")
        p += [
            f"cluster.env: the value of {name} holds $, `, \", \\ or a line break, which DeepSpeed's pdsh launcher "
            "would pass to the remote shell unquoted; set it on the nodes instead"
            for name in carried_names(c.env)
            if PDSH_UNSAFE.search(os.environ.get(name, ""))
        ]
    elif s.scheduler == "slurm" and not SAFE_PATH.match(str(job_folder(cfg))):
        p.append(
            f"output_dir: {job_folder(cfg)} holds characters an #SBATCH --output line cannot take (it is not "
            "shell-quoted); choose a path of letters, digits and ._-/ or set submit.out"
        )
    if s.scheduler != "pdsh" and c.hostfile:
        p.append(
            f"cluster.hostfile: only a pdsh launch reads it; {s.scheduler} jobs make theirs from the allocation "
            "(give cluster.nodes and cluster.gpus_per_node instead)"
        )
    if s.scheduler == "skypilot" and not cluster_gpu(cfg):
        p.append("cluster.gpu: SkyPilot needs the GPU type (or a known submit.instance) to pick machines")
    return p


def job_folder(cfg: RunConfig) -> Path:
    """Where the job files go (absolute: the SLURM script writes its log and hostfile there)."""
    return Path(cfg.submit.out or Path(cfg.output_dir) / "submit").resolve()


def _q(value) -> str:
    return shlex.quote(str(value))


def _workdir(cfg: RunConfig) -> str:
    return cfg.submit.workdir or str(ROOT)


def _activate(cfg: RunConfig) -> list[str]:
    script = _q(str(Path(cfg.submit.venv) / "bin" / "activate"))
    return [
        f'if [ -f {script} ]; then . {script}; else echo "dapt job: no virtual environment at {cfg.submit.venv} '
        '(submit.venv); running $(command -v python3)" >&2; fi'
    ]


def notes(cfg: RunConfig) -> list[str]:
    """What the job takes from this machine that a user would want to know of: variables of this shell that change
    what the job does (HF_HUB_OFFLINE=1: no download on the nodes), and a virtual environment that is not there."""
    said = []
    offline = [
        n for n in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE") if os.environ.get(n)
    ]
    carried = [n for n in carried_names(cfg.cluster.env) if n in os.environ]
    if carried:
        said.append(
            f"carried into the job from this shell: {', '.join(carried)} (HF_*, WANDB_* and cluster.env)"
        )
    for name in offline:
        if name in carried and os.environ[name].lower() in ("1", "true", "yes"):
            said.append(
                f"{name}={os.environ[name]} goes with the job: its nodes will not download models or data from the "
                f"hub (unset {name} before launch/submit.py if they should)"
            )
    venv = (
        Path(_workdir(cfg)) / cfg.submit.venv
        if not Path(cfg.submit.venv).is_absolute()
        else Path(cfg.submit.venv)
    )
    if not cfg.submit.workdir and not (venv / "bin" / "activate").is_file():
        said.append(
            f"no virtual environment at {venv} (submit.venv): the job runs the nodes' own python3, which needs dapt "
            "installed; set submit.venv to the environment that has it"
        )
    return said


def _exports(cfg: RunConfig) -> list[str]:
    """export lines for the carried variables: values for plain ones, a presence check for secrets."""
    lines = []
    for name in carried_names(cfg.cluster.env):
        if is_secret(name):
            lines.append(
                f': "${{{name}:?{name} is not set: export it where the job starts (dapt writes no secret '
                'into job files)}"'
            )
            lines.append(f"export {name}")
        elif name in os.environ:
            lines.append(f"export {name}={_q(os.environ[name])}")
        else:
            lines.append(f"# {name} (cluster.env) is not set in the shell that rendered this job")
    lines += [
        f"export {k}={_q(v)}  # {cluster_gpu(cfg)}: no reliable GPU peer-to-peer"
        for k, v in nccl_settings(cluster_gpu(cfg)).items()
    ]
    return lines


def _train(cfg: RunConfig, argv: list[str]) -> str:
    return shlex.join([cfg.submit.entry, *job_args(argv)])


def _header(cfg: RunConfig, world: int) -> list[str]:
    c = cfg.cluster
    shape = (
        f"{len(read_hostfile(c.hostfile).hosts)} hosts of {c.hostfile}"
        if c.hostfile
        else f"{c.nodes} nodes x {gpus_per_node(cfg)} ranks"
    )
    return [
        f"# dapt job {cfg.submit.job_name}: {shape} = world size {world}, written by launch/submit.py (every "
        "value quoted; edit with care)"
    ]


def render_slurm(cfg: RunConfig, argv: list[str], world: int, out: Path) -> str:
    c, s = cfg.cluster, cfg.submit
    directives = [
        f"--job-name={s.job_name}",
        f"--nodes={c.nodes}",
        "--ntasks-per-node=1",
        f"--time={s.time}",
        f"--output={out}/slurm-%j.out",
        "--signal=TERM@300",
    ]
    if c.gpu != "cpu":
        directives.append(f"--gpus-per-node={gpus_per_node(cfg)}")
    directives += [
        f"--{k}={v}"
        for k, v in (("partition", s.partition), ("account", s.account), ("cpus-per-task", s.cpus_per_node))
        if v
    ]
    master = f"MASTER_ADDR={_q(c.master_addr)}" if c.master_addr else 'MASTER_ADDR="$(head -n 1 <<<"$nodes")"'
    node = f"{LAUNCH} {_train(cfg, argv)}".replace('"$NODE_RANK"', '"$SLURM_NODEID"')
    return "\n".join(
        [
            "#!/bin/bash",
            *_header(cfg, world),
            *[f"#SBATCH {d}" for d in directives],
            "# --signal: SIGTERM 5 minutes before the time limit; dapt finishes the step, checkpoints and exits, and the",
            "# same sbatch command resumes from there.",
            "",
            "set -euo pipefail",
            f"cd -- {_q(_workdir(cfg))}",
            *_activate(cfg),
            *_exports(cfg),
            'nodes="$(scontrol show hostnames "$SLURM_JOB_NODELIST")"',
            f"export {master}",
            f"export MASTER_PORT={c.master_port}",
            f'export hostfile={_q(out)}/"hostfile.$SLURM_JOB_ID"  # on the shared file system, like output_dir',
            f'awk \'{{print $1 " slots={gpus_per_node(cfg)}"}}\' <<<"$nodes" > "$hostfile"',
            "# one task per node, each running the DeepSpeed launcher for that node's ranks",
            f'srun --nodes="$SLURM_NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c {_q(node)}',
            "",
        ]
    )


def render_nodes(cfg: RunConfig, argv: list[str], world: int) -> str:
    c = cfg.cluster
    n, g = c.nodes, gpus_per_node(cfg)
    master = (
        f'export MASTER_ADDR="${{MASTER_ADDR:-{c.master_addr}}}"'
        if c.master_addr
        else ': "${MASTER_ADDR:?set MASTER_ADDR to the address of node 0}"'
    )
    return "\n".join(
        [
            "#!/usr/bin/env bash",
            *_header(cfg, world),
            f"# Run this same script on each node with NODE_RANK=0..{n - 1} and MASTER_ADDR=<address of node 0>",
            f"# (MASTER_PORT: {c.master_port} unless set), e.g.  NODE_RANK=0 MASTER_ADDR=10.0.0.1 bash node.sh",
            "",
            "set -euo pipefail",
            ': "${NODE_RANK:?set NODE_RANK to the rank of this node}"',
            f'if ! [[ "$NODE_RANK" =~ ^[0-9]+$ ]] || (( NODE_RANK >= {n} )); then',
            f'  echo "NODE_RANK=$NODE_RANK: this job has {n} nodes, ranks 0..{n - 1}" >&2; exit 2',
            "fi",
            master,
            f'export MASTER_PORT="${{MASTER_PORT:-{c.master_port}}}"',
            f"cd -- {_q(_workdir(cfg))}",
            *_activate(cfg),
            *_exports(cfg),
            'hostfile="$(mktemp)"',
            "trap 'rm -f \"$hostfile\"' EXIT",
            f'for i in $(seq 0 {n - 1}); do echo "node$i slots={g}"; done > "$hostfile"  # --no_ssh: names unused',
            f"{LAUNCH} {_train(cfg, argv)}",
            "",
        ]
    )


def render_skypilot(cfg: RunConfig, argv: list[str], world: int) -> str:
    c, s = cfg.cluster, cfg.submit
    g = gpus_per_node(cfg)
    resources = {"accelerators": f"{BY_NAME[cluster_gpu(cfg)].skypilot}:{g}"}
    resources |= {k: v for k, v in (("instance_type", s.instance), ("infra", s.cloud)) if v}
    if s.use_spot:
        resources["use_spot"] = True
    envs = {n: os.environ[n] for n in carried_names(c.env) if not is_secret(n) and n in os.environ}
    envs |= nccl_settings(cluster_gpu(cfg)) | {"MASTER_PORT": str(c.master_port)}
    secrets = {n: None for n in carried_names(c.env) if is_secret(n)}
    venv = _q(s.venv)
    master = (
        f"MASTER_ADDR={_q(c.master_addr)}"
        if c.master_addr
        else 'MASTER_ADDR="$(echo "$SKYPILOT_NODE_IPS" | head -n 1)"'
    )
    run = "\n".join(
        [
            "set -euo pipefail",
            *_activate(cfg),
            f"export {master}",
            'export NODE_RANK="$SKYPILOT_NODE_RANK"',
            'hostfile="$(mktemp)"',
            f'echo "$SKYPILOT_NODE_IPS" | awk \'NF {{print $1 " slots={g}"}}\' > "$hostfile"',
            f"{LAUNCH} {_train(cfg, argv)}",
            "",
        ]
    )
    # workdir: a folder on this machine that SkyPilot syncs to every node (this checkout unless given)
    task = {"name": s.job_name, "num_nodes": c.nodes, "resources": resources, "workdir": _workdir(cfg)}
    task |= {"envs": envs} | ({"secrets": secrets} if secrets else {})
    task["setup"] = f"python3 -m venv {venv}\n{venv}/bin/pip install -e .\n"
    task["run"] = run
    head = "\n".join(
        _header(cfg, world)
        + [f"# sky launch -c {s.job_name} task.yaml" + "".join(f" --secret {n}" for n in secrets), ""]
    )
    return head + yaml.dump(task, Dumper=_BlockDumper, sort_keys=False)


def render_pdsh(cfg: RunConfig, argv: list[str], world: int, env_file: Path) -> str:
    c = cfg.cluster
    launcher = ["deepspeed", "--hostfile", c.hostfile, "--master_port", str(c.master_port)]
    if c.master_addr:
        launcher += ["--master_addr", c.master_addr]
    return "\n".join(
        [
            "#!/usr/bin/env bash",
            *_header(cfg, world),
            "# DeepSpeed's ssh launch: run on the first host; every host needs passwordless ssh and pdsh. The variables",
            f"# DeepSpeed would not forward are in {env_file.name} (DS_ENV_FILE).",
            "",
            "set -euo pipefail",
            f"cd -- {_q(_workdir(cfg))}",
            *_activate(cfg),
            f"export DS_ENV_FILE={_q(env_file)}",
            f"{shlex.join(launcher)} {_train(cfg, argv)}",
            "",
        ]
    )


def deepspeed_env(cfg: RunConfig) -> str:
    """KEY=VALUE lines of DeepSpeed's env file: no comments or blank lines, which its reader cannot take."""
    pairs = {n: os.environ[n] for n in carried_names(cfg.cluster.env) if n in os.environ}
    pairs |= nccl_settings(cluster_gpu(cfg))
    return "".join(f"{k}={v}\n" for k, v in pairs.items())


class _BlockDumper(yaml.SafeDumper):
    """Multi-line strings (setup, run) as readable `|` blocks."""


_BlockDumper.add_representer(
    str, lambda d, v: d.represent_scalar("tag:yaml.org,2002:str", v, style="|" if "\n" in v else None)
)


def render(cfg: RunConfig, argv: list[str]) -> dict[str, str]:
    """The job's files, by name."""
    s, world, out = cfg.submit, world_size(cfg), job_folder(cfg)
    name = FILES[s.scheduler]
    if s.scheduler == "slurm":
        return {name: render_slurm(cfg, argv, world, out)}
    if s.scheduler == "nodes":
        return {name: render_nodes(cfg, argv, world)}
    if s.scheduler == "skypilot":
        return {name: render_skypilot(cfg, argv, world)}
    return {name: render_pdsh(cfg, argv, world, out / "deepspeed_env"), "deepspeed_env": deepspeed_env(cfg)}


NEXT = {
    "slurm": "sbatch {path}",
    "skypilot": "sky launch -c {name} {path}",
    "nodes": "on node i: NODE_RANK=i MASTER_ADDR=<node 0> bash {path}",
    "pdsh": "bash {path}",
}


def checked_config(argv: list[str]) -> RunConfig:
    cfg, problems = load_for_cluster(argv)
    problems += submit_problems(cfg)
    if problems:
        raise ConfigError(problems)
    return cfg


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 written (or printed), 2 configuration error (nothing written)."""
    argv = [
        "--submit.dry_run=true" if a == "--dry_run" else a for a in (sys.argv[1:] if argv is None else argv)
    ]
    cfg, code = front_door(argv, "launch/submit.py", lambda: checked_config(argv))
    if cfg is None:
        return code
    files, s = render(cfg, argv), cfg.submit
    t, world = cfg.train, world_size(cfg)
    summary = (
        f"{s.scheduler} job {s.job_name}: world size {world}, global batch = {t.micro_batch_size} x "
        f"{t.grad_accum} x {world} = {t.micro_batch_size * t.grad_accum * world} rows"
    )
    if s.dry_run:
        for name, text in files.items():  # the pdsh env file may hold secrets: shown masked
            print(f"# ---- {name} ----\n{redact_text(text)}")
        print(f"# {summary} (dry run: nothing written)")
        for note in notes(cfg):
            print(f"# note: {note}")
        return 0
    out = job_folder(cfg)
    out.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        path = out / name
        path.write_text(text)
        path.chmod(
            0o600
            if name == "deepspeed_env"
            else 0o755
            if name.endswith(".sh") or name.endswith(".sbatch")
            else 0o644
        )
    main_file = out / FILES[s.scheduler]
    print(
        f"{summary}\nwrote {', '.join(str(out / n) for n in files)}\nnext: "
        + NEXT[s.scheduler].format(path=main_file, name=s.job_name)
    )
    for note in notes(cfg):
        print(f"note: {note}")
    return 0
