"""launch/anomaly.py's scores: MLM surprise under fixed mask patterns, lexical novelty, their calibration and fusion;
the ablation by a score type; 2 ranks score as 1."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from conftest import ROOT, byte_level_bpe, launch
from transformers import BertConfig, BertForMaskedLM, BertModel

from dapt.cli.load import load_config
from dapt.config.schema import ConfigError
from dapt.data.embedding import NoMLMHead
from dapt.data.formats import Document
from dapt.data.novelty import CharNovelty
from dapt.data.packing import pack
from dapt.data.surprise import Masking, Surprise, mask_patterns, token_surprise
from dapt.model.build import train_wordpiece
from dapt.runtime.calibration import calibrations, threshold_for
from dapt.runtime.detectors import evaluate_detector
from dapt.runtime.fusion import best_of, combine, fuse, separation, tail_scores
from dapt.tasks.anomaly import choose_knn, valid_key

ATTACK = "GET /shop/item.jsp?id=1'+OR+'1'='1&qty=2 HTTP/1.1\nHost: shop"


def _bert(vocab: int, mlm: bool = True):
    conf = BertConfig(
        vocab_size=vocab,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    return (BertForMaskedLM if mlm else BertModel)(conf).eval()


@pytest.fixture(scope="module")
def http_docs():
    """Shop requests: normal ones vary item, quantity and session; attacks put SQL or script in a parameter."""
    rng = np.random.default_rng(0)
    normal = [
        f"GET /shop/item.jsp?id={rng.integers(1, 99)}&qty={rng.integers(1, 9)} HTTP/1.1\nHost: shop\n"
        f"Cookie: JSESSIONID={rng.integers(1 << 60):X}"
        for _ in range(300)
    ]
    attacks = [
        f"GET /shop/item.jsp?id={rng.integers(1, 99)}{p}&qty=1 HTTP/1.1\nHost: shop\nCookie: JSESSIONID=AB12"
        for p in ["'+OR+'1'='1", "%3Cscript%3Ealert(1)%3C/script%3E", "+UNION+SELECT+pass+FROM+users--"] * 20
    ]
    return normal, attacks


@pytest.fixture(scope="module")
def tokenizer(http_docs):
    return train_wordpiece(http_docs[0] + http_docs[1][:3], 300, 96)


def test_mask_patterns_partition_the_positions():
    for patterns, rate in ((4, 0.25), (6, 0.15), (2, 0.15)):
        m = mask_patterns(512, patterns, rate, seed=3)
        assert m.shape == (patterns, 512) and (m.sum(0) <= 1).all()  # disjoint: K * rate <= 1
        assert abs(m.mean(1) - rate).max() < 0.06  # each masks about `rate` of the positions
    assert mask_patterns(512, 4, 0.25, seed=3).sum(0).min() == 1  # 1 / rate patterns: every position once
    assert (mask_patterns(64, 3, 0.2, seed=1) == mask_patterns(64, 3, 0.2, seed=1)).all()  # fixed by the seed
    assert (mask_patterns(512, 7, 0.15, seed=3).sum(0) == 2).any()  # K * rate > 1: some positions twice


def test_surprise_aggregates_and_top_tokens(tokenizer):
    ids = np.array(tokenizer.convert_tokens_to_ids(["[CLS]", "get", "shop", "id", "[SEP]"]))
    s = Surprise(ids, np.array([np.nan, 1.0, 4.0, 2.0, np.nan]), np.array([np.nan, 0.5, 3.9, 0.5, np.nan]))
    assert s.score("mean", 2) == pytest.approx(7 / 3) and s.score("max", 2) == 4.0
    assert s.score("topk", 2) == pytest.approx(3.0)
    assert s.top(tokenizer, 2) == [("shop", 4.0), ("id", 2.0)]
    # excess: "shop" was as surprising as the model expected there; "id" surprised it most
    assert s.score("max", 2, "excess") == pytest.approx(1.5)
    assert [t for t, _ in s.top(tokenizer, 2, "excess")] == ["id", "get"]
    assert Surprise(ids, np.full(5, np.nan), np.full(5, np.nan)).score("mean", 2) == 0.0
    with pytest.raises(ValueError, match="novelty"):
        s.score("novel", 2)
    # "shop" and "id" touch a novel n-gram, "get" does not; [CLS] is flagged but never masked
    s.novel = np.array([True, False, True, True, False])
    assert s.score("novel", 2) == pytest.approx((4.0 + 2.0) / 3)  # per masked token, not per novel one
    assert s.score("novel", 2, "excess") == pytest.approx((0.1 + 1.5) / 3)
    assert s.top(tokenizer, 1) == [("shop", 4.0)]
    assert s.top(tokenizer, 3, "excess", novel_only=True) == [("id", 1.5), ("shop", 0.1)]


def test_token_surprise_is_the_mlm_loss_at_each_masked_position(tokenizer, http_docs):
    """Sparse scoring (head at masked positions only, batched across documents and patterns) equals a plain dense
    forward of each (document, pattern) with the true token's negative log-likelihood and the prediction's entropy read
    at each masked position."""
    model = _bert(len(tokenizer))
    docs = [Document(t, f"d:{i}") for i, t in enumerate(http_docs[0][:3] + [ATTACK])]
    got = token_surprise(
        model, tokenizer, docs, Masking(max_len=96, batch=5, patterns=3, rate=0.2, seed=7), "cpu"
    )
    masks = mask_patterns(96, 3, 0.2, seed=7)
    special = set(tokenizer.all_special_ids)
    for doc, s in zip(docs, got):
        ids = tokenizer(doc.text, truncation=True, max_length=96)["input_ids"]
        assert s.ids.tolist() == ids
        want, entropy = np.full(len(ids), np.nan), np.full(len(ids), np.nan)
        for k in range(3):
            pos = [p for p in range(len(ids)) if masks[k, p] and ids[p] not in special]
            x = torch.tensor([ids])
            x[0, pos] = tokenizer.mask_token_id
            with torch.no_grad():
                logp = model(input_ids=x).logits[0].log_softmax(-1)
            want[pos] = [-logp[p, ids[p]].item() for p in pos]
            entropy[pos] = [-(logp[p].exp() * logp[p]).sum().item() for p in pos]
        assert np.array_equal(np.isnan(want), np.isnan(s.nll)) and (~np.isnan(s.nll)).sum() > 10
        assert np.allclose(s.nll[~np.isnan(want)], want[~np.isnan(want)], atol=1e-4)
        assert np.allclose(s.entropy[~np.isnan(want)], entropy[~np.isnan(want)], atol=1e-4)
    with torch.no_grad():  # the hook is gone afterwards: the model's dense output is whole again
        assert model(input_ids=torch.tensor([[2, 5, 3]])).logits.shape == (1, 3, len(tokenizer))


def test_lexical_novelty_scores_and_explains(http_docs):
    normal, attacks = http_docs
    lex = CharNovelty(3, digits=True).fit(normal[:200])
    assert (
        lex.score(normal[200:]).max() < 0.05
    )  # new numbers and sessions are not novel with digits read as 0
    assert lex.score(attacks).min() > 0.05
    spans = lex.spans(ATTACK, 3)
    assert any("'+OR+'" in s for s in spans) and not any("Host" in s for s in spans)
    raw = CharNovelty(3, digits=False).fit(normal[:200])
    assert raw.score(normal[200:]).mean() > lex.score(normal[200:]).mean()


def test_novel_tokens_line_up_with_the_scored_rows(tokenizer, http_docs):
    """Each token's novelty is read on the row token_surprise scores: the same length, the markers never novel, the
    tokens of the injected SQL novel and the request line's familiar ones not; rows cut at max_len stay aligned."""
    normal, _ = http_docs
    lex = CharNovelty(3, digits=True).fit(normal[:200])
    model = _bert(len(tokenizer))
    texts = [normal[250], ATTACK]
    assert lex.novel_chars("GET /shop").sum() == 0 and lex.novel_chars("'+OR+'").all()
    for max_len in (96, 12):
        flags = lex.novel_tokens(tokenizer, texts, max_len)
        scored = token_surprise(
            model,
            tokenizer,
            [Document(t, f"d:{i}") for i, t in enumerate(texts)],
            Masking(max_len=max_len, batch=4, patterns=2, rate=0.5, seed=0),
            "cpu",
        )
        for f, s in zip(flags, scored):
            assert len(f) == len(s.ids) and not f[0] and not f[-1]
        assert not flags[0].any()  # a normal request: nothing novel
        tokens = tokenizer.convert_ids_to_tokens(scored[1].ids.tolist())
        assert not any(f for t, f in zip(tokens, flags[1]) if t in ("get", "shop"))
    # max_len 12: the row ends at "id", "=": only the "=" that opens the novel "=1'" is novel
    assert flags[1].tolist() == [False] * 10 + [True, False]
    full = lex.novel_tokens(tokenizer, [ATTACK], 96)[0]
    tokens = tokenizer.convert_ids_to_tokens(tokenizer(ATTACK)["input_ids"])
    run = np.flatnonzero(full)
    assert (
        np.diff(run) == 1
    ).all()  # one novel span: from the "=" before the quote to the "&" after the injection
    assert tokens[run[0]] == "=" and tokens[run[-1]] == "&" and {"'", "+"} <= {tokens[i] for i in run}


