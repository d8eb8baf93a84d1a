"""Documents to embeddings for launch/embed.py and launch/anomaly.py: the encoder, the splits (train, valid as the
hash split of train when data.valid is not given, test), and rank-parallel pooled embeddings."""

from __future__ import annotations

from collections import Counter

import numpy as np
import torch

from dapt.config.schema import BadInput, RunConfig
from dapt.data.formats import Document
from dapt.data.labelled import padded, read_labelled
from dapt.data.packing import pack
from dapt.data.sources import expand
from dapt.data.stream import in_valid_split
from dapt.runtime import group


@torch.no_grad()
def embed_documents(
    model, tokenizer, docs: list[Document], max_len: int, batch: int, pooling: str, device
) -> np.ndarray:
    """(n, hidden) embeddings; each rank embeds rows r, r+W, ...; every rank returns the whole array."""
    rows = pack("pad", tokenizer, [d.text for d in docs], [d.id for d in docs], max_len)
    rank, world = group.rank(), group.world()
    mine = list(range(rank, len(rows), world))
    pad = tokenizer.pad_token_id or 0
    out = []
    for start in range(0, len(mine), batch):
        idx = mine[start : start + batch]
        ids, mask = padded([rows[i].ids for i in idx], pad)
        hidden = model(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state.float()
        if pooling == "cls":
            vec = hidden[:, 0]
        else:
            m = mask.to(device).unsqueeze(-1).float()
            vec = (hidden * m).sum(1) / m.sum(1)
        out += list(zip(idx, vec.cpu().numpy()))
    emb = np.zeros((len(rows), model.config.hidden_size), dtype=np.float32)
    for part in group.gather(out):
        for i, v in part:
            emb[i] = v
    return emb


def load_encoder(cfg: RunConfig, device):
    """The encoder (transformers' AutoModel) of a hub id, a folder, or a dapt output's final/ (MLM or classifier
    heads are dropped), built by the one model builder, in evaluation mode on `device`."""
    from dapt.model.build import build_model, pretrained_tokenizer

    source = cfg.model.name_or_path
    if not source:
        raise BadInput(
            "model.name_or_path is required: the encoder to embed with (a hub id, a folder, or a dapt "
            "run's final/)"
        )
    tokenizer = pretrained_tokenizer(cfg.model)
    model = build_model(cfg, tokenizer, "fp32", task="encoder")
    return model.to(device).eval(), tokenizer


class NoMLMHead(BadInput):
    """The model has no trained MLM head, so it cannot score MLM surprise."""


def load_masked_lm(cfg: RunConfig, device):
    """The *ForMaskedLM of model.name_or_path and its tokenizer, in evaluation mode on `device`, for MLM surprise.

    Raises:
        ValueError: the checkpoint has no trained MLM head (an encoder such as all-MiniLM-L6-v2, or a classifier):
            its surprise would come from random weights.
    """
    from transformers import AutoModelForMaskedLM

    from dapt.model.build import pretrained_tokenizer
    from dapt.model.hub import from_config

    m = cfg.model
    if not m.name_or_path:
        raise BadInput(
            "model.name_or_path is required: the MLM to score with (a dapt MLM run's final/, a hub id)"
        )
    tokenizer = pretrained_tokenizer(m)
    if tokenizer.mask_token_id is None:
        raise NoMLMHead(
            f"model.name_or_path: the tokenizer of {m.name_or_path} has no mask token: MLM surprise needs one"
        )
    model, info = from_config(
        AutoModelForMaskedLM.from_pretrained, m, dtype=torch.float32, output_loading_info=True
    )
    prefix = model.base_model_prefix + "."
    untrained = [k for k in info["missing_keys"] if not k.startswith(prefix)]
    if untrained:
        raise NoMLMHead(
            f"model.name_or_path: {m.name_or_path} has no trained MLM head ({len(untrained)} head weights missing, "
            f"e.g. {sorted(untrained)[0]}), so MLM surprise would come from random weights; adapt it first with "
            "launch/mlm.py (which trains the head) and score its final/, or leave mlm out (embed.score=mahalanobis, "
            "knn or lexical, embed.fuse without mlm)"
        )
    return model.to(device).eval(), tokenizer


def splits_of(cfg: RunConfig, skipped: Counter, labelled: bool) -> dict[str, list[Document]]:
    """train / valid / test documents; valid is the hash split of train when data.valid is not given."""
    d = cfg.data
    read = (
        (lambda sources: list(read_labelled(cfg, sources, skipped)))
        if labelled
        else (lambda sources: read_unlabelled(cfg, sources, skipped))
    )
    out = {"train": read(d.train)}
    if d.valid:
        out["valid"] = read(d.valid)
    elif d.valid_fraction:
        out["valid"] = [x for x in out["train"] if in_valid_split(x.text, d.valid_fraction)]
        out["train"] = [x for x in out["train"] if not in_valid_split(x.text, d.valid_fraction)]
    if d.test:
        out["test"] = read(d.test)
    return out


def read_unlabelled(cfg: RunConfig, sources: list[str], skipped: Counter) -> list[Document]:
    """Every document of `sources` without labels, at most data.max_records_per_file of each file."""
    from dapt.data.prepare import format_options, read_documents

    d = cfg.data
    return [
        doc
        for url in expand(sources, d.format)
        for doc in read_documents(
            [url],
            d.format,
            on_error=d.on_error,
            skipped=skipped,
            options=format_options(d),
            limit=d.max_records_per_file,
        )
    ]


def has_labels(cfg: RunConfig) -> bool:
    return cfg.data.format in ("jsonl", "csv", "tsv", "parquet", "arrow") and bool(cfg.classify.label_field)
