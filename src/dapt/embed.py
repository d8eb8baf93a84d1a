"""Embeddings of a dataset (launch/embed.py) and Mahalanobis anomaly detection on them (launch/anomaly.py).

Seed 000's protocol: fit a Gaussian (mean, shrinkage covariance) on embeddings of normal training traffic, set the
threshold on normal validation data for a maximum false-positive rate (5% by default), and report the recall of
attacks at that threshold, the false-positive rate reached on normal test data, and AUROC.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from dapt import dist
from dapt.classify import labelled_documents
from dapt.config import RunConfig
from dapt.data import in_valid_split
from dapt.formats import Document
from dapt.packing import pack
from dapt.sources import expand

log = logging.getLogger("dapt")


# ---------------------------------------------------------------- embeddings

@torch.no_grad()
def embed_documents(model, tokenizer, docs: list[Document], max_len: int, batch: int, pooling: str,
                    device) -> np.ndarray:
    """(n, hidden) embeddings; each rank embeds rows r, r+W, ...; every rank returns the whole array."""
    rows = pack("pad", tokenizer, [d.text for d in docs], [d.id for d in docs], max_len)
    rank, world = dist.rank(), dist.world()
    mine = list(range(rank, len(rows), world))
    pad = tokenizer.pad_token_id or 0
    out = []
    for start in range(0, len(mine), batch):
        idx = mine[start:start + batch]
        width = max(len(rows[i].ids) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for j, i in enumerate(idx):
            ids[j, :len(rows[i].ids)] = torch.from_numpy(rows[i].ids)
            mask[j, :len(rows[i].ids)] = 1
        hidden = model(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state.float()
        if pooling == "cls":
            vec = hidden[:, 0]
        else:
            m = mask.to(device).unsqueeze(-1).float()
            vec = (hidden * m).sum(1) / m.sum(1)
        out += list(zip(idx, vec.cpu().numpy()))
    emb = np.zeros((len(rows), model.config.hidden_size), dtype=np.float32)
    for part in dist.gather(out):
        for i, v in part:
            emb[i] = v
    return emb


def load_encoder(cfg: RunConfig, device):
    """AutoModel from a hub id, a folder, or a dapt output's final/ (MLM or classifier heads are dropped)."""
    from transformers import AutoModel, AutoTokenizer

    import dapt.canine  # noqa: F401  (so a dapt CANINE folder loads)
    from dapt.hub import pretrained

    source = cfg.model.name_or_path
    if not source:
        raise ValueError("model.name_or_path is required: the encoder to embed with (a hub id, a folder, or a dapt "
                         "run's final/)")
    tokenizer = pretrained(AutoTokenizer.from_pretrained, cfg.model.tokenizer or source,
                           "model.tokenizer" if cfg.model.tokenizer else "model.name_or_path")
    model = pretrained(AutoModel.from_pretrained, source, trust_remote_code=cfg.model.trust_remote_code)
    model = model.to(device).eval()
    return model, tokenizer


def _device():
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def splits_of(cfg: RunConfig, skipped: Counter, labelled: bool) -> dict[str, list[Document]]:
    """train / valid / test documents; valid is the hash split of train when data.valid is not given."""
    d = cfg.data
    read = (lambda sources: labelled_documents(cfg, sources, skipped)) if labelled else (
        lambda sources: _unlabelled(cfg, sources, skipped))
    out = {"train": read(d.train)}
    if d.valid:
        out["valid"] = read(d.valid)
    elif d.valid_fraction:
        out["valid"] = [x for x in out["train"] if in_valid_split(x.text, d.valid_fraction)]
        out["train"] = [x for x in out["train"] if not in_valid_split(x.text, d.valid_fraction)]
    if d.test:
        out["test"] = read(d.test)
    return out


def _unlabelled(cfg: RunConfig, sources: list[str], skipped: Counter) -> list[Document]:
    from dapt.data import format_options, read_documents

    d = cfg.data
    return [doc for url in expand(sources) for doc in read_documents(
        [url], d.format, on_error=d.on_error, skipped=skipped, options=format_options(d), limit=d.max_records_per_file)]


def run_embed(cfg: RunConfig) -> dict:
    """Write output_dir/embeddings_<split>.npz (embeddings, ids, labels) for data.train / valid / test."""
    dist.init()
    device = _device()
    model, tokenizer = load_encoder(cfg, device)
    labelled = bool(cfg.classify.label_files) or _has_labels(cfg)
    skipped: Counter = Counter()
    out = Path(cfg.output_dir)
    written = {}
    for split, docs in splits_of(cfg, skipped, labelled).items():
        emb = embed_documents(model, tokenizer, docs, cfg.data.max_seq_length, cfg.train.micro_batch_size,
                              cfg.embed.pooling, device)
        if dist.rank() == 0:
            out.mkdir(parents=True, exist_ok=True)
            path = out / f"embeddings_{split}.npz"
            np.savez(path, embeddings=emb, ids=np.array([d.id for d in docs]),
                     labels=np.array([d.label if d.label is not None else "" for d in docs]))
            written[split] = str(path)
            log.info("embedded %d %s documents (%s pooling, dimension %d) -> %s", len(docs), split,
                     cfg.embed.pooling, emb.shape[1], path)
    dist.barrier()
    return {"files": written, "skipped_records": dict(skipped)}


