"""Tokenizers and the one model builder: every task's model (MLM, classifier, encoder), pretrained from a hub id or
folder or built from a config with a corpus-trained tokenizer, with the same attention choice and fallback, gradient
checkpointing, ZeRO-3 partitioned loading, fp32 weights and logging."""

from __future__ import annotations

import copy
import importlib.util
import logging
import string
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerFast

import dapt.model.canine  # noqa: F401  (registers CANINE's masked-LM class with AutoModelForMaskedLM)
from dapt.config.schema import CAPITAL_MARK, BadInput, normalizer_marks
from dapt.model.archs import position_limit
from dapt.model.attention import FLASH_PACKED_MODELS
from dapt.model.hub import HubError, from_config, pretrained
from dapt.runtime.runner import parameter_count

log = logging.getLogger("dapt")

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]

# The transformers auto class of each task's model
TASKS = {
    "mlm": "AutoModelForMaskedLM",
    "classify": "AutoModelForSequenceClassification",
    "encoder": "AutoModel",
}


def label_maps(labels: list[str]) -> dict:
    """A classifier's label fields, as transformers' configs keep them."""
    return {
        "num_labels": len(labels),
        "id2label": dict(enumerate(labels)),
        "label2id": {label: i for i, label in enumerate(labels)},
    }


def capital_marks():
    """The normalizers of model.mark_capitals: each ASCII capital written as ^ and the letter."""
    from tokenizers import normalizers

    return [normalizers.Replace(c, CAPITAL_MARK + c) for c in string.ascii_uppercase]


