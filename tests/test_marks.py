"""model.mark_capitals: an uncased tokenizer reads each capital as ^ and the letter, with offsets into the unmarked
text; the marks survive final/'s save and reload (a BertTokenizer would rebuild its normalizer without them), every
later run on final/ reads with them, and the text's hash splits do not move."""

from __future__ import annotations

import dataclasses
import json
import string
from collections import Counter

import pytest
import torch
import yaml
from conftest import TINY_MODEL, run_inprocess
from transformers import AutoTokenizer, BertConfig, BertForMaskedLM, BertTokenizer, CanineTokenizer

from dapt.cli.load import load_config
from dapt.config.schema import BadInput, ConfigError
from dapt.data.corpus import generate
from dapt.model.build import (
    load_tokenizer,
    mark_capitals,
    marks_capitals,
    pretrained_tokenizer,
    train_wordpiece,
)
from dapt.runtime.card import saved_tokenizer_marks
from dapt.runtime.checkpoint import verify_export
from dapt.tasks import fill_mask, predict

TEXT = "GET /tienda1/publico/anadir.jsp?idA=2&nombreA=Jam HTTP/1.1"


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory):
    """A tiny BERT with a real BertTokenizer (the class that rebuilds BERT's normalizer when it loads)."""
    words = generate(600, seed=3) + [TEXT.lower(), "x ^ y"] * 3  # BERT's vocabulary has ^ too
    vocab = train_wordpiece(words, 500, 64).get_vocab()
    tok = BertTokenizer(  # settings off their defaults, so the marked tokenizer is seen to keep each
        vocab=vocab,
        model_max_length=128,
        truncation_side="left",
        padding_side="left",
        extra_special_tokens=["<id>"],
    )
    path = tmp_path_factory.mktemp("bert")
    torch.manual_seed(0)
    fields = {**{k: v for k, v in TINY_MODEL.items() if k != "model_type"}, "max_position_embeddings": 128}
    BertForMaskedLM(BertConfig(**fields, vocab_size=len(tok))).save_pretrained(path)
    tok.save_pretrained(path)
    assert type(AutoTokenizer.from_pretrained(path)) is BertTokenizer
    return path


def _pieces(tok, text):
    enc = tok(text, return_offsets_mapping=True, add_special_tokens=False)
    return list(zip(tok.convert_ids_to_tokens(enc["input_ids"]), enc["offset_mapping"]))


def test_marks_show_case_and_point_into_the_unmarked_text(bert_folder):
    plain = AutoTokenizer.from_pretrained(bert_folder)
    marked = mark_capitals(plain, "t")
    assert not marks_capitals(plain) and marks_capitals(marked)
    assert "".join(t.removeprefix("##") for t in plain.tokenize("idA=2")) == "ida=2"  # uncased: A is a
    pieces = _pieces(marked, "idA=2&nombreA=Jam")
    tokens = [t for t, _ in pieces]
    assert "".join(t.removeprefix("##") for t in tokens[:6]) == "id^a=2", tokens
    assert tokens.count("^") == 3  # A, A, J
    marks = [(s, e) for t, (s, e) in pieces if t == "^"]
    letters = [(s, e) for t, (s, e) in pieces if t in ("a", "j")]  # each mark's letter begins a word
    assert ["idA=2&nombreA=Jam"[s:e] for s, e in marks] == ["A", "A", "J"]
    assert ["idA=2&nombreA=Jam"[s:e] for s, e in letters] == ["A", "A", "J"]
    # the tokenizer's own settings come along (a generic class would fall back to its defaults)
    for name in (
        "truncation_side",
        "model_max_length",
        "model_input_names",
        "all_special_ids",
        "padding_side",
    ):
        assert getattr(marked, name) == getattr(plain, name), name
    assert marked.truncation_side == "left" and marked.convert_tokens_to_ids("<id>") in marked.all_special_ids
    # marking twice is marking once; the unmarked text reads as before
    assert mark_capitals(marked, "t") is marked
    assert marked.backend_tokenizer.normalizer.normalize_str("Q") == "^q"
    every = marked.backend_tokenizer.normalizer.normalize_str(string.ascii_uppercase + string.ascii_lowercase)
    assert every == "".join("^" + c for c in string.ascii_lowercase) + string.ascii_lowercase
    assert marked.tokenize("get /shop?id=2") == plain.tokenize("get /shop?id=2")


