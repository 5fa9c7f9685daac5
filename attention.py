"""Attention over segments: the one kernel choice for training, prefill and the vision towers.

A batch is a set of segments (a packed document, the real tokens of a padded row, a vision window or frame); a
token attends only inside its own segment (causally for text). Tokens are laid out flat, (N, heads, head_dim),
segment after segment, and `Segments` says where each one starts. No (T, T) mask is ever built:
  CUDA, bf16/fp16: a varlen kernel, flash-attn's flash_attn_varlen_func when installed, else PyTorch's own
                   torch.nn.attention.varlen.varlen_attn.
  otherwise (CPU, or fp32 on CUDA): SDPA per segment length, the segments of one length as one batch without a
                   mask, so a packed row costs sum(L^2) rather than T^2, and fp32 keeps transformers' numbers.
The KV-cache decode step (one query against the cache) is model.py's: it needs a (B, 1, 1, T) padding mask only.
"""
from typing import NamedTuple

import torch
import torch.nn.functional as F

try:  # optional CUDA extra
    from flash_attn import flash_attn_varlen_func
except ImportError:
    flash_attn_varlen_func = None
try:  # PyTorch's own varlen flash kernel (CUDA, torch >= 2.9)
    from torch.nn.attention.varlen import varlen_attn
except ImportError:
    varlen_attn = None


def kernel_for(x: torch.Tensor) -> str:
    """Which kernel attention over x's segments takes: "flash-attn" | "varlen" (PyTorch's) | "sdpa" (per length)."""
    if x.is_cuda and x.dtype in (torch.float16, torch.bfloat16):
        if flash_attn_varlen_func is not None:
            return "flash-attn"
        if varlen_attn is not None:
            return "varlen"
    return "sdpa"


class Segments(NamedTuple):
    """Contiguous segments of a flat token axis."""
    cu_seqlens: torch.Tensor  # (S+1,) int32: segment s is tokens [cu[s], cu[s+1])
    max_seqlen: int
    groups: list[torch.Tensor]  # "sdpa" only: per segment length L, the (n_L, L) token indices of its segments
    kernel: str


def make_segments(ids: torch.Tensor, kernel: str) -> Segments:
    """Segments from a segment id per token (N,), equal ids contiguous (one host sync, shared by every layer)."""
    _, lengths = torch.unique_consecutive(ids, return_counts=True)
    cu = F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
    groups = [] if kernel != "sdpa" else [cu[:-1][lengths == L, None] + torch.arange(L, device=ids.device)
                                          for L in lengths.unique().tolist()]
    return Segments(cu, int(lengths.max()) if len(lengths) else 0, groups, kernel)


def segment_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seg: Segments,
                      causal: bool) -> torch.Tensor:
    """q (N, nh, hd), k and v (N, nkv, hd), nh a multiple of nkv (GQA) -> (N, nh, hd); scale hd^-0.5."""
    cu, L = seg.cu_seqlens, seg.max_seqlen
    if seg.kernel == "flash-attn":
        return flash_attn_varlen_func(q, k, v, cu, cu, L, L, causal=causal)
    if seg.kernel == "varlen":
        return varlen_attn(q, k, v, cu, cu, L, L, window_size=(-1, 0) if causal else (-1, -1),
                           enable_gqa=k.shape[1] != q.shape[1])
    o = q.new_empty(q.shape)
    for rows in seg.groups:  # (n_L, L) -> one batch of n_L segments of length L: (n_L, heads, L, hd)
        qs, ks, vs = (t[rows].transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal, enable_gqa=ks.shape[1] != qs.shape[1])
        o[rows] = y.transpose(1, 2).to(o.dtype)
    return o
