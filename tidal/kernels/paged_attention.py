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

extend_attention: any number of new queries per sequence (prefill, chunked
prefill, mixed steps), against cached and new keys, with the bidirectional
prefix. Work is cut into blocks of up to BLOCK_M queries of one sequence,
described by a small host-built table.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tidal.kernels import scratch_zeros
from tidal.kernels.kv_store import is_fp8

# -- decode ---------------------------------------------------------------------------


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
    GROUP: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr, NS: tl.constexpr, DIRECT: tl.constexpr, FUSED: tl.constexpr,
):
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
def _f16_operand(q):
    """Queries as float16 product operands beside a float8 cache (F16 in the
    kernels below): clamped to float16's range, where a bf16 query past it
    would turn inf; bf16 -> f16 is exact from f16's smallest normal (6e-5) up."""
    return tl.clamp(q.to(tl.float32), -65504.0, 65504.0).to(tl.float16)


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
    NS: tl.constexpr, DIRECT: tl.constexpr, FUSED: tl.constexpr, F16: tl.constexpr, PREFETCH: tl.constexpr,
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
        q = _f16_operand(q)
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
        k = tl.load(K + slot[:, None] * stride_ks + kvh * stride_kh + d[None, :], mask=mask[:, None], other=0.0).to(op_ty)  # (a float8 cache: upcast)
        if IEEE:
            sc = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            sc = tl.dot(q, tl.trans(k))
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
    nsplit, BLOCK_N: tl.constexpr, NS: tl.constexpr, D: tl.constexpr,
):
    """The splits' second launch: one program per (sequence, head)."""
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

# Over a float8 cache with bf16 queries, the grouped decode kernel's and the
# extend kernel's products take float16 operands (see their F16). Compiled
# for sm_90 a loop converts 3x fewer values a tile (64 e4m3x2 -> f16x2
# conversions a thread instead of those plus 128 f16 -> bf16).
# bench_kernels attention-large, H200 (895380d), Qwen3-VL-8B batch 128 at
# 1000 keys: 119.4 us against 132.3 with bf16 operands.
FP8_F16_PRODUCTS = True


def _f16_products(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """Whether the kernels' F16: a float8 cache under 16-bit queries."""
    return FP8_F16_PRODUCTS and is_fp8(k_cache) and q.dtype != torch.float32


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
    block_n = DECODE_BLOCK_N  # the split kernel's and the reduce's (both cut the keys by it)
    if group == 1:
        _decode_split_kernel[(bsz, heads, num_splits)](*args, GROUP=1, D=dim, BLOCK_N=block_n, NS=ns, DIRECT=direct, FUSED=fused, num_warps=4, num_stages=3)
    else:
        block_n, warps, stages = GQA_TILE_FP8 if is_fp8(k_cache) else GQA_TILE
        _decode_group_split_kernel[(bsz, heads // group, num_splits)](
            *args, GROUP=group, GP=max(16, triton.next_power_of_2(group)), D=dim, BLOCK_N=block_n, IEEE=q.dtype == torch.float32,
            NS=ns, DIRECT=direct, FUSED=fused, F16=_f16_products(q, k_cache), PREFETCH=GQA_SLOT_PREFETCH,
            num_warps=warps, num_stages=stages,
        )
    if not direct and not fused:
        _decode_reduce_kernel[(bsz, heads)](
            part_o, part_lse, out, kv_lens,
            part_o.stride(0), part_o.stride(1), part_o.stride(2),
            part_lse.stride(0), part_lse.stride(1),
            out.stride(0), out.stride(1),
            num_splits, BLOCK_N=block_n, NS=ns, D=dim,
            num_warps=4,
        )
    return out


# -- extend / prefill -------------------------------------------------------------------


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
        q = _f16_operand(q)
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
        k = tl.load(K + slot[:, None] * stride_ks + kvh * stride_kh + d[None, :], mask=nmask[:, None], other=0.0).to(op_ty)  # (a float8 cache: upcast)
        if IEEE:
            sc = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            sc = tl.dot(q, tl.trans(k))
        sc = sc * sm_scale
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
# and two from 5, as the grouped decode kernel's (where two paid 12% at batch
# 128, GQA_TILE_FP8). Not yet timed here: a first token for a new image was
# 13 ms slower with the float8 cache (Qwen3-VL-8B, H100 and H200), in the
# image's prefill. `device_run.sh fp8-ttft` times 2 against 5.
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
        GROUP=heads // k_cache.shape[1], D=dim, BLOCK_M=EXTEND_BLOCK_M, BLOCK_N=64, IEEE=q.dtype == torch.float32, F16=_f16_products(q, k_cache),
        num_warps=4, num_stages=EXTEND_STAGES_FP8 if is_fp8(k_cache) else 2,
    )
    return out
