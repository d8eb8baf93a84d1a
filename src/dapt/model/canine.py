"""Character-level MLM for CANINE, which transformers ships without a masked-LM head.

The head is seed 004's: Linear -> GELU -> LayerNorm -> Linear, over `char_vocab` classes: code points below
char_vocab - 1 are their own class, every higher one shares the last ("other"), so the softmax stays small (a full
Unicode softmax would be 1.1M classes). Registered with AutoModelForMaskedLM, so `import dapt` is all a user needs
to load an exported CANINE folder with the Auto classes.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from transformers import AutoModelForMaskedLM, CanineConfig, CanineModel, PreTrainedModel
from transformers.modeling_outputs import MaskedLMOutput

DEFAULT_CHAR_VOCAB = 1024


class CanineMLMHead(nn.Module):
    def __init__(self, config: CanineConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.act = nn.GELU()
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.decoder = nn.Linear(config.hidden_size, config.char_vocab)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.norm(self.act(self.dense(hidden))))


class CanineForMaskedLM(PreTrainedModel):
    """CanineModel + a character MLM head; logits over `config.char_vocab` classes at every character."""

    config_class = CanineConfig
    base_model_prefix = "canine"
    supports_gradient_checkpointing = True

    def __init__(self, config: CanineConfig):
        if not getattr(config, "char_vocab", None):
            config.char_vocab = DEFAULT_CHAR_VOCAB
        super().__init__(config)
        self.canine = CanineModel(config)
        self.head = CanineMLMHead(config)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            module.weight.data.normal_(0.0, self.config.initializer_range)
            if module.bias is not None:
                module.bias.data.zero_()
        elif isinstance(module, nn.LayerNorm):
            module.weight.data.fill_(1.0)
            module.bias.data.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.data.normal_(0.0, self.config.initializer_range)

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        position_ids=None,
        labels=None,
        **kwargs,
    ) -> MaskedLMOutput:
        hidden = self.canine(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
        ).last_hidden_state
        logits = self.head(hidden)
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(
                logits.view(-1, logits.shape[-1]).float(),
                char_classes(labels, self.config.char_vocab).view(-1),
                ignore_index=-100,
            )
        return MaskedLMOutput(loss=loss, logits=logits)


def char_classes(labels, char_vocab: int):
    """Code point labels -> head classes (the highest class for every code point >= char_vocab - 1); -100 stays."""
    if isinstance(labels, np.ndarray):
        return np.where(labels < 0, labels, np.minimum(labels, char_vocab - 1))
    return torch.where(labels < 0, labels, labels.clamp(max=char_vocab - 1))


AutoModelForMaskedLM.register(CanineConfig, CanineForMaskedLM, exist_ok=True)