def test_novel_tokens_for_byte_level_bpe_and_a_tokenizer_without_offsets(http_docs):
    """RoBERTa-style rows (<s> ... </s>) line up too, a space that byte-level BPE counts into a token's span does not
    make the token novel, and a tokenizer without offsets (CANINE's) gives None: `auto` then leaves novel out."""
    from transformers import CanineTokenizer

    normal, attacks = http_docs
    tok = byte_level_bpe(normal + attacks, 400)
    text = "GET /a HTTP/1.1 zq"
    ids = pack("pad", tok, [text], ["d:0"], 64)[0].ids.tolist()  # the row token_surprise scores
    pieces = tok.convert_ids_to_tokens(ids)
    lex = CharNovelty(3, digits=True).fit(
        ["GET /a HTTP/1.1 "]
    )  # "0 z", " zq": the last digit, the space, z, q
    flags = lex.novel_tokens(tok, [text], 64)[0]
    assert len(flags) == len(ids) and ids[0] == tok.bos_token_id and not flags[0] and not flags[-1]
    assert pieces[-4:-1] == ["Ġ", "z", "q"] and flags.tolist() == [0] * 8 + [
        1,
        0,
        1,
        1,
        0,
    ]  # "Ġ": a space alone
    spaces = CharNovelty(1).fit(
        ["GET/aHTTP/1.1zq"]
    )  # only the spaces are new; "Ġ/" and "ĠHTTP" start with one
    assert spaces.novel_chars(text).sum() == 3 and not spaces.novel_tokens(tok, [text], 64)[0].any()
    assert CharNovelty().fit(normal).novel_tokens(CanineTokenizer(), [text], 64) is None


