"""Sparse MLM prediction: the MLM head (transform and vocabulary projection) runs only at the masked positions,
as MosaicBERT and ModernBERT do. For a MiniLM-size encoder with a 30k vocabulary the dense head costs more per
token than the whole encoder, and only 15-30% of the positions have a label.

A forward hook on the encoder (`model.base_model`) keeps the hidden states of the selected positions, so the
model's own head runs on those alone: the model, its parameters, its checkpoints and its export are unchanged,
it works under every ZeRO stage, and outside `select()` the hook does nothing (evaluation of other tasks,
export). The loss is the same cross-entropy over the same positions as with the dense head.
"""

from __future__ import annotations

import contextlib

import torch


def supports_sparse(model: torch.nn.Module) -> bool:
    """A *ForMaskedLM whose forward runs an encoder submodule, then a position-wise head on its first output."""
    return model.base_model is not model


class SparsePrediction:
    def __init__(self, model: torch.nn.Module):
        self.mask: torch.Tensor | None = None
        self.handle = model.base_model.register_forward_hook(self._keep_selected)

    @contextlib.contextmanager
    def select(self, mask: torch.Tensor):
        """Within this block, the model's logits are (1, N, vocab) for the N True positions of `mask` (B, T)."""
        self.mask = mask
        try:
            yield
        finally:
            self.mask = None

    def _keep_selected(self, module, args, output):
        if self.mask is None:
            return output
        hidden = output[0]
        if hidden.shape[:2] != self.mask.shape:
            raise RuntimeError(
                f"sparse MLM prediction: the encoder returned hidden states of shape "
                f"{tuple(hidden.shape)} for a batch of {tuple(self.mask.shape)}; set "
                "train.sparse_prediction=false for this model"
            )
        kept = hidden[self.mask][None]
        if isinstance(output, tuple):
            return (kept, *output[1:])
        output["last_hidden_state"] = kept
        return output
