"""Packed rows: each document must get the outputs it gets alone (attention never crosses a document)."""

from __future__ import annotations

import pytest
import torch
from attention_cases import MODELS, Tok, documents

from dapt.data.masking import MLMCollator
from dapt.model.attention import model_inputs


@pytest.mark.parametrize("impl", ["sdpa", "eager", "flash_attention_2"])
@pytest.mark.parametrize("name", list(MODELS))
def test_packed_row_equals_each_document_alone(name, impl, request):
    """flash_attention_2 runs transformers' real integration over pure-PyTorch kernels (tests/flash_stub): the packed
    rows reach flash-attn's varlen kernel as one row of real tokens with each document's boundaries."""
    stub = request.getfixturevalue("flash_stub") if impl == "flash_attention_2" else None
    torch.manual_seed(0)
    model = MODELS[name](impl).eval()
    torch.manual_seed(0)
    reference = MODELS[name]("sdpa").eval()  # the same weights (same seed), each document alone
    docs = documents()
    rows = [torch.cat(docs[:3]), docs[3]]  # row 0 packs three documents, row 1 holds one and is padded
    items = [
        {"input_ids": r.numpy(), "key": i, "index": i, "lengths": tuple(len(d) for d in part)}
        for i, (r, part) in enumerate(zip(rows, [docs[:3], docs[3:]]))
    ]
    batch = MLMCollator(Tok(), rate=1e-9, seed=0)(items)  # (no masking: compare the raw outputs)
    assert "segment_ids" in batch
    inputs, keep = model_inputs(batch, model, torch.device("cpu"))
    with torch.no_grad():
        packed = model(**inputs).logits
        if keep is not None:  # flattened real tokens: back to (rows, width)
            full = torch.zeros(*keep.shape, packed.shape[-1])
            full[keep] = packed[0]
            packed = full
        plain = model(input_ids=batch["input_ids"]).logits  # no mask, no positions: documents see each other
        alone = [reference(input_ids=d[None]).logits[0] for d in docs]
    assert torch.isfinite(packed).all()
    at, worst, leaked = 0, 0.0, 0.0
    for d, ref in zip(docs[:3], alone[:3]):
        worst = max(worst, (packed[0, at : at + len(d)] - ref).abs().max().item())
        leaked = max(leaked, (plain[0, at : at + len(d)] - ref).abs().max().item())
        at += len(d)
    worst = max(worst, (packed[1, : len(docs[3])] - alone[3]).abs().max().item())
    assert worst < 1e-5, worst
    assert leaked > 1e-4  # guard: without the block mask and positions the documents do see each other
    if stub is not None:
        varlen = [info for kernel, info in stub.CALLS if kernel == "flash_attn_varlen_func"]
        assert varlen and all(info["cu_seqlens"] == [0, 23, 34, 66, 73] for info in varlen), stub.CALLS[:3]


def test_unpacked_batches_keep_the_plain_inputs():
    batch = MLMCollator(Tok(), rate=0.15, seed=0)(
        [{"input_ids": d.numpy(), "key": 0, "index": 0} for d in documents()]
    )
    assert "segment_ids" not in batch
    model = MODELS["bert"]("sdpa")
    inputs, keep = model_inputs(batch, model, torch.device("cpu"))
    assert set(inputs) == {"input_ids", "attention_mask"} and keep is None