def test_tail_scores_rank_against_normal_validation():
    normal = np.arange(1.0, 100.0)  # 99 normal validation scores
    t = tail_scores(normal, np.array([0.0, 50.0, 99.0, 1000.0]))  # (1 + #{v >= x}) / (n + 1)
    assert t == pytest.approx(-np.log(np.array([100, 51, 2, 1]) / 100))
    assert (np.diff(tail_scores(normal, np.linspace(0, 120, 50))) >= 0).all()  # monotone


def test_fusion_rules_sum_or_take_the_strongest():
    """Two components' tail scores: an attack only the second sees stands out under max, and is diluted by the first's
    ordinary value under sum, below a document both find unusual."""
    normal = np.arange(1.0, 100.0)
    first = tail_scores(normal, np.array([50.0, 97.0]))  # ordinary, unusual
    second = tail_scores(normal, np.array([1000.0, 97.0]))  # beyond every normal, unusual
    assert combine([first, second], "sum", 99) == pytest.approx(first + second)
    by_sum, by_max = combine([first, second], "sum", 99), combine([first, second], "max", 99)
    assert by_max[0] > by_max[1] and by_sum[0] < by_sum[1]
    assert by_max == pytest.approx(np.maximum(first, second), abs=0.01)
    tie = combine(
        [np.array([3.0, 3.0]), np.array([0.5, 1.0])], "max", 99
    )  # the same max: the sum breaks the tie
    assert tie[1] > tie[0] and tie[0] == pytest.approx(3.0, abs=0.01)
    # the tie-break never reorders different maxima, however many normal documents (here 200,000, 3 scores)
    rng = np.random.default_rng(0)
    n = 200_000
    tails = [
        tail_scores(np.arange(n, dtype=float), rng.integers(0, n + 5, 5000).astype(float)) for _ in range(3)
    ]
    fused = combine(tails, "max", n)
    assert (np.diff(np.max(tails, axis=0)[np.argsort(fused, kind="stable")]) >= 0).all()


def test_validation_from_test_splits_normal_records_and_attack_texts():
    """embed.valid_from_test: a normal request repeated 400 times falls on both sides (by record); 400 copies of an
    attack stay on one side (by text), so no copy of a test attack chooses a score."""
    from dapt.data.stream import in_valid_split

    normal = [Document("GET /index.jsp HTTP/1.1", f"normal.txt:{i}", "normal") for i in range(400)]
    attack = [Document(ATTACK, f"attack.txt:{i}", "attack") for i in range(400)]
    side = [in_valid_split(valid_key(d, "normal"), 0.2) for d in normal]
    assert 40 < sum(side) < 120  # about 20% of the records
    assert len({in_valid_split(valid_key(d, "normal"), 0.2) for d in attack}) == 1
    # the same files in another folder: the same split
    moved = [Document(d.text, f"/elsewhere/{d.id}", d.label) for d in normal]
    assert [in_valid_split(valid_key(d, "normal"), 0.2) for d in moved] == side


def test_choices_go_by_partial_auroc():
    rng = np.random.default_rng(0)
    normal = rng.normal(size=2000)
    r = separation(normal, rng.normal(3, 1, 500), 0.05)
    assert 0.5 < r["partial_auroc"] < r["auroc"] <= 1 and 0.5 < r["recall_at_max_fpr"] < 1
    assert separation(normal, rng.normal(size=500), 0.05)["partial_auroc"] == pytest.approx(0.5, abs=0.05)
    table = {
        "a": {"recall_at_max_fpr": 0.2, "partial_auroc": 0.9, "auroc": 0.8},
        "b": {"recall_at_max_fpr": 0.3, "partial_auroc": 0.6, "auroc": 0.9},
    }
    assert best_of(table) == "a" and best_of({}) is None
    tied = {"a": {"partial_auroc": 0.9, "auroc": 0.8}, "b": {"partial_auroc": 0.9, "auroc": 0.95}}
    assert best_of(tied) == "b"  # a tie (partial AUROC saturates at 1) goes to the better AUROC


def test_knn_k_is_the_one_that_separates_validation_attacks():
    """embed.knn_k's candidates are judged on validation: k=1 where each normal request has one exact form among the
    fitted ones, k=5 where one stray normal document lies on each attack; the first without attacks."""
    rng = np.random.default_rng(0)

    def unit(x):
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    forms, attacks = unit(rng.normal(size=(60, 32))), unit(rng.normal(size=(40, 32)))
    valid = np.r_[np.repeat(forms, 2, axis=0) + rng.normal(0, 0.01, (120, 32)), attacks]
    is_attack = np.r_[np.zeros(120, bool), np.ones(40, bool)]
    one_each, table = choose_knn(forms, valid, is_attack, [5, 1, 10], 0.05)
    assert one_each.k == 1 and list(table) == ["k=5", "k=1", "k=10"]
    assert table["k=1"]["partial_auroc"] > 0.95 > 0.7 > table["k=5"]["partial_auroc"]

    crowded = np.r_[np.repeat(forms[:20], 5, axis=0) + rng.normal(0, 0.01, (100, 32)), attacks]  # + strays
    valid = np.r_[forms[:20] + rng.normal(0, 0.01, (20, 32)), attacks]
    is_attack = np.r_[np.zeros(20, bool), np.ones(40, bool)]
    stray_proof, table = choose_knn(crowded, valid, is_attack, [1, 5, 10], 0.05)
    assert stray_proof.k == 5 and table["k=5"]["partial_auroc"] > 0.95 > 0.7 > table["k=1"]["partial_auroc"]

    assert choose_knn(crowded, valid, np.zeros(60, bool), [10, 1], 0.05)[0].k == 10  # nothing to choose by
    assert choose_knn(crowded, valid, is_attack, [3], 0.05)[1] == {}  # one k: no table


