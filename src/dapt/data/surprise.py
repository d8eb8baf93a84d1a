"""How surprising each token of a document is to a masked language model, for launch/anomaly.py's embed.score=mlm.

Every document is scored under the same K fixed mask patterns: position p is masked in pattern k when
(u_p + k * rate) mod 1 < rate, with u drawn once from the run's seed. With K * rate <= 1 the patterns are disjoint
(K = 1 / rate masks every token exactly once). A token's surprise is the negative log-likelihood the model gives the
true token at a masked position (averaged over the patterns that mask it); tokens never masked, and special tokens,
have none. Its excess surprise is that NLL minus the entropy of the model's prediction there (the NLL it
expected): a random name where any name may come is not surprising beyond expectation, a quote where only a digit
may come is. A document's score aggregates its tokens' surprises; `novel` sums them over the tokens that touch a
character n-gram never seen in normal training documents (data/novelty.py), per masked token: surprise where the
text is new too. The MLM head runs at the masked positions only (model/sparse.py), and each rank scores documents
r, r + W, ... in batches of (document, pattern) rows.

launch/anomaly.py scores documents by one aggregate of one measure (embed.token_score, embed.token_surprise): given,
or with `auto` chosen on the validation documents (choose_surprise; runtime/fusion.py says how choices are made).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from dapt.config.schema import BadInput
from dapt.data.formats import Document
from dapt.data.labelled import padded
from dapt.data.novelty import CharNovelty
from dapt.data.packing import pack
from dapt.model.sparse import SparsePrediction, supports_sparse
from dapt.runtime import group
from dapt.runtime.anomaly_report import surprise_phrase
from dapt.runtime.fusion import choose, separations

AGGREGATES = ("mean", "max", "topk", "novel")
MEASURES = ("nll", "excess")

log = logging.getLogger("dapt")


@dataclass
class Surprise:
    """One document's tokens (ids, with special tokens), each token's surprise in nats and the entropy of the model's
    prediction at its position (NaN: not masked); whether each token touches a novel character n-gram, once known
    (CharNovelty.novel_tokens)."""

    ids: np.ndarray
    nll: np.ndarray
    entropy: np.ndarray
    novel: np.ndarray | None = None

    def of(self, measure: str) -> np.ndarray:
        """Each token's surprise: nll, or excess (nll - entropy)."""
        return self.nll if measure == "nll" else self.nll - self.entropy

    def score(self, how: str, k: int, measure: str = "nll") -> float:
        """mean: the mean over masked tokens; max: the largest; topk: the mean of the k largest; novel: the sum over
        the masked tokens that touch a novel n-gram, divided by the number of masked tokens."""
        v = self.of(measure)
        masked = ~np.isnan(v)
        if how == "novel":
            if self.novel is None:
                raise ValueError(
                    "embed.token_score=novel needs each token's novelty: a fast tokenizer (offsets)"
                )
            return float(v[masked & self.novel].sum() / masked.sum()) if masked.any() else 0.0
        v = v[masked]
        if not len(v):
            return 0.0
        if how == "mean":
            return float(v.mean())
        if how == "max":
            return float(v.max())
        return float(np.sort(v)[-k:].mean())

    def top(
        self, tokenizer, n: int, measure: str = "nll", novel_only: bool = False
    ) -> list[tuple[str, float]]:
        """The n most surprising tokens by `measure`, most surprising first, as (token, nats); with `novel_only`, of
        the novel tokens (those the novel aggregate counts) when there are any."""
        v = self.of(measure)
        scored = ~np.isnan(v)
        if novel_only and self.novel is not None and (scored & self.novel).any():
            scored &= self.novel
        masked = np.flatnonzero(scored)
        order = masked[np.argsort(-v[masked], kind="stable")][:n]
        names = tokenizer.convert_ids_to_tokens(self.ids[order].tolist())
        return [(name, round(float(v[i]), 3)) for name, i in zip(names, order)]


def unscored_ids(tokenizer) -> list[int]:
    """Token ids that are never masked or scored: the sequence markers, padding and the mask itself. The unknown token
    is scored: a character the vocabulary lacks may be what makes a request odd."""
    ids = (getattr(tokenizer, f"{t}_token_id", None) for t in ("cls", "sep", "pad", "mask", "bos", "eos"))
    return sorted({i for i in ids if i is not None})


