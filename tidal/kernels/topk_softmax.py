"""The routing arithmetic on router logits held in registers, shared by the
routing kernels (tidal.kernels.moe_route) and the experts' up kernel when it
routes a single token itself (tidal.kernels.fused_moe): one function, so
every form picks the same experts with the same weights."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def topk_softmax_rows(logits, e, kk, E: tl.constexpr, K: tl.constexpr, RENORM: tl.constexpr):
    """logits [R, E] float32 (e = arange(E), kk = arange(K)) -> (weights
    [R, K] float32, ids [R, K] int32): each row's top K, the lower index
    winning a tie (a row of NaNs names expert E), weighted by the softmax over
    those K (RENORM: their sum taken in pick order, so any tile layout gives
    the same bits) or over all E at them."""
    top = tl.max(logits, axis=1)
    total = tl.sum(tl.exp(logits - top[:, None]), axis=1)  # all E (used without renormalization)
    p = tl.zeros([logits.shape[0], K], tl.float32)
    ids = tl.zeros([logits.shape[0], K], tl.int32)
    picked = tl.zeros([logits.shape[0]], tl.float32)  # the K picks' sum, in pick order: the same bits in any tile layout
    for j in tl.static_range(K):
        v = tl.max(logits, axis=1)
        idx = tl.min(tl.where(logits == v[:, None], e[None, :], E), axis=1)
        pj = tl.exp(v - top)
        picked += pj
        p = tl.where(kk[None, :] == j, pj[:, None], p)
        ids = tl.where(kk[None, :] == j, idx[:, None], ids)
        logits = tl.where(e[None, :] == idx[:, None], float("-inf"), logits)
    if RENORM:
        w = p / picked[:, None]
    else:
        w = p / total[:, None]
    return w, ids