def test_unknown_tokens_are_scored(tokenizer):
    model = _bert(len(tokenizer))
    text = "GET /shop/item.jsp?id=\u2603\u2603 HTTP/1.1"  # a character the vocabulary lacks
    (s,) = token_surprise(model, tokenizer, [Document(text, "d:1")], Masking(96, 4, 4, 0.25, 0), "cpu")
    unk = s.ids == tokenizer.unk_token_id
    assert unk.any() and not np.isnan(s.nll[unk]).any()  # every token is masked once with 4 x 0.25
    assert np.isnan(s.nll[[0, -1]]).all()  # CLS and SEP are not


def test_score_config_errors_come_together():
    with pytest.raises(ConfigError) as e:
        load_config(
            [
                "--embed.score=fused",
                "--embed.fuse=[mlm]",
                "--embed.mask_rate=0",
                "--embed.valid_from_test=1.5",
                "--embed.token_score=median",
                "--embed.token_surprise=entropy",
                "--embed.top_k=0",
                "--embed.knn_k=0",
            ]
        )
    for key in (
        "embed.fuse",
        "embed.mask_rate",
        "embed.valid_from_test",
        "embed.token_score",
        "embed.token_surprise",
        "embed.top_k",
        "embed.knn_k",
    ):
        assert key in str(e.value), key
    for ks, problem in (("[]", r"embed.knn_k: \[\] names no k"), ("[5,0]", "embed.knn_k: 0 must be >= 1")):
        with pytest.raises(ConfigError, match=problem):
            load_config([f"--embed.knn_k={ks}"])
    with pytest.raises(ConfigError, match="leave data.valid empty"):
        load_config(["--embed.valid_from_test=0.2", "--data.valid=[x.txt]"])


def _files(tmp_path, http_docs):
    normal, attacks = http_docs
    paths = {}
    for name, docs in (
        ("normal_train", normal[:200]),
        ("normal_test", normal[200:]),
        ("attack_test", attacks),
    ):
        paths[name] = tmp_path / f"{name}.http"
        paths[name].write_text("\n\n".join(docs) + "\n")
    return paths


def _anomaly_args(paths, model, out):
    return [
        "--model.name_or_path",
        model,
        "--data.format=http",
        "--data.volatile=[cookie]",
        "--data.train",
        paths["normal_train"],
        "--data.test",
        f"[{paths['normal_test']}, {paths['attack_test']}]",
        "--classify.label_files={'normal*': normal, 'attack*': attack}",
        "--data.max_seq_length=96",
        "--embed.score=fused",
        "--embed.valid_from_test=0.3",
        "--log.progress=false",
        "--output_dir",
        out,
    ]


def _run(argv):
    from dapt.tasks.anomaly import run

    return run(load_config([str(a) for a in argv], world_size=1, accelerator="cpu"))


