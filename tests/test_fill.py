"""launch/fill_mask.py: masked prediction with a token model (a tiny BERT) and the placeholder handling; the CANINE
path runs in tests/test_recipes.py on the smoke MLM's output."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM

from dapt.data.corpus import generate
from dapt.model.build import train_wordpiece


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bert")
    tok = train_wordpiece(generate(400, seed=3), 400, 64)
    torch.manual_seed(0)
    BertForMaskedLM(
        BertConfig(
            vocab_size=len(tok),
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=64,
        )
    ).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_each_placeholder_gets_top_k_candidates_from_the_model(bert, capsys, monkeypatch):
    import dapt.cli.main
    from dapt.cli.load import load_config
    from dapt.tasks.fill_mask import encode, predict
    from dapt.tasks.fill_mask import run as run_fill

    cfg = load_config(
        [f"--model.name_or_path={bert}", "--fill.text=['GET /index [MASK] HTTP [MASK]']", "--fill.top_k=4"],
        world_size=1,
        accelerator="cpu",
    )
    results = run_fill(cfg)
    ((text, predictions),) = results.items()
    assert len(predictions) == 2 and all(len(row) == 4 for row in predictions)
    assert all(a[1] >= b[1] for row in predictions for a, b in zip(row, row[1:]))  # sorted by probability
    from dapt.tasks.fill_mask import load_model as load

    model, tok = load(cfg)
    ids, masked = encode(text, tok, "[MASK]", tok.mask_token_id)
    assert [ids[i] for i in masked] == [tok.mask_token_id] * 2 and ids[0] == tok.cls_token_id
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, masked[0]].softmax(-1)
    assert predictions[0][0] == (
        tok.convert_ids_to_tokens(int(logits.argmax())),
        pytest.approx(float(logits.max())),
    )
    assert "  [2] " in capsys.readouterr().out
    with pytest.raises(ValueError, match="no \\[MASK\\] in"):
        predict(model, tok, "nothing to fill", "[MASK]", tok.mask_token_id, 3)
    monkeypatch.setattr(dapt.cli.main, "_close_process_group", lambda: None)
    assert dapt.cli.main.main(run_fill, ["--fill.text=[x]"]) == 3  # no model named: a clear error, exit 3
    assert "needs --model.name_or_path" in capsys.readouterr().err


def test_interactive_mode_reads_lines_until_an_empty_one(bert, capsys, monkeypatch):
    import io

    from dapt.cli.load import load_config
    from dapt.tasks.fill_mask import run as run_fill

    monkeypatch.setattr("sys.stdin", io.StringIO("a [MASK] b\nno mask here\n[MASK]\n\nnever read [MASK]\n"))
    results = run_fill(
        load_config([f"--model.name_or_path={bert}", "--fill.top_k=2"], world_size=1, accelerator="cpu")
    )
    assert list(results) == ["a [MASK] b", "[MASK]"]
    assert "no [MASK] in 'no mask here'" in capsys.readouterr().out
