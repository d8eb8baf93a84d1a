"""launch/mlm.py: masked-language-model training, as a task of dapt.runtime.train: the MLM data and length, model
(dense or sparse head), collator, loss over masked tokens, and evaluation on fixed masks."""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from dapt.config.schema import RunConfig
from dapt.data.masking import IGNORE, MLMCollator
from dapt.data.packing import Row
from dapt.data.prepare import Corpus, RowDataset, eval_batches, prepare_data, text_description, text_settings
from dapt.data.prepare import feeder as data_feeder
from dapt.data.stream import epoch_pass, rows_for_passes
from dapt.model.attention import forward
from dapt.model.build import build_model
from dapt.model.sparse import SparsePrediction, supports_sparse
from dapt.runtime import group
from dapt.runtime.metrics import read_metrics
from dapt.runtime.runner import ExportPoint
from dapt.runtime.train import Evaluation, Length, Run, perplexity, train

log = logging.getLogger("dapt")


# ---------------------------------------------------------------- set-up


@dataclass
class EpochPass:
    """What one pass over epoch 0 found, all ranks together (only when train.epochs sets the length)."""

    rows: int
    skipped: Counter  # every bad or filtered record of the epoch, by reason


def total_steps(cfg: RunConfig, corpus: Corpus) -> tuple[int, EpochPass | None]:
    """train.max_steps, else enough optimizer steps for every row of the corpus to be trained train.epochs times
    (its rows counted once, each rank its own streams). The last step is not dropped when it is short of a full
    global batch: it is completed with rows of the next pass."""
    t = cfg.train
    if t.max_steps:
        return t.max_steps, None
    started = time.time()
    streams = corpus.spec.streams
    mine = [c for c in range(streams) if c % group.world() == group.rank()]
    counted, skipped = epoch_pass(corpus.spec, mine)
    per_stream: dict[int, int] = {}
    total: Counter = Counter()
    for rows_of_rank, skipped_of_rank in group.gather((counted, dict(skipped))):
        per_stream |= rows_of_rank
        total.update(skipped_of_rank)
    rows = sum(per_stream.values())
    per_step = t.micro_batch_size * t.grad_accum * group.world()
    needed = rows_for_passes(per_stream, streams, t.epochs)
    steps = max(1, -(-needed // per_step))
    log.info(
        "one epoch is %d rows in %d streams (%d to %d each; counted in %.1f s, set train.max_steps to skip the "
        "count); %g epoch(s): every row trained after %d global rows = %d optimizer steps of %d rows (%d rows "
        "beyond %g x %d come from the next pass)",
        rows,
        streams,
        min(per_stream.values(), default=0),
        max(per_stream.values(), default=0),
        time.time() - started,
        t.epochs,
        needed,
        steps,
        per_step,
        steps * per_step - round(t.epochs * rows),
        t.epochs,
        rows,
    )
    return steps, EpochPass(int(rows), total)


# ---------------------------------------------------------------- the loop


def make_collator(cfg: RunConfig, tokenizer, model_config, rate: float, seed: int) -> MLMCollator:
    k = cfg.masking
    return MLMCollator(
        tokenizer,
        rate,
        mask_prob=k.mask_prob,
        random_prob=k.random_prob,
        seed=seed,
        whole_word=k.whole_word,
        mask_token_id=k.mask_token_id,
        label_vocab=getattr(model_config, "char_vocab", None),
    )


def masked_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum (not mean) of cross-entropy over masked positions, in fp32."""
    where = labels != IGNORE
    return F.cross_entropy(logits[where].float(), labels[where], reduction="sum")


def masked_logits(
    engine, batch: dict, device, sparse: SparsePrediction | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward one micro-batch: (logits at the masked positions, their labels). With `sparse`, the head sees the
    masked positions only."""

    def call(inputs: dict, keep: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        labels = batch["labels"]
        if keep is not None:  # flash attention's packed rows, flattened to their real tokens
            labels = labels[keep][None]
        labels = labels.to(device)
        where = labels != IGNORE
        if sparse is None:
            return engine(**inputs).logits[where], labels[where]
        with sparse.select(where):
            logits = engine(**inputs).logits
        return logits[0], labels[where]

    return forward(engine, batch, device, call)


def mlm_loss_sum(engine, batch: dict, device, sparse: SparsePrediction | None) -> torch.Tensor:
    """Forward one micro-batch; the sum (not mean) of cross-entropy over its masked tokens, in fp32."""
    logits, labels = masked_logits(engine, batch, device, sparse)
    return F.cross_entropy(logits.float(), labels, reduction="sum")


def mlm_model(cfg: RunConfig, tokenizer) -> tuple[torch.nn.Module, SparsePrediction | None]:
    model = build_model(cfg, tokenizer, cfg.train.precision, cfg.ds_config, task="mlm")
    sparse = SparsePrediction(model) if cfg.train.sparse_prediction and supports_sparse(model) else None
    log.info("MLM head: %s", "sparse (vocabulary projection at masked positions only)" if sparse else "dense")
    return model, sparse


def masked_count(batch: dict) -> int:
    return int((batch["labels"] != IGNORE).sum())


def row_item(g: int, row: Row) -> dict:
    return {"input_ids": row.ids, "key": g, "index": g, "lengths": row.lengths, "words": row.words}


class MaskedLM:
    """The MLM task for dapt.runtime.train: packed rows, masked by MLMCollator; the loss over masked tokens; the
    masked-token loss, accuracy and top-5 accuracy on fixed masks."""

    name, auto_class = "mlm", "AutoModelForMaskedLM"

    def prepare(self, cfg: RunConfig, out: Path) -> None:
        self.cfg = cfg
        self.corpus = prepare_data(cfg, out)
        self.tokenizer, self.eval_skipped = self.corpus.tokenizer, self.corpus.skipped
        self.streams = self.corpus.spec.streams

    def length(self, cfg: RunConfig) -> Length:
        """train.max_steps, or train.epochs of the corpus (a pass over epoch 0 counts it)."""
        steps, epoch = total_steps(cfg, self.corpus)
        return Length(
            steps,
            eval_every=cfg.train.eval_every,
            epoch_rows=epoch.rows if epoch else None,
            epoch_skipped=epoch.skipped if epoch else None,
        )

    def model(self, cfg: RunConfig) -> torch.nn.Module:
        model, self.sparse = mlm_model(cfg, self.tokenizer)
        k = cfg.masking
        self.collate = make_collator(cfg, self.tokenizer, model.config, k.rate, cfg.seed)
        # fixed masks: validation and test each get their own seed, the same at every evaluation
        self.eval_collate = {
            split: make_collator(cfg, self.tokenizer, model.config, k.eval_rate or k.rate, cfg.seed + offset)
            for split, offset in (("valid", 1), ("test", 2))
        }
        return model

    def groups(self, cfg: RunConfig, model) -> None:
        return None

    def feeder(self, cfg: RunConfig, streams: dict, rows: int):
        return data_feeder(self.corpus.spec, cfg, streams, rows)

    def micro_batches(self, rows: list) -> list[dict]:
        return [self.collate([row_item(g, row) for g, row in part]) for part in rows]

    def loss_sum(self, engine, batch: dict, device) -> torch.Tensor:
        return mlm_loss_sum(engine, batch, device, self.sparse)

    def weight(self, batch: dict) -> float:
        return masked_count(batch)

    def evaluate(self, engine, device, split: str) -> Evaluation | None:
        rows = self.corpus.valid if split == "valid" else self.corpus.test
        if not rows:
            return None
        result = evaluate(engine, rows, self.eval_collate[split], self.cfg.train, device, self.sparse)
        return Evaluation(result, "loss", higher_is_better=False, shown=tuple(result))

    def evaluated(self, run: Run, evaluation: Evaluation, improved: bool) -> None:
        return None  # no early stop; the best loss is the run's Progress.best

    def train_values(self, loss: float) -> dict:
        return {"train/perplexity": perplexity(loss)}

    def final(self, run: Run, point: ExportPoint, summary: dict) -> dict:
        """summary.json's evaluation figures (the last evaluation's, the test set's) and the model card's."""
        evals = [r for r in read_metrics(run.out / "metrics.jsonl") if "eval/loss" in r]
        summary["best_eval_loss"] = run.progress.best
        for key in ("loss", "accuracy", "top5_accuracy"):
            summary[f"final_eval_{key}"] = evals[-1].get(f"eval/{key}") if evals else None
            if summary.get("test"):  # flat, as dapt 0.2 wrote them
                summary[f"test_{key}"] = summary["test"][key]
        exported = next((r for r in evals if r["step"] == point.step), evals[-1] if evals else {})
        results = {
            f"eval {k.replace('_', ' ')}": exported.get(f"eval/{k}")
            for k in ("loss", "accuracy", "top5_accuracy")
        }
        return results | {f"test {k}": summary.get(f"test_{k}") for k in ("loss", "accuracy")}

    def text(self, cfg: RunConfig) -> tuple[dict, str]:
        settings = text_settings(cfg)
        return settings, text_description(settings)


def run(cfg: RunConfig) -> dict:
    """Train an MLM as `cfg` says; resume if a checkpoint exists; export final/; return the summary."""
    return train(cfg, MaskedLM())


@torch.no_grad()
def evaluate(
    engine, rows: list[Row], collate: MLMCollator, t, device, sparse: SparsePrediction | None = None
) -> dict:
    """Over `rows` with fixed masks, all ranks together: the masked-token loss and perplexity, `accuracy` (masked
    tokens predicted exactly) and `top5_accuracy` (the true token among the five most likely). Every rank runs the
    same number of forwards."""
    engine.eval()
    dataset = RowDataset(rows)
    sums = torch.zeros(4, dtype=torch.float64)  # loss, masked tokens, exact, in the top 5
    for items in eval_batches(len(rows), t.micro_batch_size, group.world(), group.rank(), t.eval_batches):
        weight = 1.0 if items else 0.0  # a rank with no rows left still joins the forward (ZeRO-3 gathers)
        logits, labels = masked_logits(
            engine, collate([dataset[i] for i in (items or [(0, 0)])]), device, sparse
        )
        top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
        loss = float(F.cross_entropy(logits.float(), labels, reduction="sum"))
        exact = int((top[:, 0] == labels).sum())
        in_top5 = int((top == labels[:, None]).any(-1).sum())
        sums += weight * torch.tensor([loss, len(labels), exact, in_top5], dtype=torch.float64)
    engine.train()
    loss, masked, exact, in_top5 = group.all_sum(*sums.tolist())
    mean = loss / max(masked, 1.0)
    return {
        "loss": mean,
        "perplexity": perplexity(mean),
        "accuracy": exact / max(masked, 1.0),
        "top5_accuracy": in_top5 / max(masked, 1.0),
    }