def test_every_score_runs_and_reports(tmp_path, http_docs, tokenizer):
    """The default Mahalanobis score with seed 000's validation split; lexical alone (no model) on a test set without
    attacks; a fusion over an encoder without an MLM head goes on without mlm and says so."""
    paths = _files(tmp_path, http_docs)
    headless = tmp_path / "encoder"
    _bert(len(tokenizer), mlm=False).save_pretrained(headless)
    tokenizer.save_pretrained(headless)
    args = _anomaly_args(paths, headless, tmp_path / "maha")
    maha = _run([a for a in args if "embed." not in str(a)] + ["--data.valid_fraction=0.3"])
    assert maha["score"] == "mahalanobis" and maha["valid_attack"] == 0 and 0.5 < maha["auroc"] <= 1
    finding = json.loads((tmp_path / "maha" / "anomaly_report.jsonl").read_text().splitlines()[0])
    assert finding["novel_spans"] and "surprising_tokens" not in finding  # no MLM: the novel spans say why

    normal_only = [
        str(a).replace(f", {paths['attack_test']}", "") for a in _anomaly_args(paths, "", tmp_path / "lex")
    ]
    lex = _run(normal_only + ["--embed.score=lexical"])
    assert lex["recall_at_max_fpr"] is None and lex["test_attack"] == 0 and 0 <= lex["test_fpr"] <= 0.2
    assert "| normal validation data |" in (tmp_path / "lex" / "anomaly_report.md").read_text()

    fused = _run(_anomaly_args(paths, headless, tmp_path / "fused"))
    assert "no trained MLM head" in fused["unscored"]["mlm"] and "mlm" not in fused["fuse"]
    again = fused[
        "resampled"
    ]  # validation from the test files: both split again 20 times, as many in each part
    assert again["rounds"] == len(again["test_fpr"]) == 20 == len(again["recall_at_exactly_max_fpr"])
    assert (
        again["fpr_at_most_max"] == sum(f <= 0.05 for f in again["test_fpr"])
        and fused["calibration"]["normal_needed"] == 59
    )
    assert set(fused["components"]) == {"mahalanobis", "knn", "lexical"}
    ks = fused["knn_k_validation"]  # embed.knn_k's candidates, each judged on validation; knn uses the best
    assert list(ks) == ["k=5", "k=1", "k=10"]
    assert f"k={fused['knn_k']}" == max(ks, key=lambda c: (ks[c]["partial_auroc"], ks[c]["auroc"]))
    assert fused["fuse_validation"]["knn"] == ks[f"k={fused['knn_k']}"]
    table = fused["fuse_validation"]  # each score alone, then each pair and the three, by each rule
    combos = ["mahalanobis+knn", "mahalanobis+lexical", "knn+lexical", "mahalanobis+knn+lexical"]
    assert list(table) == ["mahalanobis", "knn", "lexical"] + [
        f"{c} by {rule}" for c in combos for rule in ("sum", "max")
    ]
    best = max(table, key=lambda c: (table[c]["partial_auroc"], table[c]["auroc"]))
    chosen = "+".join(fused["fuse"]) + (f" by {fused['fuse_rule']}" if fused["fuse_rule"] else "")
    assert chosen == best and (fused["fuse_rule"] is None) == (len(fused["fuse"]) == 1)
    fixed = _run(_anomaly_args(paths, headless, tmp_path / "fmax") + ["--embed.fuse_rule=max"])
    assert list(fixed["fuse_validation"]) == ["mahalanobis", "knn", "lexical"] + [
        f"{c} by max" for c in combos
    ]
    assert fixed["fuse_rule"] == ("max" if len(fixed["fuse"]) > 1 else None)
    for run, out in ((fused, "fused"), (fixed, "fmax")):
        said = (
            f"{run['fuse'][0]} alone"
            if len(run["fuse"]) == 1
            else f"{', '.join(run['fuse'])} by {run['fuse_rule']}"
        )
        assert f"Score: **fused** ({said})" in (tmp_path / out / "anomaly_report.md").read_text()
        if len(run["fuse"]) == 1:  # one score chosen alone is used as it is: its own result
            alone = run["components"][run["fuse"][0]]
            assert (run["recall_at_max_fpr"], run["test_fpr"]) == (
                alone["recall_at_max_fpr"],
                alone["test_fpr"],
            )
            assert run["auroc"] == pytest.approx(alone["auroc"])
    rows = (tmp_path / "fused" / "anomaly_scores.csv").read_text().splitlines()
    assert rows[0] == "split,id,label,score,mahalanobis,knn,lexical"
    assert len(rows) == 1 + fused["valid_normal"] + fused["valid_attack"] + fused["test"]
    flagged = [r.split(",") for r in rows[1:] if r.startswith("test,")]
    assert sum(float(r[3]) > fused["threshold"] for r in flagged) == len(
        (tmp_path / "fused" / "anomaly_report.jsonl").read_text().splitlines()
    )  # the report lists exactly the test documents above the deployable threshold
    valid = [r.split(",") for r in rows[1:] if r.startswith("valid,")]
    attack = np.array([r[2] != "normal" for r in valid])
    for col, name in ((4, "mahalanobis"), (5, "knn"), (6, "lexical")):  # a score alone: by its own values
        raw = np.array([float(r[col]) for r in valid])
        assert fused["fuse_validation"][name] == pytest.approx(separation(raw[~attack], raw[attack], 0.05))
    knn = _run(_anomaly_args(paths, headless, tmp_path / "knn") + ["--embed.score=knn", "--embed.knn_k=3"])
    assert knn["knn_k"] == 3 and "shrinkage" not in knn  # knn alone: no Gaussian fitted
    k3 = [r.split(",") for r in (tmp_path / "knn" / "anomaly_scores.csv").read_text().splitlines()[1:]]
    assert fused["knn_k"] == 1  # these requests repeat a few exact forms: the nearest one separates best
    k1 = {r[1]: float(r[5]) for r in (x.split(",") for x in rows[1:])}  # the fusion's knn column, k=1
    assert all(float(r[4]) == float(r[3]) >= 0 for r in k3)  # knn alone: the score is its column
    assert all(float(r[4]) >= k1[r[1]] - 1e-6 for r in k3)  # the 3rd neighbour is no nearer than the 1st
    assert sum(float(r[4]) > k1[r[1]] + 1e-6 for r in k3) > len(k3) // 2
    with pytest.raises(NoMLMHead, match="no trained MLM head"):
        _run(_anomaly_args(paths, headless, tmp_path / "mlm") + ["--embed.score=mlm"])
    paths["normal_train"].write_text("GET /shop HTTP/1.1\n" + "x" * 5000)  # a record too long to read
    small = ["--data.max_record_bytes=4096"]
    with pytest.raises(NoMLMHead, match="no trained MLM head"):  # the model is loaded before any data is read
        _run(_anomaly_args(paths, headless, tmp_path / "mlm") + ["--embed.score=mlm", *small])
    with pytest.raises(Exception, match="normal_train.http"):  # the bad record, once the model is fine
        _run(_anomaly_args(paths, headless, tmp_path / "maha2") + ["--embed.score=mahalanobis", *small])


