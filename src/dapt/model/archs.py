"""The architectures of the encoders the seed projects use, from their published configs (public facts), so that
launch/plan.py and launch/doctor.py size full-scale recipes on machines that cannot reach the model hub.

A local folder is read as it is; a hub id in this table needs no network; any other hub id is fetched.
"""

from __future__ import annotations

from pathlib import Path

from dapt.config.schema import BadInput

_BERT_BASE = {
    "model_type": "bert",
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "max_position_embeddings": 512,
    "type_vocab_size": 2,
}
_MODERNBERT = {
    "model_type": "modernbert",
    "max_position_embeddings": 8192,
    "vocab_size": 50368,
    "global_attn_every_n_layers": 3,
    "local_attention": 128,
    "global_rope_theta": 160000.0,
    "local_rope_theta": 10000.0,
    "pad_token_id": 50283,
    "bos_token_id": 50281,
    "eos_token_id": 50282,
    "sep_token_id": 50282,
    "cls_token_id": 50281,
}
_DISTILBERT = {
    "model_type": "distilbert",
    "dim": 768,
    "n_layers": 6,
    "n_heads": 12,
    "hidden_dim": 3072,
    "vocab_size": 30522,
    "max_position_embeddings": 512,
}

ARCHITECTURES: dict[str, dict] = {
    # seed 000: SecBERT is BERT-base with its own 52k WordPiece vocabulary
    "jackaduma/SecBERT": _BERT_BASE | {"vocab_size": 52000},
    "bert-base-uncased": _BERT_BASE | {"vocab_size": 30522},
    "google-bert/bert-base-uncased": _BERT_BASE | {"vocab_size": 30522},
    # seed 001: ModernBERT (Warner et al. 2024), alternating global/local attention, 8192 tokens
    "answerdotai/ModernBERT-base": _MODERNBERT
    | {"hidden_size": 768, "num_hidden_layers": 22, "num_attention_heads": 12, "intermediate_size": 1152},
    "answerdotai/ModernBERT-large": _MODERNBERT
    | {"hidden_size": 1024, "num_hidden_layers": 28, "num_attention_heads": 16, "intermediate_size": 2624},
    # seed 002: CodeBERT is RoBERTa-base with a byte-level BPE vocabulary of 50,265
    "microsoft/codebert-base": _BERT_BASE
    | {
        "model_type": "roberta",
        "vocab_size": 50265,
        "max_position_embeddings": 514,
        "type_vocab_size": 1,
        "pad_token_id": 1,
    },
    # seed 003
    "distilbert-base-uncased": _DISTILBERT,
    "distilbert/distilbert-base-uncased": _DISTILBERT,
    # seed 004: CANINE-c, characters hashed into 16k buckets x 8 functions, 4x downsampling
    "google/canine-c": {
        "model_type": "canine",
        "hidden_size": 768,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "intermediate_size": 3072,
        "max_position_embeddings": 16384,
        "num_hash_functions": 8,
        "num_hash_buckets": 16384,
        "downsampling_rate": 4,
        "upsampling_kernel_size": 4,
        "local_transformer_stride": 128,
    },
}


def known(name: str) -> bool:
    return name in ARCHITECTURES


def model_config(
    name: str, trust_remote_code: bool = False, field: str = "model.name_or_path", revision: str | None = None
):
    """The transformers config of `name` without loading weights: a local folder, this table, or the hub."""
    from transformers import AutoConfig

    if not Path(name).exists() and (name.count("/") > 1 or name.startswith((".", "/", "~"))):
        raise BadInput(
            f"{name}: no such model folder (if an earlier stage writes it, run that stage "
            "first, or size this one from the hub model it starts from with --model.name_or_path)"
        )
    if Path(name).is_dir() or name not in ARCHITECTURES or revision:
        from dapt.model.hub import pretrained

        return pretrained(
            AutoConfig.from_pretrained, name, field, trust_remote_code=trust_remote_code, revision=revision
        )
    fields = dict(ARCHITECTURES[name])
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


# RoBERTa-style embeddings count positions from pad_token_id + 1, so that many positions are never used for tokens.
OFFSET_POSITION_MODELS = {
    "roberta",
    "xlm-roberta",
    "camembert",
    "roberta-prelayernorm",
    "xmod",
    "data2vec-text",
    "mpnet",
    "longformer",
}


def position_limit(conf) -> int | None:
    """The longest row a model can embed (None: no table of positions to outgrow, e.g. rotary-only models)."""
    n = getattr(conf, "max_position_embeddings", None)
    if not n or conf.model_type == "modernbert":  # rotary: no table; max_position_embeddings is only advisory
        return None
    if getattr(conf, "position_biased_input", True) is False:  # DeBERTa-v2/v3: relative positions only
        return None
    if conf.model_type in OFFSET_POSITION_MODELS:
        return n - (getattr(conf, "pad_token_id", None) or 0) - 1
    return n
