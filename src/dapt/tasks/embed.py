"""launch/embed.py: embeddings of a dataset (data.train / valid / test) with an encoder, to .npz files."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import numpy as np

from dapt.config.schema import RunConfig
from dapt.data.embedding import embed_documents, has_labels, load_encoder, splits_of
from dapt.runtime import group
from dapt.runtime.runner import start

log = logging.getLogger("dapt")


def run(cfg: RunConfig) -> dict:
    """Write output_dir/embeddings_<split>.npz (embeddings, ids, labels) for data.train / valid / test."""
    device = start(cfg).device
    model, tokenizer = load_encoder(cfg, device)
    labelled = bool(cfg.classify.label_files) or has_labels(cfg)
    skipped: Counter = Counter()
    out = Path(cfg.output_dir)
    written = {}
    for split, docs in splits_of(cfg, skipped, labelled).items():
        emb = embed_documents(
            model,
            tokenizer,
            docs,
            cfg.data.max_seq_length,
            cfg.train.micro_batch_size,
            cfg.embed.pooling,
            device,
        )
        if group.rank() == 0:
            out.mkdir(parents=True, exist_ok=True)
            path = out / f"embeddings_{split}.npz"
            np.savez(
                path,
                embeddings=emb,
                ids=np.array([d.id for d in docs]),
                labels=np.array([d.label if d.label is not None else "" for d in docs]),
            )
            written[split] = str(path)
            log.info(
                "embedded %d %s documents (%s pooling, dimension %d) -> %s",
                len(docs),
                split,
                cfg.embed.pooling,
                emb.shape[1],
                path,
            )
    group.barrier()
    return {"files": written, "skipped_records": dict(skipped)}