def test_marks_survive_save_and_reload_and_the_export_check_sees_them_lost(bert_folder, tmp_path):
    plain = AutoTokenizer.from_pretrained(bert_folder)
    marked = mark_capitals(plain, "t")
    marked.save_pretrained(tmp_path / "marked")
    again = AutoTokenizer.from_pretrained(tmp_path / "marked")
    assert marks_capitals(again) and again.tokenize(TEXT) == marked.tokenize(TEXT)
    assert again.truncation_side == "left" and again.all_special_ids == plain.all_special_ids
    assert again(TEXT)["input_ids"][0] == plain.cls_token_id and again.mask_token_id == plain.mask_token_id
    # the trap: a BertTokenizer loads BERT's own normalizer, whatever tokenizer.json says
    config = tmp_path / "marked" / "tokenizer_config.json"
    fields = json.loads(config.read_text())
    config.write_text(json.dumps({**fields, "tokenizer_class": "BertTokenizer"}))
    assert not marks_capitals(AutoTokenizer.from_pretrained(tmp_path / "marked"))
    with pytest.raises(RuntimeError, match="reloaded tokenizer"):
        verify_export(tmp_path / "marked", {}, tokenizer=marked)


def test_a_trained_tokenizer_marks_in_training_and_in_use(tmp_path):
    texts = generate(300, seed=4) + [TEXT] * 5
    tok = train_wordpiece(texts, 400, 64, mark=True)
    assert marks_capitals(tok) and "^" in tok.get_vocab() and "[UNK]" not in tok.tokenize(TEXT)
    assert not marks_capitals(train_wordpiece(texts, 400, 64))