def test_the_deployed_threshold_is_set_on_normal_validation_rows(tmp_path, http_docs):
    """Seed 000's protocol: the threshold deployed (anomaly.json's threshold, the report's) is set by
    embed.calibration on the normal VALIDATION scores; the one from the normal test scores (the literature's) is only reported
    beside it. Validation and test normals differ clearly here, so taking either for the other fails."""
    rng = np.random.default_rng(1)
    normal, attack = np.zeros(400, bool), np.ones(40, bool)
    valid = np.r_[rng.normal(0, 1, 400), rng.normal(6, 1, 40)]
    test = np.r_[rng.normal(3, 1, 400), rng.normal(6, 1, 40)]  # test normals lie higher than validation's
    cal = calibrations(valid, test, np.r_[normal, attack], np.r_[normal, attack], 0.05)
    assert cal["deployable"]["threshold"] == threshold_for(valid[:400], 0.05)
    assert cal["test_calibrated"]["threshold"] == threshold_for(test[:400], 0.05)
    assert cal["deployable"]["threshold"] < cal["test_calibrated"]["threshold"] - 1
    # judged at validation's threshold, most of the higher test normals are flagged
    assert cal["deployable"]["test_fpr"] > 0.5

    # a real run (lexical: no model): normal validation requests of another shop, so their n-grams are new
    paths = _files(tmp_path, http_docs)
    paths["normal_valid"] = tmp_path / "normal_valid.http"
    paths["normal_valid"].write_text(
        "\n\n".join(
            f"POST /bank/account/transfer.aspx?to={i}&amount={i * 7} HTTP/1.1\nHost: bank" for i in range(60)
        )
        + "\n"
    )
    args = [a for a in _anomaly_args(paths, "", tmp_path / "lex") if "valid_from_test" not in str(a)]
    result = _run([*args, "--embed.score=lexical", "--data.valid", paths["normal_valid"]])
    saved = json.loads((tmp_path / "lex" / "anomaly.json").read_text())
    rows = [r.split(",") for r in (tmp_path / "lex" / "anomaly_scores.csv").read_text().splitlines()[1:]]
    valid_normal = np.array([float(r[3]) for r in rows if r[0] == "valid" and r[2] == "normal"])
    test_normal = np.array([float(r[3]) for r in rows if r[0] == "test" and r[2] == "normal"])
    assert len(valid_normal) == result["valid_normal"] == 60 and len(test_normal) > 50
    # the default calibration (bound at 95%): with 60 normal validation requests (59 needed) none may lie above
    deployed, from_test = threshold_for(valid_normal, 0.05, "bound", 0.95), threshold_for(test_normal, 0.05)
    assert deployed == valid_normal.max() and saved["calibration"]["above_threshold"] == 0
    assert saved["calibration"]["normal_needed"] == 59 and saved["calibration"]["p_fpr_at_most_max"] >= 0.95
    # validation from another source (data.valid): re-splitting validation and test together would make them alike
    # by construction and hide the drift that matters, so there is no resampled figure
    assert "resampled" not in saved and saved["calibration"]["enough"]
    assert deployed > from_test  # the two calibrations differ clearly on these files
    assert saved["threshold"] == saved["calibrations"]["deployable"]["threshold"] == deployed
    assert saved["calibrations"]["test_calibrated"]["threshold"] == from_test
    report = (tmp_path / "lex" / "anomaly_report.md").read_text()
    assert f"| normal validation data | {deployed:.4g} |" in report
    assert "Deployable threshold (embed.calibration=bound): 0 of the 60 normal validation documents" in report


@pytest.mark.slow
def test_two_ranks_score_as_one(tmp_path, http_docs, tokenizer):
    model = tmp_path / "mlm"
    _bert(len(tokenizer)).save_pretrained(model)
    tokenizer.save_pretrained(model)
    paths = _files(tmp_path, http_docs)
    for ranks in (1, 2):
        launch(
            _anomaly_args(paths, model, tmp_path / f"r{ranks}"),
            ranks=ranks,
            script=ROOT / "launch" / "anomaly.py",
        )
    one, two = (json.loads((tmp_path / f"r{r}" / "anomaly.json").read_text()) for r in (1, 2))
    assert one["test"] == two["test"] > 50 and one["valid_attack"] > 5
    assert len(one["token_score_validation"]) == 8  # mean, max, top-k, novel of nll and of excess surprise
    for choice, r in one["token_score_validation"].items():
        assert r == pytest.approx(two["token_score_validation"][choice])
    for name in ("mahalanobis", "knn", "mlm", "lexical"):
        assert one["components"][name]["auroc"] == pytest.approx(two["components"][name]["auroc"], abs=1e-9)
    assert one["threshold"] == pytest.approx(two["threshold"], rel=1e-6)
    reports = [(tmp_path / f"r{r}" / "anomaly_report.jsonl").read_text().splitlines() for r in (1, 2)]
    assert [json.loads(x)["id"] for x in reports[0]] == [json.loads(x)["id"] for x in reports[1]]


def test_ablation_by_mlm_surprise_says_why_the_base_has_no_row(tmp_path, http_docs, tokenizer):
    """launch/ablation.py --ablation.score=mlm: the base encoder has no MLM head, so its row says so; the adapted
    one (its head trained by launch/mlm.py) is scored."""
    from dapt.tools.ablation import run

    base = tmp_path / "base"
    _bert(len(tokenizer), mlm=False).save_pretrained(base)
    tokenizer.save_pretrained(base)
    paths = _files(tmp_path, http_docs)
    dapt = {
        "data": {"format": "http", "train": [str(paths["normal_train"])], "max_seq_length": 96},
        "train": {"max_steps": 4, "micro_batch_size": 8, "eval_every": 0},
        "checkpoint": {"every": 0},
        "log": {"progress": False},
    }
    evaluation = {
        "data": {
            "format": "http",
            "volatile": ["cookie"],
            "train": [str(paths["normal_train"])],
            "test": [str(paths["normal_test"]), str(paths["attack_test"])],
            "max_seq_length": 96,
        },
        "classify": {"label_files": {"normal*": "normal", "attack*": "attack"}},
        "embed": {"score": "mahalanobis", "valid_from_test": 0.3},
        "log": {"progress": False},
    }
    for name, doc in (("dapt", dapt), ("eval", evaluation)):
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(doc))
    result = run(
        load_config(
            [
                "--ablation.base",
                str(base),
                "--ablation.dapt_recipe",
                str(tmp_path / "dapt.yaml"),
                "--ablation.eval_recipe",
                str(tmp_path / "eval.yaml"),
                "--ablation.protocol=anomaly",
                "--ablation.score=mlm",
                "--output_dir",
                str(tmp_path / "abl"),
                "--log.progress=false",
            ]
        )
    )
    assert "no trained MLM head" in result["results"]["base"]["not_scored"]
    adapted = result["results"]["+DAPT"]
    assert (
        adapted["score"] == "mlm"
        and 0 < adapted["auroc"] <= 1
        and adapted["recall_test_calibrated"] is not None
    )
    assert (tmp_path / "abl" / "eval_dapt_mlm" / "anomaly.json").exists()  # a folder per score: nothing stale
    saved = json.loads((tmp_path / "abl" / "ablation_mlm.json").read_text())["results"]
    assert "no trained MLM head" in saved["base"]["not_scored"] and saved["+DAPT"]["score"] == "mlm"
    table = (tmp_path / "abl" / "ablation_mlm.md").read_text()
    assert "| base | n/a | n/a | n/a | n/a |" in table and "base: not scored: model.name_or_path" in table
    assert "| +DAPT | " in table and "recall_test_calibrated" in table


