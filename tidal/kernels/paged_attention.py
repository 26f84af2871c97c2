"""Paged attention over the request-to-slot table.

A sequence's keys are positions 0 .. kv_len-1; table[row, p] is the KV slot of
position p. A query at position p sees key j when j <= p, or when both lie in
the bidirectional prefix (j < bidir and p < bidir).

decode_attention: one query per sequence (the newest position: it sees every
key). Split-K: a sequence's keys are cut into a fixed number of splits (the
grid, fixed for a CUDA graph) sized at run time by its own length; each
program covers one split and writes a partial output and log-sum-exp (splits
past a short sequence's end exit at once); a second kernel combines the splits in a fixed order,
so results do not depend on scheduling (or, with FUSED_REDUCE, the last split program of a
sequence does in the same order, counting arrivals on a ticket: the only atomic, never a sum). One split: the
split kernel writes the output itself. With grouped
queries (GQA: several query heads per KV head) a program takes all the query
heads of one KV head, so each key and value is read once, not once per query
head; scores and the weighted sum are then small matrix products.

Prefill and mixed steps: tidal.kernels.extend_attention, over the same table.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tidal.kernels import scratch_zeros
from tidal.kernels.kv_store import f16_operand, f16_products, is_fp8, key_scores
from tidal.kernels.pdl import pdl_enter, pdl_on


@triton.jit
def _split_len(kv_len, nsplit, BLOCK_N: tl.constexpr):
    """Positions per split of a sequence of kv_len keys cut into at most nsplit
    splits, whole BLOCK_N tiles each: the grid stays fixed (graph-capturable)
    while each sequence's splits cover its own keys, not the table's width."""
    return tl.cdiv(tl.cdiv(kv_len, nsplit), BLOCK_N) * BLOCK_N


@triton.jit
def _decode_split_kernel(
    Q, K, V, Table, Rows, KvLens, PartO, PartLse, Out, Counter,
    stride_qb, stride_qh,
    stride_ks, stride_kh,
    stride_vs, stride_vh,
    stride_tr,
    stride_ob, stride_oh, stride_os,
    stride_lb, stride_lh,
    stride_outb, stride_outh,
    sm_scale, nsplit,
    GROUP: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr, NS: tl.constexpr, DIRECT: tl.constexpr, FUSED: tl.constexpr, PDL: tl.constexpr,
):
    pdl_enter(PDL)
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.program_id(2)
    kv_len = tl.load(KvLens + b)
    chunk = _split_len(kv_len, nsplit, BLOCK_N)
    start = s * chunk
    if start >= kv_len:  # a short sequence needs fewer splits: the reduce never reads this one
        return
    end = tl.minimum(start + chunk, kv_len)
    row = tl.load(Rows + b).to(tl.int64)
    kvh = h // GROUP
    d = tl.arange(0, D)
    q = tl.load(Q + b * stride_qb + h * stride_qh + d).to(tl.float32) * sm_scale
    m_i = tl.full([1], float("-inf"), tl.float32)
    l_i = tl.zeros([1], tl.float32)
    acc = tl.zeros([D], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        mask = n < end
        slot = tl.load(Table + row * stride_tr + n, mask=mask, other=0).to(tl.int64)
        k = tl.load(K + slot[:, None] * stride_ks + kvh * stride_kh + d[None, :], mask=mask[:, None], other=0.0).to(tl.float32)
        sc = tl.sum(k * q[None, :], axis=1)
        sc = tl.where(mask, sc, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(sc, axis=0))
        p = tl.exp(sc - m_new)
        alpha = tl.exp(m_i - m_new)
        v = tl.load(V + slot[:, None] * stride_vs + kvh * stride_vh + d[None, :], mask=mask[:, None], other=0.0).to(tl.float32)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        m_i = m_new
    has = l_i > 0
    lse = tl.where(has, m_i + tl.log(tl.where(has, l_i, 1.0)), float("-inf"))
    o = acc / tl.where(has, l_i, 1.0)
    if DIRECT:  # one split: its output is the answer (what the reduce would give, bit for bit)
        tl.store(Out + b * stride_outb + h * stride_outh + d, o.to(Out.dtype.element_ty))
    else:
        tl.store(PartO + b * stride_ob + h * stride_oh + s * stride_os + d, o)
        tl.store(PartLse + b * stride_lb + h * stride_lh + s + tl.arange(0, 1), lse)
        if FUSED:
            tl.debug_barrier()  # every thread's partial stored before the ticket
            if tl.atomic_add(Counter + b * tl.num_programs(1) + h, 1, sem="acq_rel") == tl.cdiv(kv_len, chunk) - 1:
                _combine(PartO, PartLse, Out, b, h, tl.cdiv(kv_len, chunk), stride_ob, stride_oh, stride_os, stride_lb, stride_lh, stride_outb, stride_outh, NS, D)
                tl.atomic_xchg(Counter + b * tl.num_programs(1) + h, 0)  # ready for the next launch (or replay)


@triton.jit
def _decode_group_split_kernel(
    Q, K, V, Table, Rows, KvLens, PartO, PartLse, Out, Counter,
    stride_qb, stride_qh,
    stride_ks, stride_kh,
    stride_vs, stride_vh,
    stride_tr,
    stride_ob, stride_oh, stride_os,
    stride_lb, stride_lh,
    stride_outb, stride_outh,
    sm_scale, nsplit,
    GROUP: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
    NS: tl.constexpr, DIRECT: tl.constexpr, FUSED: tl.constexpr, F16: tl.constexpr, PREFETCH: tl.constexpr, PDL: tl.constexpr,
):
    """One program: the GROUP query heads of one KV head (padded to GP rows,
    the smallest matrix-product tile), one split of one sequence.
    PREFETCH: each tile's slots are loaded during the tile before it, so the
    K/V loads depend on no load of their own iteration (compiled for sm_90:
    two K/V buffers at 3 stages, three at 4; one and one without it).
    F16 (a float8 cache under 16-bit queries): the products take float16
    operands. Float8 e4m3 widens to float16 in one instruction for two values
    and exactly; to bfloat16 it takes a second conversion per value, which
    made conversions, not bytes, the float8 kernel's bound. Queries and
    softmax weights keep their bf16 bits down to f16's smallest normal
    (6e-5; f16 has 3 more mantissa bits); only smaller magnitudes lose any."""
    pdl_enter(PDL)
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    s = tl.program_id(2)
    kv_len = tl.load(KvLens + b)
    chunk = _split_len(kv_len, nsplit, BLOCK_N)
    start = s * chunk
    if start >= kv_len:  # a short sequence needs fewer splits: the reduce never reads this one
        return
    end = tl.minimum(start + chunk, kv_len)
    row = tl.load(Rows + b).to(tl.int64)
    g = tl.arange(0, GP)
    gm = g < GROUP
    h = kvh * GROUP + g
    d = tl.arange(0, D)
    q = tl.load(Q + b * stride_qb + h[:, None] * stride_qh + d[None, :], mask=gm[:, None], other=0.0)
    op_ty: tl.constexpr = tl.float16 if F16 else Q.dtype.element_ty  # the products' operand type
    if F16:
        q = f16_operand(q)
    m_i = tl.full([GP], float("-inf"), tl.float32)
    l_i = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, D], tl.float32)
    if PREFETCH:
        n = start + tl.arange(0, BLOCK_N)
        slot = tl.load(Table + row * stride_tr + n, mask=n < end, other=0).to(tl.int64)
    for n0 in range(start, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        mask = n < end
        if not PREFETCH:
            slot = tl.load(Table + row * stride_tr + n, mask=mask, other=0).to(tl.int64)
        sc = key_scores(q, K, slot, kvh, stride_ks, stride_kh, mask, D, op_ty, IEEE)
        sc = tl.where(mask[None, :], sc * sm_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(sc, axis=1))
        p = tl.exp(sc - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        v = tl.load(V + slot[:, None] * stride_vs + kvh * stride_vh + d[None, :], mask=mask[:, None], other=0.0).to(op_ty)
        if PREFETCH:  # the next tile's slots
            slot = tl.load(Table + row * stride_tr + n + BLOCK_N, mask=n + BLOCK_N < end, other=0).to(tl.int64)
        if IEEE:
            pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        l_i = l_i * alpha + tl.sum(p, axis=1)
        m_i = m_new
    has = l_i > 0
    lse = tl.where(has, m_i + tl.log(tl.where(has, l_i, 1.0)), float("-inf"))
    o = acc / tl.where(has, l_i, 1.0)[:, None]
    if DIRECT:  # one split: its output is the answer (what the reduce would give, bit for bit)
        tl.store(Out + b * stride_outb + h[:, None] * stride_outh + d[None, :], o.to(Out.dtype.element_ty), mask=gm[:, None])
    else:
        tl.store(PartO + b * stride_ob + h[:, None] * stride_oh + s * stride_os + d[None, :], o, mask=gm[:, None])
        tl.store(PartLse + b * stride_lb + h * stride_lh + s, lse, mask=gm)
        if FUSED:
            tl.debug_barrier()  # every thread's partials stored before the ticket
            if tl.atomic_add(Counter + b * tl.num_programs(1) + kvh, 1, sem="acq_rel") == tl.cdiv(kv_len, chunk) - 1:
                for g1 in tl.static_range(GROUP):
                    _combine(PartO, PartLse, Out, b, kvh * GROUP + g1, tl.cdiv(kv_len, chunk), stride_ob, stride_oh, stride_os, stride_lb, stride_lh, stride_outb, stride_outh, NS, D)
                tl.atomic_xchg(Counter + b * tl.num_programs(1) + kvh, 0)  # ready for the next launch (or replay)


@triton.jit
def _combine(PartO, PartLse, Out, b, h, active, stride_ob, stride_oh, stride_os, stride_lb, stride_lh, stride_outb, stride_outh, NS: tl.constexpr, D: tl.constexpr):
    """Head h of sequence b: its `active` splits combined all at once in a
    [NS, D] tile, in split order (NS <= MAX_SPLITS: small enough to stay in
    registers; walking them one at a time cost twice as much at batch 1).
    Loads bypass L1 (.cg): in the fused form other programs wrote them."""
    s = tl.arange(0, NS)
    d = tl.arange(0, D)
    smask = s < active
    lse = tl.load(PartLse + b * stride_lb + h * stride_lh + s, mask=smask, other=float("-inf"), cache_modifier=".cg")
    m = tl.max(lse, axis=0)
    w = tl.where(smask, tl.exp(lse - m), 0.0)
    o = tl.load(PartO + b * stride_ob + h * stride_oh + s[:, None] * stride_os + d[None, :], mask=smask[:, None], other=0.0, cache_modifier=".cg")
    out = tl.sum(o * w[:, None], axis=0) / tl.sum(w, axis=0)
    tl.store(Out + b * stride_outb + h * stride_outh + d, out.to(Out.dtype.element_ty))


@triton.jit
def _decode_reduce_kernel(
    PartO, PartLse, Out, KvLens,
    stride_ob, stride_oh, stride_os,
    stride_lb, stride_lh,
    stride_outb, stride_outh,
    nsplit, BLOCK_N: tl.constexpr, NS: tl.constexpr, D: tl.constexpr, PDL: tl.constexpr,
):
    """The splits' second launch: one program per (sequence, head)."""
    pdl_enter(PDL)
    b = tl.program_id(0)
    h = tl.program_id(1)
    kv_len = tl.load(KvLens + b)
    _combine(PartO, PartLse, Out, b, h, tl.cdiv(kv_len, _split_len(kv_len, nsplit, BLOCK_N)), stride_ob, stride_oh, stride_os, stride_lb, stride_lh, stride_outb, stride_outh, NS, D)


