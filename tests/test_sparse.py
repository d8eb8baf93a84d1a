"""Sparse MLM prediction: the head at masked positions only gives the dense head's loss and gradients, for every
supported architecture, and a training run with it matches one without."""

from __future__ import annotations

import pytest
import torch
from conftest import run_inprocess, series
from transformers import AutoConfig, AutoModelForMaskedLM

from dapt.data.masking import IGNORE
from dapt.model.sparse import SparsePrediction, supports_sparse
from dapt.tasks.mlm import masked_loss_sum

ARCHS = {
    "bert": {},
    "roberta": {"pad_token_id": 1},
    "distilbert": {"dim": 32, "n_layers": 2, "n_heads": 2, "hidden_dim": 64},
    "modernbert": {"global_attn_every_n_layers": 2, "local_attention": 16, "pad_token_id": 0},
    "electra": {"embedding_size": 32},
}


def _tiny(kind: str):
    import dapt.model.canine  # noqa: F401  (registers CANINE's masked-LM head)

    fields = {
        "vocab_size": 120,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "max_position_embeddings": 80,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
    } | ARCHS.get(kind, {})
    if kind == "canine":
        fields = {
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "intermediate_size": 64,
            "downsampling_rate": 2,
            "char_vocab": 120,
            "hidden_dropout_prob": 0.0,
            "attention_probs_dropout_prob": 0.0,
        }
    torch.manual_seed(0)
    return AutoModelForMaskedLM.from_config(
        AutoConfig.for_model(kind, **fields), attn_implementation="eager"
    ).eval()


@pytest.mark.parametrize("kind", [*ARCHS, "canine"])
def test_sparse_head_gives_the_dense_loss_and_gradients(kind):
    model = _tiny(kind)
    assert supports_sparse(model)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 120, (3, 16), generator=g)
    attention = torch.ones_like(ids)
    attention[2, 12:] = 0
    labels = torch.where(torch.rand(ids.shape, generator=g) < 0.3, ids, torch.full_like(ids, IGNORE))
    labels[2, 12:] = IGNORE

    dense = masked_loss_sum(model(input_ids=ids, attention_mask=attention).logits, labels)
    dense.backward()
    dense_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()

    sparse = SparsePrediction(model)
    where = labels != IGNORE
    with sparse.select(where):
        logits = model(input_ids=ids, attention_mask=attention).logits
    assert logits.shape[:2] == (1, int(where.sum()))  # the vocabulary projection ran at masked positions only
    loss = torch.nn.functional.cross_entropy(logits[0].float(), labels[where], reduction="sum")
    loss.backward()
    assert float(loss.detach()) == pytest.approx(float(dense.detach()), rel=1e-5)
    for name, grad in dense_grads.items():
        assert torch.allclose(model.get_parameter(name).grad, grad, rtol=1e-4, atol=1e-6), name
    assert model(input_ids=ids, attention_mask=attention).logits.shape == (
        3,
        16,
        logits.shape[-1],
    )  # hook idle


def test_training_with_the_sparse_head_matches_the_dense_head(recipe, tmp_path):
    args = ["--recipe", recipe, "--train.max_steps=6", "--train.eval_every=3", "--checkpoint.every=0"]
    run_inprocess(args + ["--output_dir", tmp_path / "sparse"])
    run_inprocess(args + ["--output_dir", tmp_path / "dense", "--train.sparse_prediction=false"])
    for key in ("train/loss", "eval/loss"):
        a, b = series(tmp_path / "sparse", key), series(tmp_path / "dense", key)
        assert [s for s, _ in a] == [s for s, _ in b]
        assert [v for _, v in a] == pytest.approx([v for _, v in b], rel=1e-4), key
