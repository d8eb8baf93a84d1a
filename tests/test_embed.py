"""Embeddings and Mahalanobis anomaly detection."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import ROOT, shared_slice
from scipy import stats
from transformers import BertConfig, BertForMaskedLM

from dapt.model.build import train_wordpiece
from dapt.runtime.calibration import threshold_for
from dapt.runtime.detectors import Mahalanobis, NearestNormal, evaluate_detector

SHARED = ROOT.parent / "shared" / "data"


def test_mahalanobis_on_gaussians_gives_the_known_recall_and_fpr():
    """Normal data N(0, S), anomalies shifted by delta: squared distances are chi2(d) and noncentral chi2(d, lam)."""
    rng = np.random.default_rng(0)
    d, n = 6, 40000
    a = rng.normal(size=(d, d))
    cov = a @ a.T + d * np.eye(d)
    chol = np.linalg.cholesky(cov)
    delta = chol @ np.array([2.0, 0, 0, 0, 0, 0])  # a shift of Mahalanobis length 2
    normal_train, normal_valid, normal_test = (rng.normal(size=(n, d)) @ chol.T for _ in range(3))
    attacks = rng.normal(size=(n, d)) @ chol.T + delta
    det = Mahalanobis("ledoit_wolf").fit(normal_train)
    threshold = threshold_for(det.score(normal_valid), 0.05)
    assert threshold == pytest.approx(stats.chi2.ppf(0.95, d), rel=0.03)
    scores = det.score(np.vstack([normal_test, attacks]))
    result = evaluate_detector(scores, np.r_[np.zeros(n, bool), np.ones(n, bool)], threshold)
    assert result["test_fpr"] == pytest.approx(0.05, abs=0.006)
    assert result["recall_at_max_fpr"] == pytest.approx(
        stats.ncx2.sf(stats.chi2.ppf(0.95, d), d, 4.0), abs=0.012
    )
    assert 0.5 < result["auroc"] < 1.0 and len(result["roc_curve"]["fpr"]) > 10


def test_fixed_shrinkage_and_threshold_semantics():
    x = np.random.default_rng(1).normal(size=(500, 4))
    det = Mahalanobis("0.3").fit(x)
    assert det.coefficient == pytest.approx(0.3)
    scores = np.arange(100.0)
    t = threshold_for(scores, 0.05)
    assert (scores > t).mean() <= 0.05 and (scores >= t).mean() > 0.05


def test_nearest_normal_measures_to_the_kth_neighbour_after_centring():
    """Normal embeddings in three tight clusters far from the origin (as an encoder's share one direction): a point
    between two of them is far from all three, which neither a Gaussian nor uncentred cosine sees."""
    rng = np.random.default_rng(0)
    offset = np.full(8, 50.0)  # the shared direction: uncentred, every cosine similarity is ~1
    a, b, c = np.eye(8)[:3] * 4
    normal = np.vstack([offset + v + rng.normal(0, 0.1, (200, 8)) for v in (a, b, c)])
    det = NearestNormal(k=5).fit(normal)
    inlier, between, elsewhere = offset + a, offset + (a + b) / 2, offset + np.eye(8)[3] * 4
    s = det.score(np.vstack([inlier, between, elsewhere]))
    # centred, `between` is (a + b - 2c) / 6 and each cluster e.g. (2a - b - c) / 3: cosine 0.5 at best
    assert s[0] < 0.01 and 0.35 < s[1] < 0.55 and s[2] > 0.9  # 0.5 to the centres; noise brings some nearer
    # the normal mean itself: no direction, distance 1
    assert det.score(det.mean[None])[0] == pytest.approx(1.0)
    gauss = Mahalanobis("ledoit_wolf").fit(normal).score(np.vstack([inlier, between]))
    # the Gaussian finds the point between clusters more normal than a cluster's centre
    assert gauss[1] < gauss[0]
    far_out = det.mean + 3 * (inlier - det.mean)  # three times as far from the normal mean as cluster a
    assert det.score(far_out[None])[0] < 0.01  # as normal as cluster a by cosine ...
    assert Mahalanobis().fit(normal).score(far_out[None])[0] > 5 * gauss[0]  # ... which a Gaussian sees
    # the k-th, not the nearest: a copy of one stray normal point is near to 1 neighbour, far from the 5th
    stray = offset + np.eye(8)[3] * 4
    with_stray = np.vstack([normal, stray])
    assert NearestNormal(k=1).fit(with_stray).score(stray[None])[0] < 1e-6
    assert NearestNormal(k=1).fit(normal).score(normal).min() == 0.0  # float32 rounding clipped: never -1e-7
    assert NearestNormal(k=5).fit(with_stray).score(stray[None])[0] > 0.9
    # scored in chunks as at once; k is at most the number of normal documents, and at least 1
    x = rng.normal(size=(50, 8)) + offset
    whole = NearestNormal(5).fit(normal).score(x)
    assert NearestNormal(5, chunk=7).fit(normal).score(x) == pytest.approx(whole, abs=1e-6)
    assert NearestNormal(5).fit(normal[:3]).k == 3
    with pytest.raises(ValueError, match="k must be >= 1"):
        NearestNormal(0)


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    """A small untrained BERT saved as a Hugging Face folder, with a tokenizer learnt on HTTP-like text."""
    from dapt.data.corpus import generate

    path = tmp_path_factory.mktemp("enc")
    tok = train_wordpiece(generate(800, seed=2), 600, 64)
    torch.manual_seed(0)  # the same weights whatever ran before
    BertForMaskedLM(
        BertConfig(
            vocab_size=len(tok),
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=128,
        )
    ).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _run(fn, argv):
    from dapt.cli.load import load_config

    return fn(load_config([str(a) for a in argv + ["--log.progress=false"]], world_size=1, accelerator="cpu"))


def test_embed_writes_npz_per_split(encoder, tmp_path, corpus_file):
    from dapt.tasks.embed import run as run_embed

    out = tmp_path / "emb"
    result = _run(
        run_embed,
        [
            "--model.name_or_path",
            encoder,
            "--data.train",
            corpus_file,
            "--output_dir",
            out,
            "--embed.pooling=cls",
            "--data.valid_fraction=0.2",
        ],
    )
    assert set(result["files"]) == {"train", "valid"}
    train = np.load(out / "embeddings_train.npz")
    assert train["embeddings"].shape == (len(train["ids"]), 32) and np.isfinite(train["embeddings"]).all()
    assert len(np.unique(train["embeddings"][:, 0])) > 10  # real, distinct vectors
    assert str(train["ids"][0]).startswith(str(corpus_file))


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is absent")
def test_anomaly_end_to_end_on_csic(encoder, tmp_path):
    """Seed 000's protocol on real CSIC slices, scored by the fusion of Mahalanobis distance, MLM surprise and lexical
    novelty, validated on a share of the test files: both calibrations, every component, the report and the plot."""
    from dapt.tasks.anomaly import run as run_anomaly

    csic = SHARED / "csic2010"
    train = shared_slice(csic / "normalTrafficTraining.txt.gz", tmp_path / "normalTrain.txt", 14000)
    normal = shared_slice(csic / "normalTrafficTest.txt.gz", tmp_path / "normalTest.txt", 6000)
    attack = shared_slice(csic / "anomalousTrafficTest.txt.gz", tmp_path / "anomalousTest.txt", 6000)
    out = tmp_path / "anomaly"
    result = _run(
        run_anomaly,
        [
            "--model.name_or_path",
            encoder,
            "--data.format=http",
            "--data.volatile=[cookie, session_id]",
            "--data.train",
            train,
            "--data.test",
            f"[{normal}, {attack}]",
            "--classify.label_files={'normal*': normal, 'anomalous*': attack}",
            "--output_dir",
            out,
            "--data.max_seq_length=128",
            "--embed.score=fused",
            "--embed.valid_from_test=0.3",
            "--embed.sample=250",
            "--embed.mask_patterns=2",
        ],
    )
    saved = json.loads((out / "anomaly.json").read_text())
    for key in (
        "recall_at_max_fpr",
        "max_fpr",
        "test_fpr",
        "threshold",
        "auroc",
        "calibrations",
        "components",
    ):
        assert key in saved, key
    assert (
        saved["max_fpr"] == 0.05 and saved["train_normal"] > 500 and result["threshold"] == saved["threshold"]
    )
    assert 100 < saved["valid_normal"] + saved["valid_attack"] <= 250 and saved["valid_attack"] > 30
    assert saved["test"] == 250  # embed.sample
    assert 0.0 <= saved["test_fpr"] < 0.25 and saved["auroc"] > 0.5
    assert (
        saved["components"]["lexical"]["auroc"] > 0.75
    )  # lexical novelty separates even beside an untrained MLM
    lit = saved["calibrations"]["test_calibrated"]
    assert lit["test_fpr"] <= 0.05 and lit["recall_at_max_fpr"] > 0.2  # the threshold from normal test data
    assert set(saved["components"]) == {"mahalanobis", "knn", "mlm", "lexical"} and saved["fuse"]
    assert saved["token_score"] in ("mean", "max", "topk", "novel") and saved["token_surprise"] in (
        "nll",
        "excess",
    )
    assert set(saved["token_score_validation"]) == {
        f"{how} of {measure}" for how in ("mean", "max", "topk", "novel") for measure in ("nll", "excess")
    }
    assert (
        len(saved["fuse_validation"]) == 4 + 2 * 11
    )  # each score alone, then six pairs, four triples and all four, each by sum and by max, on validation
    findings = [json.loads(line) for line in (out / "anomaly_report.jsonl").read_text().splitlines()]
    flagged_attacks = sum(f["label"] == "attack" for f in findings)
    assert flagged_attacks == round(saved["recall_at_max_fpr"] * saved["test_attack"])
    assert len(findings) - flagged_attacks == round(
        saved["test_fpr"] * (saved["test"] - saved["test_attack"])
    )
    assert findings and [f["score"] for f in findings] == sorted((f["score"] for f in findings), reverse=True)
    assert all(f["score"] > saved["threshold"] for f in findings)
    listed = {len(f["surprising_tokens"]) for f in findings}  # novel: only the tokens that counted, up to 5
    assert listed == {5} if saved["token_score"] != "novel" else listed <= {1, 2, 3, 4, 5}
    assert all(f["surprising_tokens"][0][1] >= f["surprising_tokens"][-1][1] for f in findings)
    assert any(f["novel_spans"] for f in findings)
    page = (out / "anomaly_report.md").read_text()
    assert (
        "| normal validation data |" in page
        and "| normal test data |" in page
        and findings[0]["id"].rsplit("/", 1)[-1] in page
    )
    assert (out / "plots" / "roc.png").stat().st_size > 1000


@pytest.mark.slow
def test_two_ranks_write_the_same_embeddings_as_one(encoder, tmp_path, corpus_file):
    from conftest import launch

    args = [
        "--model.name_or_path",
        encoder,
        "--data.train",
        corpus_file,
        "--data.valid_fraction=0",
        "--log.progress=false",
    ]
    for ranks in (1, 2):
        launch(
            args + ["--output_dir", tmp_path / f"r{ranks}"], ranks=ranks, script=ROOT / "launch" / "embed.py"
        )
    one, two = (np.load(tmp_path / f"r{r}" / "embeddings_train.npz") for r in (1, 2))
    assert list(one["ids"]) == list(two["ids"]) and len(one["ids"]) == 1200
    assert np.allclose(one["embeddings"], two["embeddings"], atol=1e-5)