def marks_capitals(tokenizer) -> bool:
    """Whether the tokenizer's normalizer marks capitals (model.mark_capitals, or a marked run's saved tokenizer)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return normalizer_marks(backend.normalizer if backend is not None else None)


def with_backend(tokenizer, backend) -> PreTrainedTokenizerFast:
    """`tokenizer` on another tokenizers backend (a changed normalizer or pre-tokenizer), as a generic fast tokenizer:
    transformers reloads its tokenizer.json as written (a BertTokenizer would rebuild BERT's own parts), with the
    settings a tokenizer class would otherwise bring back from its own defaults kept."""
    kept = {
        name: getattr(tokenizer, name)
        for name in (
            "model_max_length",
            "padding_side",
            "truncation_side",
            "model_input_names",
            "clean_up_tokenization_spaces",
            "extra_special_tokens",
        )
        if getattr(tokenizer, name, None) is not None
    }
    return PreTrainedTokenizerFast(tokenizer_object=backend, **kept, **tokenizer.special_tokens_map)


def mark_capitals(tokenizer, source: str) -> PreTrainedTokenizerFast:
    """`tokenizer` with each ASCII capital written as ^ and the letter before its own normalizer, so that an uncased
    (lowercasing) tokenizer reads `idA=` as `id ^ a =` instead of `ida =`. The marks live in the tokenizer's
    normalizer: offsets still point into the unmarked text, and the text itself (hash splits, n-gram scores,
    reports) is untouched. Returned as a generic fast tokenizer, which transformers reloads from tokenizer.json as
    written (a BertTokenizer would rebuild BERT's own normalizer and drop the marks), so a run's final/ keeps them.

    Raises:
        BadInput: a slow tokenizer (no tokenizers backend: CANINE reads code points and sees case already), or a
            vocabulary with no token for ^.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise BadInput(
            f"model.mark_capitals: the tokenizer of {source} ({type(tokenizer).__name__}) has no tokenizers "
            "normalizer to mark capitals in (a fast tokenizer is needed; CANINE reads code points and sees case "
            "already)"
        )
    if marks_capitals(tokenizer):
        return tokenizer
    from tokenizers import normalizers

    if backend.normalizer is None or backend.normalizer.normalize_str("A") == "A":
        log.warning(
            "model.mark_capitals: the tokenizer of %s keeps case already; capitals are marked anyway", source
        )
    backend = copy.deepcopy(backend)
    own = [backend.normalizer] if backend.normalizer is not None else []
    backend.normalizer = normalizers.Sequence(capital_marks() + own)
    marked = with_backend(tokenizer, backend)
    unk = marked.unk_token_id
    if unk is not None and unk in marked(CAPITAL_MARK, add_special_tokens=False)["input_ids"]:
        raise BadInput(
            f"model.mark_capitals: the tokenizer of {source} has no token for {CAPITAL_MARK!r}, so every mark "
            "would be unknown"
        )
    return marked


# the tasks that use a model's own head: the flag may not add marks their model's training did not have
TRAINED_FOR = {"predict": "prediction", "fill_mask": "masked prediction"}


def unmarked_model(source: str, trained_for: str) -> str:
    """Why model.mark_capitals may not mark for a model trained without marks."""
    return (
        f"model.mark_capitals: {source} was trained without marks (its tokenizer does not mark), so {trained_for} "
        "with marks would read text it never saw; leave the flag out (a marked run's final/ marks by itself)"
    )


def pretrained_tokenizer(m, trained_for: str | None = None):
    """The tokenizer that model.tokenizer or model.name_or_path names, capitals marked when model.mark_capitals asks.

    A tokenizer that marks already (a marked run's final/) keeps its marks whatever the flag says: it is the one the
    model was trained with. `trained_for` (a task that uses the model's own head, "prediction"): the flag may not add
    marks that the model's training did not have.
    """
    source = m.tokenizer or m.name_or_path
    tokenizer = from_config(AutoTokenizer.from_pretrained, m, tokenizer=True)
    if marks_capitals(tokenizer):  # kept whatever the flag says: the model was trained with it
        log.info(
            "the tokenizer of %s marks capitals (idA= is read as id ^ a =), as saved with the model", source
        )
        return tokenizer
    if m.mark_capitals and trained_for:
        raise BadInput(unmarked_model(source, trained_for))
    if m.mark_capitals:
        log.info(
            "model.mark_capitals: the tokenizer of %s will read each capital as ^ and its letter", source
        )
        return mark_capitals(tokenizer, source)
    return tokenizer


def train_wordpiece(
    texts: Iterable[str], vocab_size: int, max_len: int, mark: bool = False
) -> PreTrainedTokenizerFast:
    """A lowercasing BERT-style WordPiece tokenizer whose vocabulary is learnt from `texts` (no download).

    Deterministic on purpose: the tokenizers library's trainers break count ties in hash order, so two trainings
    on the same corpus give different vocabularies and a rerun would not reproduce a run. The vocabulary here is
    every character (word-initial and ##-continuation), then whole words, word prefixes and ##-suffixes ranked by
    the characters they save (occurrences x length), ties broken by the text. With `mark`, capitals are marked
    (model.mark_capitals) before the lowercasing, in training and in use.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    normalizer, pre = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    if mark:
        normalizer = normalizers.Sequence([*capital_marks(), normalizer])
    words: Counter = Counter()
    for text in texts:
        words.update(w for w, _ in pre.pre_tokenize_str(normalizer.normalize_str(text)))
    chars = sorted({c for w in words for c in w})
    vocab = SPECIALS + chars + [f"##{c}" for c in chars]
    pieces: Counter = Counter()
    for word, n in words.items():
        pieces[word] += n * len(word)
        for i in range(2, min(len(word), 16)):
            pieces[word[:i]] += n * i
            pieces[f"##{word[-i:]}"] += n * i
    taken = set(vocab)
    ranked = sorted((p for p in pieces if p not in taken), key=lambda p: (-pieces[p], p))
    vocab += ranked[: max(0, vocab_size - len(vocab))]
    tok = Tokenizer(models.WordPiece({p: i for i, p in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer, tok.pre_tokenizer, tok.decoder = normalizer, pre, decoders.WordPiece()
    cls, sep = vocab.index("[CLS]"), vocab.index("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        model_max_length=max_len,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )


def load_tokenizer(cfg, trained_dir: Path, texts: Iterable[str] | None = None):
    """The recipe's tokenizer, the model's own, or (from scratch) the one trained on the corpus in trained_dir.

    When trained_dir holds no tokenizer yet, one is trained on `texts` and saved there (call on one rank).
    """
    m = cfg.model
    if m.tokenizer or m.name_or_path:
        return pretrained_tokenizer(m)
    if isinstance(m.config, dict) and m.config.get("model_type") == "canine":
        from transformers import CanineTokenizer

        if m.mark_capitals:
            raise BadInput("model.mark_capitals: CANINE reads code points and sees case already")
        return CanineTokenizer(model_max_length=cfg.data.max_seq_length)  # code points: nothing to learn
    if (trained_dir / "tokenizer.json").exists():
        tok = AutoTokenizer.from_pretrained(trained_dir)
        if m.mark_capitals != marks_capitals(tok):
            raise BadInput(
                f"model.mark_capitals={str(m.mark_capitals).lower()}, but the tokenizer this run trained in "
                f"{trained_dir} {'does not mark' if m.mark_capitals else 'marks'} capitals: resume with the setting "
                "it was trained with"
            )
        return tok
    if texts is None:
        raise BadInput(f"no trained tokenizer in {trained_dir}")
    log.info(
        "training a WordPiece tokenizer (vocab %d) on the training corpus%s",
        m.tokenizer_vocab_size,
        ", each capital read as ^ and its letter (model.mark_capitals)" if m.mark_capitals else "",
    )
    tok = train_wordpiece(texts, m.tokenizer_vocab_size, cfg.data.max_seq_length, mark=m.mark_capitals)
    tok.save_pretrained(trained_dir)
    return tok


def model_config(cfg, tokenizer):
    """The transformers config: pretrained, from a path, or from the recipe's mapping sized to the tokenizer."""
    m = cfg.model
    if m.trust_remote_code:
        log.warning(
            "model.trust_remote_code=true: Python code that comes with %s will run on this machine",
            m.name_or_path or m.config,
        )
    if m.name_or_path:
        return from_config(AutoConfig.from_pretrained, m)
    if isinstance(m.config, str):
        conf = pretrained(
            AutoConfig.from_pretrained, m.config, "model.config", trust_remote_code=m.trust_remote_code
        )
    else:
        fields = dict(m.config or {})
        conf = AutoConfig.for_model(fields.pop("model_type"), **fields)
    if conf.model_type == "canine":
        conf.char_vocab = m.char_vocab
        grow_positions(conf, cfg.data.max_seq_length)
        return conf
    conf.vocab_size = len(tokenizer)
    for name in ("pad", "bos", "eos", "cls", "sep"):
        token_id = getattr(tokenizer, f"{name}_token_id", None)
        if token_id is not None and hasattr(conf, f"{name}_token_id"):
            setattr(conf, f"{name}_token_id", token_id)
    grow_positions(conf, cfg.data.max_seq_length)
    # a tokenizer trained for data.max_seq_length rows takes the model's length: saved in final/ with the shorter one,
    # a later run's longer rows would warn of indexing errors
    limit = position_limit(conf)
    if limit and (tokenizer.model_max_length or 0) < limit:
        tokenizer.model_max_length = limit
    return conf


def grow_positions(conf, max_seq_length: int) -> None:
    """A from-scratch model gets position embeddings for rows of data.max_seq_length (a pretrained one cannot: that is
    a config error, found by dapt.cli.load before any rank starts)."""
    limit = position_limit(conf)
    if limit is not None and limit < max_seq_length:
        log.info(
            "model.config: max_position_embeddings raised from %d to %d for rows of data.max_seq_length=%d",
            conf.max_position_embeddings,
            conf.max_position_embeddings + max_seq_length - limit,
            max_seq_length,
        )
        conf.max_position_embeddings += max_seq_length - limit


def flash_attention_problem(precision: str) -> str | None:
    """Why flash_attention_2 cannot run here (None: it can): flash-attn installed, a CUDA GPU of compute capability
    8.0 (Ampere) or newer, training in bf16 or fp16."""
    from dapt.config.dsconfig import flash_attention_capable, gpu_capability

    if importlib.util.find_spec("flash_attn") is None:
        return "the flash-attn package is not installed"
    capability = gpu_capability()
    if capability is None:
        return "no CUDA GPU"
    if not flash_attention_capable(capability):
        return (
            f"compute capability {capability[0]}.{capability[1]} (flash-attn 2 needs 8.0, Ampere, or newer)"
        )
    if precision not in ("bf16", "fp16"):
        return f"precision {precision} (flash-attn computes in bf16/fp16)"
    return None


def attention_candidates(requested: str, precision: str) -> list[str]:
    """Implementations to try in order: flash_attention_2 when it can run here, sdpa, eager."""
    problem = flash_attention_problem(precision) if requested in ("auto", "flash_attention_2") else None
    if requested == "auto":
        return (["flash_attention_2"] if problem is None else []) + ["sdpa", "eager"]
    if requested == "flash_attention_2" and problem:
        log.warning("flash_attention_2 asked for but not usable here (%s); falling back", problem)
        return ["sdpa", "eager"]
    return [requested] + [c for c in ("sdpa", "eager") if c != requested]


def build_model(
    cfg,
    tokenizer,
    precision: str,
    ds_config: dict | None = None,
    task: str = "mlm",
    labels: list[str] | None = None,
) -> torch.nn.Module:
    """The model of `task` (TASKS: mlm, classify with `labels`, encoder), pretrained or from scratch, with the first
    attention implementation that works, in fp32, with gradient checkpointing when model.gradient_checkpointing.

    Under ZeRO-3 a pretrained model is loaded partitioned (zero.Init through HfDeepSpeedConfig), so a model larger
    than one rank's memory still loads; in bf16/fp16 those partitions are in that precision, and the runner sets the
    fp32 masters from the folder's own weights (dapt.runtime.zero3).
    """
    m = cfg.model
    conf = model_config(cfg, tokenizer)
    maps = label_maps(labels) if task == "classify" else {}
    if maps and not m.name_or_path:
        for key, value in maps.items():
            setattr(conf, key, value)
    if conf.model_type == "canine" and task == "mlm":
        conf.char_vocab = getattr(conf, "char_vocab", None) or m.char_vocab
        if cfg.data.packing == "packed":
            raise BadInput(
                "data.packing=packed does not work with CANINE (its downsampling attention cannot keep "
                "packed documents apart); use pad or concat"
            )
    errors = []
    for impl in _candidates(cfg, conf.model_type, precision, task):
        try:
            model = _instantiate(cfg, conf, impl, ds_config, getattr(transformers, TASKS[task]), maps)
            break
        except HubError:
            raise
        except (ValueError, ImportError) as e:
            errors.append(f"{impl}: {str(e).splitlines()[0]}")
    else:
        raise BadInput(f"no attention implementation works for {conf.model_type}: " + "; ".join(errors))
    chosen = getattr(model.config, "_attn_implementation", impl)
    log.info(
        "model %s (%s, %.1fM parameters), attention implementation: %s%s",
        type(model).__name__,
        m.name_or_path or "from config",
        parameter_count(model) / 1e6,
        chosen,
        f" (tried: {'; '.join(errors)})" if errors else "",
    )
    if m.gradient_checkpointing and task != "encoder":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        log.info("gradient checkpointing on (HF gradient_checkpointing_enable)")
    return model


def _candidates(cfg, model_type: str, precision: str, task: str) -> list[str]:
    """attention_candidates, without flash attention for packed MLM rows of a model whose boundaries dapt does not
    pass to flash-attn."""
    candidates = attention_candidates(cfg.model.attn_implementation, precision)
    packed = task == "mlm" and cfg.data.packing == "packed"
    if packed and model_type not in FLASH_PACKED_MODELS and "flash_attention_2" in candidates:
        log.warning(
            "flash_attention_2 is not used for %s with packed rows: dapt passes packed documents' boundaries to "
            "flash attention only for %s (each tested); sdpa keeps the documents apart",
            model_type,
            ", ".join(sorted(FLASH_PACKED_MODELS)),
        )
        candidates = [c for c in candidates if c != "flash_attention_2"]
    return candidates


def _instantiate(cfg, conf, impl: str, ds_config: dict | None, auto, maps: dict):
    m = cfg.model
    if not m.name_or_path:
        torch.manual_seed(cfg.seed)
        return auto.from_config(
            conf, attn_implementation=impl, trust_remote_code=m.trust_remote_code, dtype=torch.float32
        )
    zero3 = ds_config and ds_config.get("zero_optimization", {}).get("stage") == 3
    keep_alive = None
    if zero3:
        from transformers.integrations import HfDeepSpeedConfig

        keep_alive = HfDeepSpeedConfig(ds_config)  # must live while from_pretrained runs, and not longer
    try:
        # fp32 whatever the hub config says (transformers 5 loads dtype="auto"): DeepSpeed keeps fp32 masters from
        # these weights in bf16/fp16, and an fp32 run must not train bf16 weights without masters (under ZeRO-3,
        # zero.Init still makes bf16/fp16 partitions: see dapt.runtime.zero3)
        torch.manual_seed(cfg.seed)  # a classifier's new head
        return from_config(auto.from_pretrained, m, attn_implementation=impl, dtype=torch.float32, **maps)
    finally:
        del keep_alive
