"""Metrics apart from text logs: metrics.jsonl always, W&B and TensorBoard when asked, curves as PNG at the end. Rank 0
only."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from dapt.config.redact import redact

log = logging.getLogger("dapt")


class MetricsLogger:
    """Appends one JSON object per event to metrics.jsonl and mirrors it to W&B and TensorBoard; a no-op off rank 0."""

    def __init__(
        self,
        output_dir: Path,
        active: bool,
        wandb_cfg: dict | None = None,
        run_config: dict | None = None,
        tensorboard: bool = False,
        start_step: int = 0,
    ):
        self.path = Path(output_dir) / "metrics.jsonl"
        self.active = active
        self.wandb = None
        self.tensorboard = None
        if active and wandb_cfg:
            self.wandb = _start_wandb(output_dir, redact(wandb_cfg), redact(run_config or {}))
        if active and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # a new event file whose purge step hides the steps after N of earlier files: a resumed run (from step N)
            # repeats them, and so does a rerun from the start (N = 0) of a run killed before its first checkpoint
            self.tensorboard = SummaryWriter(str(Path(output_dir) / "tensorboard"), purge_step=start_step + 1)

    def truncate_after(self, step: int) -> None:
        """On resume, drop events past the checkpoint's step so the file lists one history, not two."""
        if not self.active or not self.path.exists():
            return
        keep = [
            line
            for line in self.path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step
        ]
        self.path.write_text("".join(line + "\n" for line in keep))

    def log(self, step: int, values: dict) -> None:
        if not self.active:
            return
        record = {"step": step, **{k: _number(v) for k, v in values.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log(values, step=step)
        if self.tensorboard is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, int | float) and not isinstance(value, bool):
                    self.tensorboard.add_scalar(key, value, step)

    def finish(self, summary: dict | None = None) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None
        if self.wandb is not None:
            if summary:
                self.wandb.summary.update(
                    {k: v for k, v in summary.items() if isinstance(v, int | float | str)}
                )
            self.wandb.finish()
            self.wandb = None


def _number(v):
    return float(v) if hasattr(v, "item") else v


def _start_wandb(output_dir: Path, wandb_cfg: dict, run_config: dict):
    try:
        import wandb
    except ImportError:
        log.warning("log.wandb=true but wandb is not installed; metrics go to metrics.jsonl only")
        return None
    os.environ.setdefault("WANDB_DIR", str(output_dir))
    if "WANDB_MODE" not in os.environ and not _wandb_credentials():
        # Online mode without credentials would stop at an interactive login prompt; a batch job must not.
        log.warning(
            "log.wandb=true but no W&B credentials (WANDB_API_KEY or ~/.netrc): logging offline; "
            "upload later with `wandb sync %s/wandb`",
            output_dir,
        )
        os.environ["WANDB_MODE"] = "offline"
    run = wandb.init(
        project=wandb_cfg["project"],
        name=wandb_cfg.get("name"),
        config=run_config,
        resume="allow",
        id=wandb_cfg.get("id"),
        dir=str(output_dir),
    )
    log.info("W&B run %s (mode %s)", run.name, os.environ.get("WANDB_MODE", "online"))
    return run


def _wandb_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_curves(metrics_path: Path, out_dir: Path) -> list[Path]:
    """loss.png (train and eval), learning_rate.png and perplexity.png from metrics.jsonl."""
    from dapt.runtime.plots import pyplot

    plt = pyplot()
    records = read_metrics(metrics_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = {
        "loss": [("train/loss", "train"), ("eval/loss", "eval")],
        "learning_rate": [("train/learning_rate", "learning rate")],
        "perplexity": [("train/perplexity", "train"), ("eval/perplexity", "eval")],
    }
    written = []
    for name, series in figures.items():
        fig, ax = plt.subplots(figsize=(6, 3.5))
        drawn = False
        for key, label in series:
            points = [(r["step"], r[key]) for r in records if key in r]
            if points:
                ax.plot(
                    *zip(*points), marker="o" if key.startswith("eval") else None, markersize=3, label=label
                )
                drawn = True
        if drawn:
            ax.set_xlabel("optimizer step")
            ax.set_ylabel(name.replace("_", " "))
            if name == "perplexity":
                ax.set_yscale("log")
            ax.legend()
            ax.grid(alpha=0.3)
            fig.tight_layout()
            fig.savefig(out_dir / f"{name}.png", dpi=110)
            written.append(out_dir / f"{name}.png")
        plt.close(fig)
    return written
