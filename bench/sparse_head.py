"""Sparse MLM prediction against the dense head, side by side in one process.

    python bench/sparse_head.py [--steps 20] [--seq 128] [--batch 16]

A MiniLM-size encoder (6 layers, hidden 384, 12 heads, vocabulary 30522: all-MiniLM-L6-v2's shape, built from a
config) takes forward + backward steps on the same random batches with 15% of the positions masked, alternating
dense and sparse steps so that both see the same machine state. Reports the time per step, real tokens/s and
the ratio, with the analytic share of the head in the dense model's FLOPs. fp32 on CPU, bf16 on a GPU.

Writes bench/results/sparse_head.json (bench/results/sparse_head_<gpu>.json on a GPU) and prints it on one line.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from common import machine, write_result
from transformers import BertConfig, BertForMaskedLM

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from dapt.model.sparse import SparsePrediction  # noqa: E402

IGNORE = -100


def flops_share_of_head(c: BertConfig, seq: int) -> float:
    """Forward FLOPs per token of the head (transform + projection) over those of the whole dense model."""
    h, layers = c.hidden_size, c.num_hidden_layers
    per_layer = 2 * (4 * h * h + 2 * h * c.intermediate_size) + 2 * 2 * seq * h  # projections + attention
    head = 2 * (h * h + h * c.vocab_size)
    return head / (layers * per_layer + head)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--mask", type=float, default=0.15)
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=384,
        num_hidden_layers=6,
        num_attention_heads=12,
        intermediate_size=1536,
        max_position_embeddings=512,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(0)
    model = BertForMaskedLM(config).to(device=device, dtype=dtype).train()
    sparse = SparsePrediction(model)
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(4):
        ids = torch.randint(1000, config.vocab_size, (args.batch, args.seq), generator=g)
        labels = torch.where(
            torch.rand(ids.shape, generator=g) < args.mask, ids, torch.full_like(ids, IGNORE)
        )
        batches.append((ids.to(device), labels.to(device)))

    def step(kind: str, ids, labels) -> float:
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        where = labels != IGNORE
        if kind == "dense":
            logits = model(input_ids=ids).logits
            loss = F.cross_entropy(logits[where].float(), labels[where], reduction="sum")
        else:
            with sparse.select(where):
                logits = model(input_ids=ids).logits
            loss = F.cross_entropy(logits[0].float(), labels[where], reduction="sum")
        loss.backward()
        model.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for i in range(3):  # warm-up
        for kind in ("dense", "sparse"):
            step(kind, *batches[i % len(batches)])
    times = {"dense": [], "sparse": []}
    for i in range(args.steps):
        order = ("dense", "sparse") if i % 2 == 0 else ("sparse", "dense")
        for kind in order:
            times[kind].append(step(kind, *batches[i % len(batches)]))
    tokens = args.batch * args.seq
    sides = {
        kind: {"median_step_s": statistics.median(t), "tokens_per_second": tokens / statistics.median(t)}
        for kind, t in times.items()
    }
    result = {
        "machine": machine(),
        "settings": {
            "model": "MiniLM-size BERT (6 x 384, 12 heads, vocab 30522) from a config",
            "seq": args.seq,
            "batch": args.batch,
            "mask_rate": args.mask,
            "steps": args.steps,
            "dtype": str(dtype).removeprefix("torch."),
            "step": "forward + backward, no optimizer",
            "threads": torch.get_num_threads(),
        },
        "head_share_of_dense_forward_flops": round(flops_share_of_head(config, args.seq), 3),
        "dense": sides["dense"],
        "sparse": sides["sparse"],
        "speedup_sparse_over_dense": sides["dense"]["median_step_s"] / sides["sparse"]["median_step_s"],
    }
    print(
        f"dense {sides['dense']['tokens_per_second']:.0f} tokens/s, sparse {sides['sparse']['tokens_per_second']:.0f}"
        f" tokens/s: {result['speedup_sparse_over_dense']:.2f}x (the head is "
        f"{100 * result['head_share_of_dense_forward_flops']:.0f}% of the dense model's FLOPs)"
    )
    write_result("sparse_head", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
