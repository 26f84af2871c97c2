"""Paged attention for prefill, chunked prefill and mixed steps: any number
of new queries per sequence, against cached and new keys, over the
request-to-slot table (the rules of tidal.kernels.paged_attention: a query at
position p sees key j when j <= p, or when both lie in the bidirectional
prefix). Work is cut into blocks of up to BLOCK_M queries of one sequence,
described by a small host-built table (extend_blocks).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tidal.kernels.kv_store import f16_operand, f16_products, is_fp8, key_scores


@triton.jit
def _extend_kernel(
    Q, K, V, Out, Table, Blocks,
    stride_qt, stride_qh,
    stride_ks, stride_kh,
    stride_vs, stride_vh,
    stride_ot, stride_oh,
    stride_tr,
    sm_scale,
    GROUP: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr, F16: tl.constexpr,
):
    """One program: a block of up to BLOCK_M queries of one sequence, one query
    head. F16: float16 product operands over a float8 cache (as the grouped
    decode kernel's)."""
    pid = tl.program_id(0)
    h = tl.program_id(1)
    info = Blocks + pid * 6
    q_start = tl.load(info + 0)
    q_count = tl.load(info + 1)
    pos0 = tl.load(info + 2)
    row = tl.load(info + 3).to(tl.int64)
    kv_len = tl.load(info + 4)
    bidir = tl.load(info + 5)
    kvh = h // GROUP
    m = tl.arange(0, BLOCK_M)
    d = tl.arange(0, D)
    mvalid = m < q_count
    qpos = pos0 + m
    q = tl.load(Q + (q_start + m)[:, None].to(tl.int64) * stride_qt + h * stride_qh + d[None, :], mask=mvalid[:, None], other=0.0)
    op_ty: tl.constexpr = tl.float16 if F16 else Q.dtype.element_ty  # the products' operand type
    if F16:
        q = f16_operand(q)
    # Keys a query of this block can see: up to its own position, or the whole prefix.
    hi = tl.maximum(pos0 + q_count, tl.where(pos0 < bidir, bidir, 0))
    hi = tl.minimum(hi, kv_len)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    for n0 in range(0, hi, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        nmask = n < hi
        slot = tl.load(Table + row * stride_tr + n, mask=nmask, other=0).to(tl.int64)
        sc = key_scores(q, K, slot, kvh, stride_ks, stride_kh, nmask, D, op_ty, IEEE) * sm_scale
        seen = (n[None, :] <= qpos[:, None]) | ((n[None, :] < bidir) & (qpos[:, None] < bidir))
        seen = seen & nmask[None, :]
        sc = tl.where(seen, sc, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(sc, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(sc - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        v = tl.load(V + slot[:, None] * stride_vs + kvh * stride_vh + d[None, :], mask=nmask[:, None], other=0.0).to(op_ty)
        if IEEE:
            pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        l_i = l_i * alpha + tl.sum(p, axis=1)
        m_i = m_new
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(Out + (q_start + m)[:, None].to(tl.int64) * stride_ot + h * stride_oh + d[None, :], out.to(Out.dtype.element_ty), mask=mvalid[:, None])


def extend_blocks(q_lens: list[int], kv_lens: list[int], bidir_lens: list[int], rows: list[int], block_m: int) -> list[list[int]]:
    """The work table of extend_attention, built on the host: one entry per
    block of up to block_m queries of one sequence:
    [first query's row in the batch, queries, first query's position, table row, kv_len, bidir]."""
    out, start = [], 0
    for q_len, kv_len, bidir, row in zip(q_lens, kv_lens, bidir_lens, rows):
        pos0 = kv_len - q_len
        for i in range(0, q_len, block_m):
            out.append([start + i, min(block_m, q_len - i), pos0 + i, row, kv_len, bidir])
        start += q_len
    return out


EXTEND_BLOCK_M = 64
# The extend kernel's pipeline stages over a float8 cache. Compiled for sm_90,
# its K/V tiles (converted before the products) get one buffer up to 4 stages
# and two from 5, as the grouped decode kernel's. Two buffers did not pay
# here: on an H100 (Qwen3-VL-8B, one new 1280x720 image's prefill, 36
# launches) 5 stages took 3.84 ms against 2.97 at 2 (`device_run.sh fp8-ttft`).
EXTEND_STAGES_FP8 = 2


def extend_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    table: torch.Tensor,
    blocks: torch.Tensor,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """q [T, H, D]; k/v_cache [S, Hkv, D] (the new keys already written);
    blocks int32 [NB, 6] from extend_blocks -> out [T, H, D]."""
    _, heads, dim = q.shape
    if out is None:
        out = torch.empty_like(q)
    nblocks = blocks.shape[0]
    if nblocks == 0:
        return out
    _extend_kernel[(nblocks, heads)](
        q, k_cache, v_cache, out, table, blocks,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1),
        v_cache.stride(0), v_cache.stride(1),
        out.stride(0), out.stride(1),
        table.stride(0),
        dim**-0.5,
        GROUP=heads // k_cache.shape[1], D=dim, BLOCK_M=EXTEND_BLOCK_M, BLOCK_N=64, IEEE=q.dtype == torch.float32, F16=f16_products(q, k_cache),
        num_warps=4, num_stages=EXTEND_STAGES_FP8 if is_fp8(k_cache) else 2,
    )
    return out