def mask_patterns(max_len: int, patterns: int, rate: float, seed: int) -> np.ndarray:
    """(patterns, max_len) booleans: which positions each fixed pattern masks."""
    u = np.random.default_rng(seed).random(max_len)
    return np.stack([((u + k * rate) % 1.0) < rate for k in range(patterns)])


@dataclass(frozen=True)
class Masking:
    """How token surprise is measured: rows of `max_len` tokens, `patterns` fixed masks at `rate` from `seed`, forwards
    of `batch` (row, pattern) pairs, the sparse head where the model has one."""

    max_len: int
    batch: int
    patterns: int
    rate: float
    seed: int
    sparse_head: bool = True

    @classmethod
    def of_run(cls, cfg) -> Masking:
        """A run's settings: rows of data.max_seq_length, batches of train.micro_batch_size, embed.mask_patterns
        fixed masks at embed.mask_rate from the run's seed, the sparse head as train.sparse_prediction says."""
        e = cfg.embed
        return cls(
            max_len=cfg.data.max_seq_length,
            batch=cfg.train.micro_batch_size,
            patterns=e.mask_patterns,
            rate=e.mask_rate,
            seed=cfg.seed,
            sparse_head=cfg.train.sparse_prediction,
        )


@torch.no_grad()
def token_surprise(model, tokenizer, docs: list[Document], how: Masking, device) -> list[Surprise]:
    """Every document's Surprise (each rank computes its share; every rank returns all, in document order)."""
    rows = pack("pad", tokenizer, [d.text for d in docs], [d.id for d in docs], how.max_len)
    scorer = _Scorer(model, tokenizer, rows, how, device)
    try:
        for start in range(0, len(scorer.work), how.batch):
            scorer.score(scorer.work[start : start + how.batch])
    finally:
        if scorer.sparse:
            scorer.sparse.handle.remove()
    out: list[Surprise | None] = [None] * len(rows)
    mine = [
        (i, rows[i].ids, total / np.where(scorer.counts[i] > 0, scorer.counts[i], np.nan))
        for i, total in scorer.totals.items()
    ]
    for part in group.gather(mine):
        for i, ids, (nll, entropy) in part:
            out[i] = Surprise(np.asarray(ids), nll, entropy)
    return out


def run_surprise(cfg, model, tokenizer, docs: list[Document], device) -> list[Surprise]:
    """token_surprise with a run's settings (Masking.of_run: launch/anomaly.py and launch/predict.py score alike)."""
    return token_surprise(model, tokenizer, docs, Masking.of_run(cfg), device)


def aggregates_for(token_score: str, tokenizer) -> tuple[str, ...]:
    """The aggregates embed.token_score allows (auto: every one). novel needs token offsets: without a fast tokenizer,
    auto leaves it out and token_score=novel is an error."""
    aggregates = AGGREGATES if token_score == "auto" else (token_score,)
    if not getattr(tokenizer, "is_fast", False):  # no offsets: no token's novelty
        if token_score == "novel":
            raise BadInput(
                f"embed.token_score=novel needs token offsets, which {type(tokenizer).__name__} "
                "(not a fast tokenizer) lacks: choose mean, max, topk or auto"
            )
        aggregates = tuple(a for a in aggregates if a != "novel")
    return aggregates


def document_surprises(
    cfg, model, tokenizer, docs: list[Document], device, novelty: CharNovelty | None = None
) -> list[Surprise]:
    """run_surprise; with `novelty` (fitted on normal training documents), each token's novelty too, which the novel
    aggregate needs."""
    found = run_surprise(cfg, model, tokenizer, docs, device)
    if novelty is not None:
        texts = [d.text for d in docs]
        for s, flags in zip(found, novelty.novel_tokens(tokenizer, texts, cfg.data.max_seq_length)):
            if len(flags) != len(s.ids):
                raise RuntimeError(f"{len(flags)} novelty flags for the {len(s.ids)} tokens scored")
            s.novel = flags
    return found


def surprise_scores(surprises: list[Surprise], how: str, k: int, measure: str) -> np.ndarray:
    """Each document's score: the `how` aggregate of its tokens' `measure` surprise."""
    return np.array([s.score(how, k, measure) for s in surprises])


