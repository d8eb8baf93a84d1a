"""Model inputs for packed rows: attention never crosses a document, and positions restart at every document.

- flash_attention_2: the batch's real tokens as one flattened row, with position_ids and the document boundaries
  (cu_seq_lens_q/k, max_length_q/k) that transformers hands to flash-attn's varlen kernel. position_ids alone are
  not enough: transformers reads packing from them only for a batch of one row, and ModernBERT and DistilBERT do
  not pass them to their attention at all; without a mask and boundaries flash attention attends across documents
  and into padding.
- sdpa: a (B, 1, L, L) boolean block-diagonal mask; eager: the same as an additive float mask (a boolean mask is
  not exact under eager attention).
- ModernBERT: a dict of masks per layer kind, the sliding layers' cut to the window; in transformers 5.23 it
  ignores flattened boundaries without flash-attn (CPU-NOTES), and a single mask is wrong on its sliding layers.
- RoBERTa-style embeddings count positions from pad_token_id + 1.
"""

from __future__ import annotations

import logging
import traceback

import torch

from dapt.config.schema import BadInput
from dapt.model.archs import OFFSET_POSITION_MODELS

# Models whose forward hands cu_seq_lens and position_ids down to flash attention (each tested packed == alone)
FLASH_PACKED_MODELS = {"bert", "roberta", "distilbert", "modernbert"}

log = logging.getLogger("dapt")


def segment_inputs(lengths: list[tuple[int, ...]], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: segment ids (1, 2, ... per document; 0 for padding) and positions restarting in every segment."""
    seg = torch.zeros(len(lengths), width, dtype=torch.long)
    pos = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, parts in enumerate(lengths):
        at = 0
        for k, n in enumerate(parts, start=1):
            seg[row, at : at + n] = k
            pos[row, at : at + n] = torch.arange(n)
            at += n
    return seg, pos


def model_inputs(
    batch: dict, model: torch.nn.Module, device: torch.device
) -> tuple[dict, torch.Tensor | None]:
    """Keyword arguments for the model's forward from a collated batch, and `keep`: None when the outputs have the
    batch's (rows, width) shape, else the (rows, width) CPU mask of the positions they hold, in order (flash
    attention's flattened packed rows hold the real tokens only: labels are `labels[keep][None]`)."""
    if "segment_ids" not in batch:
        return {
            "input_ids": batch["input_ids"].to(device),
            "attention_mask": batch["attention_mask"].to(device),
        }, None
    config = model.config
    offset = (config.pad_token_id or 0) + 1 if config.model_type in OFFSET_POSITION_MODELS else 0
    impl = getattr(config, "_attn_implementation", "sdpa")
    if impl == "flash_attention_2":
        if config.model_type not in FLASH_PACKED_MODELS:  # build_model does not choose flash for them
            raise BadInput(
                f"packed rows under flash_attention_2 are checked for {sorted(FLASH_PACKED_MODELS)} "
                f"only, not {config.model_type}; use model.attn_implementation=sdpa"
            )
        return _flattened(batch, offset, device)
    ids, pos, seg = (batch[k].to(device) for k in ("input_ids", "position_ids", "segment_ids"))
    pos = pos + offset
    width = seg.shape[1]
    eye = torch.eye(width, dtype=torch.bool, device=device)
    # Padding positions see only themselves: no row of the mask is empty (an empty row gives NaN in softmax).
    block = ((seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] > 0)) | eye
    block = block[:, None]
    if config.model_type == "modernbert":
        i = torch.arange(width, device=device)
        window = (i[:, None] - i[None, :]).abs() <= config.sliding_window
        mask = {
            "full_attention": _as(block, impl, model),
            "sliding_attention": _as(block & window, impl, model),
        }
    else:
        mask = _as(block, impl, model)
    return {"input_ids": ids, "position_ids": pos, "attention_mask": mask}, None


def _flattened(batch: dict, offset: int, device: torch.device) -> tuple[dict, torch.Tensor]:
    """All documents of the batch in one row of real tokens, with their boundaries for flash-attn's varlen kernel.
    The boundaries are found on the CPU, where the collator made the batch: no device sync per micro-batch."""
    keep = batch["segment_ids"] > 0
    pos = batch["position_ids"][keep]
    first = (pos == 0).nonzero().flatten()  # every document starts at position 0
    cu = torch.cat([first, first.new_tensor([len(pos)])]).to(torch.int32)
    longest = int((cu[1:] - cu[:-1]).max())
    return {
        "input_ids": batch["input_ids"][keep][None].to(device),
        "position_ids": (pos + offset)[None].to(device),
        "cu_seq_lens_q": cu.to(device),
        "cu_seq_lens_k": cu.to(device),
        "max_length_q": longest,
        "max_length_k": longest,
    }, keep


def forward(engine, batch: dict, device: torch.device, call):
    """`call(inputs, keep)` with model_inputs for `batch` (call runs the forward); flash attention that fails at its
    first forward (a flash-attn build without kernels for this GPU, such as sm_120 on an RTX PRO 6000 with an older
    wheel) is replaced by sdpa, logged, and the forward run again. Failures after a successful first forward, and
    those of other implementations, are raised as they are."""
    module = engine.module
    try:
        out = call(*model_inputs(batch, module, device))
    except RuntimeError as e:
        if (
            getattr(module.config, "_attn_implementation", None) != "flash_attention_2"
            or getattr(module, "_dapt_attention_ran", False)
            or not _raised_in_flash_attention(e)
        ):
            raise  # out of memory, a collective, a compile error...: not flash-attn's kernels
        first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
        log.warning(
            "flash_attention_2 failed at its first forward on this device (%s: %s); falling back to sdpa "
            "(set model.attn_implementation=sdpa to skip the attempt)",
            type(e).__name__,
            first[:300],
        )
        module.set_attn_implementation("sdpa")
        out = call(*model_inputs(batch, module, device))
    module._dapt_attention_ran = True
    return out


def _raised_in_flash_attention(error: BaseException) -> bool:
    """The error came out of flash-attn or transformers' flash integration, and is no out-of-memory error."""
    if isinstance(error, torch.OutOfMemoryError):
        return False
    frames = traceback.extract_tb(error.__traceback__)
    return any("flash_attn" in f.filename or "flash_attention" in f.filename for f in frames)


def _as(block: torch.Tensor, impl: str, model: torch.nn.Module) -> torch.Tensor:
    if impl == "eager":
        dtype = next(model.parameters()).dtype
        return torch.zeros(block.shape, dtype=dtype, device=block.device).masked_fill(
            ~block, torch.finfo(dtype).min
        )
    return block
