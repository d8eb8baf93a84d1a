"""The CPU stand-in's flash_attn.bert_padding: pad_input and unpad_input (flash-attn >= 2.7's 5-tuple)."""

import torch
import torch.nn.functional as F


def unpad_input(hidden_states, attention_mask, unused_mask=None):
    masks = attention_mask + unused_mask if unused_mask is not None else attention_mask
    seqlens = masks.sum(dim=-1, dtype=torch.int32)
    used = attention_mask.sum(dim=-1, dtype=torch.int32)
    indices = torch.nonzero(masks.flatten(), as_tuple=False).flatten()
    cu = F.pad(torch.cumsum(seqlens, dim=0, dtype=torch.int32), (1, 0))
    return hidden_states.reshape(-1, *hidden_states.shape[2:])[indices], indices, cu, int(seqlens.max()), used


def pad_input(hidden_states, indices, batch, seqlen):
    out = torch.zeros(
        batch * seqlen, *hidden_states.shape[1:], dtype=hidden_states.dtype, device=hidden_states.device
    )
    out[indices] = hidden_states
    return out.view(batch, seqlen, *hidden_states.shape[1:])