def test_the_threshold_flags_at_most_the_share_asked_for_when_it_is_no_whole_count():
    """30 normal scores at 5%: 1.5 may lie above, so 1 does (never 2)."""
    normal = np.arange(30, dtype=float)
    threshold = threshold_for(normal, 0.05)
    assert threshold == 28.0 and int((normal > threshold).sum()) == 1


def test_a_score_at_the_threshold_is_not_flagged():
    result = evaluate_detector(
        np.array([1.0, 2.0, 2.0, 3.0]), np.array([False, False, False, True]), 2.0, curve=False
    )
    assert result["test_fpr"] == 0.0 and result["recall_at_max_fpr"] == 1.0


def test_fused_components_are_calibrated_on_normal_validation_documents_only():
    """Each component's tail scores rank against the normal validation documents; extreme validation attacks must
    not move them."""
    rng = np.random.default_rng(0)
    attack = np.array([False] * 40 + [True] * 10)
    values = {
        name: (np.concatenate([rng.normal(size=40), np.full(10, 50.0)]), rng.normal(size=30))
        for name in ("a", "b")
    }
    valid, test = fuse(values, ["a", "b"], "sum", attack)
    normal = {name: v[~attack] for name, (v, _) in values.items()}
    own = [tail_scores(normal[n], values[n][0], own=~attack) for n in "ab"]
    assert np.allclose(valid, combine(own, "sum", 40))
    assert np.allclose(test, combine([tail_scores(normal[n], values[n][1]) for n in "ab"], "sum", 40))


def test_each_calibration_keeps_its_promise_for_new_normal_traffic():
    """Thresholds from 700 normal validation scores, 2,000 times; the FPR on new normal traffic is known exactly
    (standard normal scores). The quantile exceeds the 5% asked for about half the time, the conformal quantile's
    expected FPR is 5%, and the bound exceeds it at most 5% of the time; guarantee's probability and interval are
    those seen over the draws."""
    from scipy import stats

    from dapt.runtime.calibration import allowed_above, guarantee, normal_needed

    rng = np.random.default_rng(0)
    draws = [rng.normal(size=700) for _ in range(2000)]
    fpr = {
        method: np.array([1 - stats.norm.cdf(threshold_for(v, 0.05, method, 0.95)) for v in draws])
        for method in ("quantile", "conformal", "bound")
    }
    assert (fpr["quantile"] > 0.05).mean() > 0.4 and fpr["conformal"].mean() <= 0.0505
    assert (fpr["bound"] > 0.05).mean() <= 0.06 and fpr["bound"].mean() < 0.045
    # how many of n lie above: the quantile's floor(0.05 n), conformal's n - ceil(0.95 (n + 1)), the bound's
    assert [allowed_above(700, 0.05, m) for m in ("quantile", "conformal", "bound")] == [35, 34, 25]
    assert allowed_above(60, 0.05, "conformal") == 2 and allowed_above(18, 0.05, "conformal") == -1
    promised = guarantee(draws[0], 0.05, "bound", 0.95)
    assert promised["above_threshold"] == 25 and promised["enough"]
    assert abs(promised["p_fpr_at_most_max"] - (fpr["bound"] <= 0.05).mean()) < 0.015
    low, high = promised["fpr_interval_95"]
    assert (
        abs(low - np.quantile(fpr["bound"], 0.025)) < 0.002
        and abs(high - np.quantile(fpr["bound"], 0.975)) < 0.003
    )
    # the fewest validation documents each can keep its promise with; below it the maximum, and the report says so
    assert [normal_needed(0.05, 0.95, m) for m in ("quantile", "conformal", "bound")] == [1, 19, 59]
    assert allowed_above(59, 0.05, "bound") == 0 and allowed_above(58, 0.05, "bound") == -1
    assert threshold_for(np.arange(58.0), 0.05, "bound") == 57.0
    short = guarantee(np.arange(18.0), 0.05, "conformal", 0.95)
    assert not short["enough"] and short["normal_needed"] == 19
    from dapt.runtime.anomaly_report import calibration_sentence

    assert "too few for its promise (19 needed)" in calibration_sentence(short, 0.05)
    # tied scores: fewer lie above than planned, and the count reported is the real one
    tied = guarantee(np.r_[np.zeros(650), np.arange(50.0)], 0.05, "quantile", 0.95)
    assert tied["planned_above"] == 35 and tied["above_threshold"] == 35
    tied = guarantee(np.r_[np.zeros(680), np.ones(20)], 0.05, "quantile", 0.95)
    assert tied["planned_above"] == 35 and tied["above_threshold"] == 20  # the 680 zeros tie at the threshold