# Beyond 16 splits a sequence the extra programs cost more than they hide
# (bench_kernels.py, H100: batch 1, 600-740 keys, 16 splits 9.5 / 6.2 us
# against 32's 10.0 / 6.9 for Moondream / Qwen3-30B; Qwen at batch 8 too).
MAX_SPLITS = 16  # also bounds the reduce's [splits, D] tile
DECODE_BLOCK_N = 64
NUM_SMS = 132  # an H100's: decode_splits's rule was measured there


def decode_splits(batch: int, kv_heads: int, group: int = 1) -> int:
    """Splits per sequence: enough programs (batch x KV heads x splits) to keep
    the GPU's memory system busy at small batch; one at large batch. Each
    sequence's splits share its own keys at run time. A grouped program (GQA:
    `group` query heads on one KV head) does `group` rows of work, so fewer of
    them fill the card: bench_kernels.py on an H100, Qwen3-30B (4 KV heads,
    600 keys) at batch 64: 1 split 33.0 us, 4 splits (8 programs an SM) 41.6;
    Qwen3-VL-8B (8 KV heads, 1000 keys) at batch 8: 4 splits 19.5, 16 19.8."""
    per_sm = 8 if group == 1 else 2
    return max(1, min(MAX_SPLITS, per_sm * NUM_SMS // max(1, batch * kv_heads)))


# The reduce inside the split kernel: the last split program of a sequence
# (a per-(sequence, head group) ticket counter) combines the partials in split
# order: deterministic, and the two-launch form's up to how the compiler lowers
# the [splits, D] sum in each kernel (on an H100, Qwen3-30B shapes at batch 8
# and 16 splits differed in the last bit). Off until
# benchmarks/bench_kernels.py shows the saved launch on the device.
FUSED_REDUCE = False

# The grouped (GQA) split kernel's (BLOCK_N, warps, stages). Qwen3-30B at batch
# 64 (one split, 600 keys) reads its K/V at ~40% of the copy bandwidth with
# (64, 4, 3); bench_kernels.py's attention table sweeps other tiles beside it.
GQA_TILE = (DECODE_BLOCK_N, 4, 3)
# The same over a float8 cache (EngineConfig.kv_dtype="fp8"): half the bytes a
# tile, so a tile in flight hides less latency. Triton pipelines the K/V loads
# behind the slot load with one buffer up to 4 stages, two from 5 (sm_90).
# bench_kernels attention-large, H200 (895380d), us (64, 4, 3) -> (64, 4, 5):
# Qwen3-VL-8B batch 128 at 1000 keys 119.2 -> 104.2, batch 64 74.1 -> 66.0;
# Qwen3-30B batch 64 at 700 keys 29.3 -> 24.5 (floors 63.5, 31.7, 11.1).
GQA_TILE_FP8 = (DECODE_BLOCK_N, 4, 5)
# The grouped decode kernel loads each tile's slots one tile ahead (its
# PREFETCH). Off until timed (bench_kernels attention-large sweeps it).
GQA_SLOT_PREFETCH = False

def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    table: torch.Tensor,
    rows: torch.Tensor,
    kv_lens: torch.Tensor,
    num_splits: int | None = None,
    out: torch.Tensor | None = None,
    fused_reduce: bool | None = None,
) -> torch.Tensor:
    """q [B, H, D]; k/v_cache [S, Hkv, D]; table [R, C]; rows, kv_lens [B] ->
    out [B, H, D]. Grid sizes depend only on (B, H, num_splits), so the launch
    is graph-capturable. num_splits: decode_splits's by default. One split:
    the split kernel writes out itself.
    fused_reduce (default FUSED_REDUCE): several splits combined by the last
    of them instead of a second launch."""
    bsz, heads, dim = q.shape
    group = heads // k_cache.shape[1]
    if num_splits is None:
        num_splits = decode_splits(bsz, k_cache.shape[1], group)
    direct = num_splits == 1
    fused = not direct and (FUSED_REDUCE if fused_reduce is None else fused_reduce)
    part_o = torch.empty((bsz, heads, num_splits, dim), dtype=torch.float32, device=q.device)  # unwritten when direct
    part_lse = torch.empty((bsz, heads, num_splits), dtype=torch.float32, device=q.device)
    if out is None:
        out = torch.empty_like(q)
    counter = scratch_zeros("decode attention tickets", bsz * heads, torch.int32, q.device) if fused else part_lse
    args = (
        q, k_cache, v_cache, table, rows, kv_lens, part_o, part_lse, out, counter,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1),
        v_cache.stride(0), v_cache.stride(1),
        table.stride(0),
        part_o.stride(0), part_o.stride(1), part_o.stride(2),
        part_lse.stride(0), part_lse.stride(1),
        out.stride(0), out.stride(1),
        dim**-0.5, num_splits,
    )
    ns = triton.next_power_of_2(num_splits)
    pdl = pdl_on(q.device)
    block_n = DECODE_BLOCK_N  # the split kernel's and the reduce's (both cut the keys by it)
    if group == 1:
        _decode_split_kernel[(bsz, heads, num_splits)](*args, GROUP=1, D=dim, BLOCK_N=block_n, NS=ns, DIRECT=direct, FUSED=fused, PDL=pdl, num_warps=4, num_stages=3, launch_pdl=pdl)
    else:
        block_n, warps, stages = GQA_TILE_FP8 if is_fp8(k_cache) else GQA_TILE
        _decode_group_split_kernel[(bsz, heads // group, num_splits)](
            *args, GROUP=group, GP=max(16, triton.next_power_of_2(group)), D=dim, BLOCK_N=block_n, IEEE=q.dtype == torch.float32,
            NS=ns, DIRECT=direct, FUSED=fused, F16=f16_products(q, k_cache), PREFETCH=GQA_SLOT_PREFETCH, PDL=pdl,
            num_warps=warps, num_stages=stages, launch_pdl=pdl,
        )
    if not direct and not fused:
        _decode_reduce_kernel[(bsz, heads)](
            part_o, part_lse, out, kv_lens,
            part_o.stride(0), part_o.stride(1), part_o.stride(2),
            part_lse.stride(0), part_lse.stride(1),
            out.stride(0), out.stride(1),
            num_splits, BLOCK_N=block_n, NS=ns, D=dim, PDL=pdl,
            num_warps=4, launch_pdl=pdl,
        )
    return out