def _mlm_recipe(tmp_path, corpus_file, model, **model_fields):
    doc = {
        "seed": 1,
        "model": {"name_or_path": str(model), **model_fields},
        "data": {"train": [str(corpus_file)], "max_seq_length": 32},
        "train": {
            "max_steps": 2,
            "micro_batch_size": 4,
            "warmup_steps": 0,
            "eval_every": 2,
            "eval_batches": 1,
        },
        "checkpoint": {"every": 2},
        "log": {"progress": False},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_a_marked_run_leaves_a_final_that_every_later_run_reads_marked(bert_folder, tmp_path, corpus_file):
    from dapt.data.embedding import load_encoder, load_masked_lm

    out = tmp_path / "mlm"
    run_inprocess(
        ["--recipe", _mlm_recipe(tmp_path, corpus_file, bert_folder, mark_capitals=True), "--output_dir", out]
    )
    final = out / "final"
    assert marks_capitals(AutoTokenizer.from_pretrained(final))
    assert "reads each ASCII capital as `^`" in (final / "README.md").read_text()  # the card says so
    assert saved_tokenizer_marks(final) and not saved_tokenizer_marks(bert_folder)
    # later runs on final/ (anomaly's encoder and MLM, predict, fill-mask, the next stage) mark without the flag
    later = load_config(
        ["--model.name_or_path", str(final), "--output_dir", str(tmp_path / "later")], world_size=1
    )
    assert not later.model.mark_capitals
    assert marks_capitals(pretrained_tokenizer(later.model))
    assert marks_capitals(load_encoder(later, "cpu")[1]) and marks_capitals(load_masked_lm(later, "cpu")[1])
    assert marks_capitals(load_tokenizer(later, tmp_path))
    # the base model unmarked unless asked; asked, the scorers mark, but a model's own head cannot read new marks
    base = load_config(
        ["--model.name_or_path", str(bert_folder), "--output_dir", str(tmp_path / "b")], world_size=1
    )
    assert not marks_capitals(pretrained_tokenizer(base.model))
    asked = dataclasses.replace(base, model=dataclasses.replace(base.model, mark_capitals=True))
    assert marks_capitals(load_masked_lm(asked, "cpu")[1]) and marks_capitals(load_encoder(asked, "cpu")[1])
    with pytest.raises(BadInput, match="trained without marks"):
        fill_mask.load_model(asked)
    with pytest.raises(BadInput, match="trained without marks"):
        predict.classify_records(asked, [], False, "cpu", Counter())
    # the entry scripts refuse it with the config's problems (exit 2), before the run starts and claims its folder
    for prog in ("launch/predict.py", "launch/fill_mask.py"):
        unmarked = [
            f"--model.name_or_path={bert_folder}",
            f"--output_dir={tmp_path / 'p'}",
            *([f"--data.test={corpus_file}"] if prog == "launch/predict.py" else []),
        ]
        with pytest.raises(ConfigError, match=f"{bert_folder} was trained without marks"):
            load_config([*unmarked, "--model.mark_capitals=true"], world_size=1, prog=prog)
        load_config(unmarked, world_size=1, prog=prog)
        load_config(  # a marked model: the flag asks for what it does already
            [*unmarked[1:], f"--model.name_or_path={final}", "--model.mark_capitals=true"],
            world_size=1,
            prog=prog,
        )
    assert not (tmp_path / "p").exists()
    # a resume with the flag flipped would turn the same text into other tokens mid-run
    flipped = _mlm_recipe(tmp_path, corpus_file, bert_folder, mark_capitals=False)
    with pytest.raises(BadInput, match="mark_capitals=true, this run has false"):
        run_inprocess(
            ["--recipe", flipped, "--train.max_steps=4", "--train.rebuild_schedule=true", "--output_dir", out]
        )


def test_a_from_scratch_run_keeps_the_marks_its_tokenizer_was_trained_with(recipe, tmp_path):
    out = tmp_path / "scratch"
    run_inprocess(
        ["--recipe", recipe, "--output_dir", out, "--train.max_steps=3", "--model.mark_capitals=true"]
    )
    assert marks_capitals(AutoTokenizer.from_pretrained(out / "final"))
    with pytest.raises(BadInput, match="the tokenizer this run trained in .* marks capitals"):
        run_inprocess(
            ["--recipe", recipe, "--output_dir", out, "--train.max_steps=6", "--train.rebuild_schedule=true"]
        )


def test_marks_move_no_split_and_no_text(bert_folder, tmp_path):
    """An anomaly run scored by a marking encoder and by the same encoder unmarked: the same documents in validation
    and test, the same lexical scores (the text is not marked), different knn scores (the model reads the marks)."""
    from test_scores import _anomaly_args, _files, _run, http_docs  # noqa: F401

    normal = [f"GET /shop/item.jsp?idA={i}&Qty={i % 7} HTTP/1.1\nHost: shop" for i in range(300)]
    attacks = [f"GET /shop/item.jsp?IDA={i}&qtyA=1'--&Qty=1 HTTP/1.1\nHost: shop" for i in range(40)]
    paths = _files(tmp_path, (normal, attacks))
    runs = {}
    for name, flag in (("plain", "false"), ("marked", "true")):
        args = _anomaly_args(paths, bert_folder, tmp_path / name)
        fuse = ["--embed.fuse=[knn, mlm, lexical]", "--embed.fuse_rule=sum", "--embed.mask_patterns=2"]
        _run(args + [*fuse, f"--model.mark_capitals={flag}"])
        rows = [r.split(",") for r in (tmp_path / name / "anomaly_scores.csv").read_text().splitlines()]
        assert rows[0] == ["split", "id", "label", "score", "knn", "mlm", "lexical"]
        runs[name] = {(r[0], r[1]): [float(x) for x in r[4:]] for r in rows[1:]}
    plain, marked = runs["plain"], runs["marked"]
    assert plain.keys() == marked.keys()
    assert all(plain[k][2] == marked[k][2] for k in plain)  # lexical: the text as written
    changed = [sum(abs(plain[k][col] - marked[k][col]) > 1e-4 for k in plain) for col in (0, 1)]
    assert changed[0] > len(plain) // 2 and changed[1] > len(plain) // 10  # knn and mlm read the marks


def test_canine_cannot_mark(tmp_path, corpus_file):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"model": {"config": {"model_type": "canine"}, "mark_capitals": True}}))
    with pytest.raises(ConfigError, match="mark_capitals"):
        load_config(["--recipe", str(path), "--output_dir", str(tmp_path / "o")], world_size=1)
    cfg = load_config(["--output_dir", str(tmp_path / "o")], world_size=1)
    canine = dataclasses.replace(cfg.model, mark_capitals=True, config={"model_type": "canine"})
    cfg = dataclasses.replace(cfg, model=canine)
    with pytest.raises(BadInput, match="CANINE"):
        load_tokenizer(cfg, tmp_path)


def test_marks_need_a_caret_in_the_vocabulary_and_a_fast_tokenizer(tmp_path):
    """A vocabulary without ^ would read every mark as [UNK]; a slow tokenizer has no normalizer to mark in."""
    no_caret = train_wordpiece(generate(300, seed=5), 300, 64)
    assert "^" not in no_caret.get_vocab()
    with pytest.raises(BadInput, match="no token for"):
        mark_capitals(no_caret, "t")
    with pytest.raises(BadInput, match="has no tokenizers normalizer"):
        mark_capitals(CanineTokenizer(), "canine")