def test_fused_validation_scores_are_drawn_as_new_ones():
    """A normal validation document's tail counts only the OTHER normal validation documents: the threshold its fused
    score sets flags new normal documents at the rate asked, or less (counting itself, the threshold was one rank
    per component too low: three components flagged 6.1% instead of 5.3%). With the max rule on few documents, where
    fused scores tie in groups, the bound still holds."""
    rng = np.random.default_rng(0)
    fpr = []
    for _ in range(300):
        values = {name: (rng.normal(size=300), rng.normal(size=5000)) for name in "abc"}
        fused_valid, fused_test = fuse(values, list("abc"), "sum", np.zeros(300, bool))
        fpr.append(float((fused_test > threshold_for(fused_valid, 0.05)).mean()))
    assert 0.049 < np.mean(fpr) <= 16 / 301 + 0.001  # at most the quantile's expected FPR, (k + 1) / (n + 1)
    over = []
    for _ in range(400):
        values = {name: (rng.normal(size=60), rng.normal(size=5000)) for name in "abc"}
        fused_valid, fused_test = fuse(values, list("abc"), "max", np.zeros(60, bool))
        over.append(float((fused_test > threshold_for(fused_valid, 0.05, "bound", 0.95)).mean()) > 0.05)
    assert np.mean(over) <= 0.06


def test_too_few_normal_documents_take_their_maximum_and_say_so_once(caplog):
    """46 normal validation scores cannot give the bound's promise (59 needed): the threshold is their maximum, said
    once per run however often the fusion and the re-splits ask."""
    from dapt.runtime import calibration

    calibration._WARNED.clear()  # said before in this process, by another test's run
    scores = np.arange(46.0)
    with caplog.at_level("WARNING", logger="dapt"):
        assert {
            threshold_for(np.random.default_rng(i).permutation(scores), 0.05, "bound") for i in range(5)
        } == {45.0}
    said = [r for r in caplog.records if "cannot keep the FPR" in r.getMessage()]
    assert (
        len(said) == 1
        and "46 normal validation documents" in said[0].getMessage()
        and "59 needed" in said[0].getMessage()
    )


def test_resampling_measures_each_calibration_on_other_draws():
    """The run's documents pooled and split 20 times as the run's were: on exchangeable normal traffic the bound
    keeps the test FPR at most 5% in nearly every split, the empirical quantile in about half."""
    from types import SimpleNamespace

    from dapt.runtime.fusion import resampled

    rng = np.random.default_rng(3)
    split = SimpleNamespace(
        valid_attack=np.r_[np.zeros(700, bool), np.ones(60, bool)],
        test_attack=np.r_[np.zeros(2000, bool), np.ones(400, bool)],
    )
    values = {
        name: (
            np.r_[rng.normal(size=700), rng.normal(3, 1, 60)],
            np.r_[rng.normal(size=2000), rng.normal(3, 1, 400)],
        )
        for name in "ab"
    }
    held = {}
    for method in ("quantile", "bound"):
        e = SimpleNamespace(max_fpr=0.05, calibration=method, confidence=0.95)
        held[method] = resampled(values, "sum", split, e, seed=0)
    assert held["bound"]["fpr_at_most_max"] >= 19 and held["quantile"]["fpr_at_most_max"] <= 15
    assert (
        0.9 < np.mean(held["bound"]["recall"]) < np.mean(held["quantile"]["recall"])
    )  # the price of the promise
    assert all(0 < r < 1 for r in held["bound"]["recall_at_exactly_max_fpr"])


def test_the_resampling_promise_counts_the_test_parts_own_scatter():
    """A test part of 709 normal documents shows its own FPR, which scatters around the FPR on all new traffic: the
    bound's 95% becomes about 90% there. resampled's promised count says so, and matches what the re-splits see."""
    from types import SimpleNamespace

    from dapt.runtime.calibration import observed_within
    from dapt.runtime.fusion import resampled

    split = SimpleNamespace(
        valid_attack=np.r_[np.zeros(674, bool), np.ones(50, bool)],
        test_attack=np.r_[np.zeros(709, bool), np.ones(450, bool)],
    )
    e = SimpleNamespace(max_fpr=0.05, calibration="bound", confidence=0.95)
    seen = promised = 0.0
    for seed in range(20):
        rng = np.random.default_rng(100 + seed)
        values = {
            "a": (
                np.r_[rng.normal(size=674), rng.normal(3, 1, 50)],
                np.r_[rng.normal(size=709), rng.normal(3, 1, 450)],
            )
        }
        again = resampled(values, None, split, e, seed=seed)
        seen, promised = seen + again["fpr_at_most_max"], promised + again["promised_at_most_max"]
        assert (
            17 < again["promised_at_most_max"] < 18.5
        )  # 24 of 674 above: 0.895 a round, not the bound's 0.953
    assert abs(seen - promised) < 12, (seen, promised)  # 400 rounds: about 358 expected
    # the law itself: more test documents, nearer the bound's probability; k = 24 of 674 is the bound's threshold
    assert observed_within(674, 24, 709, 0.05) < observed_within(674, 24, 100_000, 0.05) < 0.9533
    assert abs(observed_within(674, 24, 10**7, 0.05) - 0.9533) < 0.002
    # a small test part, where "at most 5%" of 30 documents means at most 1 above: simulated directly, 40,000 times
    # (standard error 0.0023; Beta(k, n - k) or a plain binomial at 24/674 would be 0.015 off, ceil for floor 0.2)
    rng, within = np.random.default_rng(7), []
    for _ in range(10):
        draws = rng.normal(size=(4000, 674 + 30))
        threshold = -np.partition(-draws[:, :674], 24, axis=1)[
            :, 24
        ]  # 24 of the 674 validation scores above it
        within.append((draws[:, 674:] > threshold[:, None]).sum(axis=1) <= 1)
    assert abs(np.mean(within) - observed_within(674, 24, 30, 0.05)) < 0.008
