"""The training run's typed state, unit by unit: which evaluation is better (each metric's own direction, and the
index entries dapt 0.2 wrote), where a resumed run's best comes from, which checkpoint lies before a step (from the
index, never from a folder's name)."""

from __future__ import annotations

import json

from dapt.runtime.checkpoint import Checkpointer, Score
from dapt.runtime.runner import TrainState
from dapt.runtime.train import Evaluation, Progress


def test_an_evaluation_beats_the_best_in_its_metric_s_direction():
    f1 = Evaluation({"macro_f1": 0.9, "accuracy": 0.5}, "macro_f1", higher_is_better=True)
    loss = Evaluation({"loss": 1.0}, "loss", higher_is_better=False)
    assert f1.beats(None) and f1.beats(0.8) and not f1.beats(0.95) and not f1.beats(0.9)
    assert loss.beats(None) and loss.beats(1.5) and not loss.beats(0.5) and not loss.beats(1.0)
    assert f1.as_score() == Score("macro_f1", 0.9, True)


def test_a_score_against_the_index_s_best_new_and_dapt_0_2_entries():
    assert Score("macro_f1", 0.9, True).beats({"tag": "a", "score": 0.8, "higher_is_better": True})
    assert not Score("macro_f1", 0.7, True).beats({"tag": "a", "score": 0.8, "higher_is_better": True})
    assert not Score("macro_f1", 0.8, True).beats(
        {"tag": "a", "score": 0.8, "higher_is_better": True}
    )  # a tie
    # dapt 0.2 kept a loss as eval_loss, and a classifier's score negated in the same slot: lower was better
    assert not Score("loss", 2.0, False).beats({"tag": "a", "eval_loss": 1.0})
    assert Score("loss", 0.5, False).beats({"tag": "a", "eval_loss": 1.0})
    assert Score("macro_f1", 0.9, True).beats({"tag": "a", "eval_loss": -0.8})
    assert not Score("macro_f1", 0.7, True).beats({"tag": "a", "eval_loss": -0.8})


def test_a_resumed_run_keeps_its_best_patience_and_stop():
    saved = {"best": 0.9, "stale": 2, "stopped": None}
    assert Progress.resumed(saved, TrainState()) == Progress(0.9, 2, None)
    # an MLM checkpoint of dapt 0.2 kept its best evaluation loss in the counters, not in the task's state
    assert Progress.resumed({}, TrainState(best_eval_loss=1.5)) == Progress(best=1.5)
    assert Progress.resumed({}, TrainState()) == Progress()


def test_the_checkpoint_before_a_step_comes_from_the_index_not_the_names(tmp_path):
    """Folders named against their steps: only the steps the index records can give the right answer."""
    root = tmp_path / "checkpoints"
    for tag in ("z", "y", "x"):
        (root / tag).mkdir(parents=True)
    index = {"latest": "x", "saved": ["z", "y", "x"], "steps": {"z": 3, "y": 6, "x": 9}, "best": None}
    (root / "index.json").write_text(json.dumps(index))
    store = Checkpointer(root, keep=3)
    assert store.before(6) == root / "z"  # the one at step 6 itself is not before it
    assert store.before(7) == root / "y" and store.before(100) == root / "x"
    assert store.before(3) is None


def test_without_steps_in_the_index_a_checkpoint_says_its_own(tmp_path):
    root = tmp_path / "checkpoints"
    for tag, step in (("b", 2), ("a", 4)):
        (root / tag).mkdir(parents=True)
        (root / tag / "dapt_checkpoint.json").write_text(json.dumps({"step": step}))
    (root / "index.json").write_text(json.dumps({"latest": "a", "saved": ["b", "a"], "best": None}))
    assert Checkpointer(root, keep=3).before(4) == root / "b" and Checkpointer(root, keep=3).before(2) is None