def choose_surprise(
    valid: list[Surprise], valid_attack: np.ndarray, aggregates: tuple[str, ...], e
) -> tuple[str, str, dict]:
    """The aggregate and measure a document's score takes (embed.token_score, embed.token_surprise; e: cfg.embed):
    among those allowed, the pair whose validation scores separate the validation attacks best; without validation
    attacks, topk (or the one aggregate allowed) of the first measure. Returns both and the table chosen by."""
    measures = MEASURES if e.token_surprise == "auto" else (e.token_surprise,)
    pairs = {f"{agg} of {measure}": (agg, measure) for measure in measures for agg in aggregates}

    def validation(label: str) -> np.ndarray:
        how, measure = pairs[label]
        return surprise_scores(valid, how, e.top_k, measure)

    best, table = choose(pairs, validation, valid_attack, e.max_fpr)
    how, measure = pairs[best] if best else ("topk" if len(aggregates) > 1 else aggregates[0], measures[0])
    if len(aggregates) * len(measures) > 1:
        why = separations(table) or "no attacks in the validation set to choose by (embed.valid_from_test)"
        log.info("embed.score=mlm takes %s: %s", surprise_phrase(how, measure), why)
    return how, measure, table


class _Scorer:
    """This rank's rows (every world-th), the (row, pattern) pairs with something to score, and the sums of each
    token's negative log-likelihood and entropy over the patterns that masked it."""

    def __init__(self, model, tokenizer, rows: list, how: Masking, device):
        self.model, self.tokenizer, self.rows, self.device = model, tokenizer, rows, device
        self.masks = mask_patterns(how.max_len, how.patterns, how.rate, how.seed)
        self.special = np.array(unscored_ids(tokenizer))
        rank, world = group.rank(), group.world()
        self.totals = {i: np.full((2, len(rows[i].ids)), np.nan) for i in range(rank, len(rows), world)}
        self.counts = {i: np.zeros(len(rows[i].ids)) for i in self.totals}
        self.work = [(i, k) for i in self.totals for k in range(how.patterns) if self._masked(i, k).any()]
        self.sparse = SparsePrediction(model) if how.sparse_head and supports_sparse(model) else None

    def _masked(self, i: int, k: int) -> np.ndarray:
        ids = self.rows[i].ids
        return self.masks[k, : len(ids)] & ~np.isin(ids, self.special)

    def score(self, chunk: list[tuple[int, int]]) -> None:
        """One forward over `chunk`'s (row, pattern) pairs; their tokens' surprise added to the sums."""
        rows, device = self.rows, self.device
        ids, attention = padded([rows[i].ids for i, _ in chunk], self.tokenizer.pad_token_id or 0)
        masked = torch.zeros(ids.shape, dtype=torch.bool)
        for j, (i, k) in enumerate(chunk):
            masked[j, : len(rows[i].ids)] = torch.from_numpy(self._masked(i, k))
        labels = ids[masked]
        inputs = ids.masked_fill(masked, self.tokenizer.mask_token_id)
        forward = {"input_ids": inputs.to(device), "attention_mask": attention.to(device)}
        if self.sparse:
            with self.sparse.select(masked.to(device)):
                logits = self.model(**forward).logits[0]
        else:
            logits = self.model(**forward).logits[masked.to(device)]
        logp = torch.log_softmax(logits.float(), dim=-1)
        nll = -logp.gather(1, labels.to(device)[:, None])[:, 0]
        # -sum p log p, in place on p (peak: two vocabulary-wide tensors); p = 0 at a -inf logit counts 0, not NaN
        plogp = logp.exp().mul_(logp).nan_to_num_(nan=0.0)
        entropy = -plogp.sum(-1)
        both = torch.stack([nll, entropy]).cpu().numpy()  # (2, masked positions)
        at = 0
        for j, (i, _) in enumerate(chunk):
            positions = np.flatnonzero(masked[j].numpy())
            values = both[:, at : at + len(positions)]
            at += len(positions)
            self.totals[i][:, positions] = np.nan_to_num(self.totals[i][:, positions]) + values
            self.counts[i][positions] += 1