def _has_labels(cfg: RunConfig) -> bool:
    return cfg.data.format in ("jsonl", "csv", "tsv", "parquet") and bool(cfg.classify.label_field)


# ---------------------------------------------------------------- Mahalanobis detector

class Mahalanobis:
    """Squared Mahalanobis distance to a Gaussian fitted with a shrunk covariance."""

    def __init__(self, shrinkage: str = "ledoit_wolf"):
        self.shrinkage = shrinkage

    def fit(self, x: np.ndarray) -> Mahalanobis:
        from sklearn.covariance import LedoitWolf, ShrunkCovariance

        x = x.astype(np.float64)
        est = LedoitWolf() if self.shrinkage == "ledoit_wolf" else ShrunkCovariance(shrinkage=float(self.shrinkage))
        est.fit(x)
        self.mean, self.precision = est.location_, est.precision_
        self.coefficient = float(getattr(est, "shrinkage_", self.shrinkage))
        return self

    def score(self, x: np.ndarray) -> np.ndarray:
        centred = x.astype(np.float64) - self.mean
        return np.einsum("ij,jk,ik->i", centred, self.precision, centred)


def threshold_for(normal_scores: np.ndarray, max_fpr: float) -> float:
    """The smallest threshold that flags at most max_fpr of the given normal scores (score > threshold = anomaly)."""
    ranked = np.sort(normal_scores)
    allowed = int(np.floor(max_fpr * len(ranked)))  # how many normal points may score above the threshold
    return float(ranked[len(ranked) - allowed - 1])


def evaluate_detector(scores: np.ndarray, is_anomaly: np.ndarray, threshold: float) -> dict:
    from sklearn.metrics import roc_auc_score, roc_curve

    flagged = scores > threshold
    result = {"recall_at_max_fpr": float(flagged[is_anomaly].mean()) if is_anomaly.any() else None,
              "test_fpr": float(flagged[~is_anomaly].mean()) if (~is_anomaly).any() else None,
              "threshold": threshold}
    if is_anomaly.any() and (~is_anomaly).any():
        result["auroc"] = float(roc_auc_score(is_anomaly, scores))
        fpr, tpr, _ = roc_curve(is_anomaly, scores)
        result["roc_curve"] = {"fpr": fpr.tolist(), "tpr": tpr.tolist()}
    return result


def plot_roc(result: dict, max_fpr: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot(result["roc_curve"]["fpr"], result["roc_curve"]["tpr"], label=f"AUROC {result['auroc']:.3f}")
    ax.axvline(max_fpr, color="grey", linestyle="--", label=f"max FPR {max_fpr:g}")
    ax.plot([0, 1], [0, 1], color="lightgrey", linewidth=0.8)
    ax.set_xlabel("false-positive rate")
    ax.set_ylabel("recall (true-positive rate)")
    ax.legend(loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_anomaly(cfg: RunConfig) -> dict:
    """Embed, fit on normal training documents, threshold on normal validation ones, report on test."""
    dist.init()
    e = cfg.embed
    device = _device()
    model, tokenizer = load_encoder(cfg, device)
    skipped: Counter = Counter()
    splits = splits_of(cfg, skipped, labelled=True)
    for name in ("valid", "test"):
        if name not in splits:
            raise ValueError(f"anomaly detection needs {name} data (data.{name}, or data.valid_fraction for valid)")
    normal = {k: [d for d in v if d.label == e.normal_label] for k, v in splits.items()}
    if not normal["train"] or not normal["valid"]:
        raise ValueError(f"no training or validation documents with the normal label {e.normal_label!r}")

    def emb(docs):
        return embed_documents(model, tokenizer, docs, cfg.data.max_seq_length, cfg.train.micro_batch_size,
                               e.pooling, device)

    detector = Mahalanobis(e.shrinkage).fit(emb(normal["train"]))
    threshold = threshold_for(detector.score(emb(normal["valid"])), e.max_fpr)
    test = splits["test"]
    result = evaluate_detector(detector.score(emb(test)), np.array([d.label != e.normal_label for d in test]),
                               threshold)
    result |= {"max_fpr": e.max_fpr, "pooling": e.pooling, "shrinkage": detector.coefficient,
               "train_normal": len(normal["train"]), "valid_normal": len(normal["valid"]), "test": len(test),
               "skipped_records": dict(skipped), "model": cfg.model.name_or_path}
    if dist.rank() == 0:
        out = Path(cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "anomaly.json").write_text(json.dumps(result, indent=1))
        if "auroc" in result:
            plot_roc(result, e.max_fpr, out / "plots" / "roc.png")
        log.info("anomaly detection: recall %.4f at max FPR %g (test FPR %.4f), AUROC %s -> %s",
                 result["recall_at_max_fpr"] or 0.0, e.max_fpr, result["test_fpr"] or 0.0,
                 f"{result['auroc']:.4f}" if "auroc" in result else "n/a", out / "anomaly.json")
    dist.barrier()
    return result
