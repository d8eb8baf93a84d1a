"""The models and documents of the packed-row checks, shared by tests/test_attention.py and bench/gpu_check.py (which
runs them in bf16 on a GPU, where pytest may be missing: nothing here imports it)."""

from __future__ import annotations

import torch
from transformers import (
    BertConfig,
    BertForMaskedLM,
    DistilBertConfig,
    DistilBertForMaskedLM,
    ModernBertConfig,
    ModernBertForMaskedLM,
    RobertaConfig,
    RobertaForMaskedLM,
)

SMALL = {
    "vocab_size": 120,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
}
MODELS = {
    "bert": lambda impl: BertForMaskedLM._from_config(BertConfig(**SMALL), attn_implementation=impl),
    "roberta": lambda impl: RobertaForMaskedLM._from_config(
        RobertaConfig(**SMALL, pad_token_id=1), attn_implementation=impl
    ),
    "distilbert": lambda impl: DistilBertForMaskedLM._from_config(
        DistilBertConfig(vocab_size=120, dim=32, n_layers=2, n_heads=2, hidden_dim=64),
        attn_implementation=impl,
    ),
    # local attention 16 with documents longer than the window: the sliding layers' mask must be cut as well
    "modernbert": lambda impl: ModernBertForMaskedLM._from_config(
        ModernBertConfig(
            **SMALL,
            local_attention=16,
            global_attn_every_n_layers=2,
            pad_token_id=0,
            bos_token_id=2,
            eos_token_id=3,
            cls_token_id=2,
            sep_token_id=3,
        ),
        attn_implementation=impl,
    ),
}


class Tok:
    """The few tokenizer attributes the collator reads (ids 0-4 special)."""

    mask_token_id, pad_token_id, all_special_ids = 4, 0, [0, 1, 2, 3, 4]

    def __len__(self):
        return 120


def documents() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [
        torch.cat([torch.tensor([2]), torch.randint(5, 120, (n,), generator=g), torch.tensor([3])])
        for n in (21, 9, 30, 5)
    ]
