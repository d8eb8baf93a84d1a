"""Model inputs for packed rows: attention never crosses a document, and positions restart at every document.

- flash_attention_2: no mask, position_ids only; transformers' varlen path finds document starts from them.
- sdpa: a (B, 1, L, L) boolean block-diagonal mask; eager: the same as an additive float mask (a boolean mask is
  not exact under eager attention).
- ModernBERT: a dict of masks per layer kind, the sliding layers' cut to the window; in transformers 5.23 it
  ignores flattened boundaries without flash-attn (CPU-NOTES), and a single mask is wrong on its sliding layers.
- RoBERTa-style embeddings count positions from pad_token_id + 1.
"""

from __future__ import annotations

import torch

from dapt.archs import OFFSET_POSITION_MODELS


def segment_inputs(lengths: list[tuple[int, ...]], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: segment ids (1, 2, ... per document; 0 for padding) and positions restarting in every segment."""
    seg = torch.zeros(len(lengths), width, dtype=torch.long)
    pos = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, parts in enumerate(lengths):
        at = 0
        for k, n in enumerate(parts, start=1):
            seg[row, at:at + n] = k
            pos[row, at:at + n] = torch.arange(n)
            at += n
    return seg, pos


def model_inputs(batch: dict, model: torch.nn.Module, device: torch.device) -> dict:
    """Keyword arguments for the model's forward from a collated batch."""
    ids = batch["input_ids"].to(device)
    if "segment_ids" not in batch:
        return {"input_ids": ids, "attention_mask": batch["attention_mask"].to(device)}
    config = model.config
    pos = batch["position_ids"].to(device)
    if config.model_type in OFFSET_POSITION_MODELS:
        pos = pos + (config.pad_token_id or 0) + 1
    impl = getattr(config, "_attn_implementation", "sdpa")
    if impl == "flash_attention_2":
        return {"input_ids": ids, "position_ids": pos}
    seg = batch["segment_ids"].to(device)
    width = seg.shape[1]
    eye = torch.eye(width, dtype=torch.bool, device=device)
    # Padding positions see only themselves: no row of the mask is empty (an empty row gives NaN in softmax).
    block = ((seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] > 0)) | eye
    block = block[:, None]
    if config.model_type == "modernbert":
        i = torch.arange(width, device=device)
        window = (i[:, None] - i[None, :]).abs() <= config.sliding_window
        mask = {"full_attention": _as(block, impl, model), "sliding_attention": _as(block & window, impl, model)}
    else:
        mask = _as(block, impl, model)
    return {"input_ids": ids, "position_ids": pos, "attention_mask": mask}


def _as(block: torch.Tensor, impl: str, model: torch.nn.Module) -> torch.Tensor:
    if impl == "eager":
        dtype = next(model.parameters()).dtype
        return torch.zeros(block.shape, dtype=dtype, device=block.device).masked_fill(~block, torch.finfo(dtype).min)
    return block
