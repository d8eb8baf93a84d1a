"""A CPU stand-in for flash-attn 2.x, for tests only: its two kernels with flash-attn's signatures and tensor layouts,
computed per document with torch's scaled_dot_product_attention. transformers' real flash_attention_2 integration
calls them exactly as it calls flash-attn on a GPU (tests/conftest.py's `flash_stub` fixture turns it on).

    flash_attn_func:         q (B, S, H, D), k/v (B, S, H_kv, D) -> (B, S, H, D)
    flash_attn_varlen_func:  q (total, H, D), k/v (total, H_kv, D), cu_seqlens_q/k int32 (documents + 1) -> (total, H, D)
"""

import torch
import torch.nn.functional as F

__version__ = "2.8.3"

CALLS: list[tuple[str, dict]] = []  # which kernel ran, with what boundaries
FAIL: str | None = (
    None  # set to a message: every kernel raises RuntimeError(FAIL), as a build without kernels does
)


def _attention(q, k, v, dropout_p, softmax_scale, causal, window_size):
    if FAIL:
        raise RuntimeError(FAIL)
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))  # (B, H, S, D) for SDPA
    if k.shape[1] != q.shape[1]:  # grouped-query attention
        k, v = (x.repeat_interleave(q.shape[1] // x.shape[1], 1) for x in (k, v))
    left, right = window_size if window_size is not None else (-1, -1)
    mask = None
    if causal or left >= 0 or right >= 0:
        i = torch.arange(q.shape[2])[:, None] + (k.shape[2] - q.shape[2])
        j = torch.arange(k.shape[2])[None, :]
        mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool)
        right = 0 if causal else right
        if left >= 0:
            mask &= j >= i - left
        if right >= 0:
            mask &= j <= i + right
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=softmax_scale)
    return out.transpose(1, 2)


def flash_attn_func(
    q,
    k,
    v,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
):
    CALLS.append(("flash_attn_func", {"shape": tuple(q.shape)}))
    return _attention(q, k, v, dropout_p, softmax_scale, causal, window_size)


def flash_attn_varlen_func(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
    block_table=None,
):
    assert q.dim() == 3 and cu_seqlens_q.dtype == torch.int32, (q.shape, cu_seqlens_q.dtype)
    CALLS.append(
        ("flash_attn_varlen_func", {"cu_seqlens": cu_seqlens_q.tolist(), "max_seqlen": int(max_seqlen_q)})
    )
    out = torch.empty_like(q)
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for i in range(len(cq) - 1):
        rows, keys = slice(cq[i], cq[i + 1]), slice(ck[i], ck[i + 1])
        out[rows] = _attention(
            q[None, rows], k[None, keys], v[None, keys], dropout_p, softmax_scale, causal, window_size
        )[0]
    return out


def flash_attn_with_kvcache(*args, **kwargs):
    raise NotImplementedError("the CPU stand-in has no flash_attn_with_kvcache (decoding only)")
