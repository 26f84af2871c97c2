"""MoE routing and expert alignment in one kernel launch, for decode-sized batches.

From router logits [T, E]: each token's top-k experts (the lower index wins
a tie, which bf16 logits make common; torch.topk leaves tie order open), softmax over those k logits in float32 (or, without renormalization,
the softmax over all E at those k: Qwen3's norm_topk_prob=False), cast to the
activation dtype (the reference's rounding); then the layout fused_moe's GEMMs read: pairs
(t * k + j) sorted by expert, stably, each expert's run padded to BLOCK_M,
and each block's expert (E past the end). Forms: one program for everything
(the torch version is ~25 launches); or the top-k on a grid of programs, then
the alignment in a second launch, over the same chunks (the top-k programs
also count their pairs per expert; each chunk's program places its pairs) or
with one program an expert (each counts all pairs, then places its own: the
default up to EXPERT_ALIGN_MAX_PAIRS pairs, the fastest form measured at every
size). route_and_align's `form` names one, the same layout in each. At decode
sizes the router's product can run in the routing launch too
(router_route_and_align).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from tidal.kernels import scratch_zeros
from tidal.kernels.fused_moe import max_blocks
from tidal.kernels.pdl import (
    early_weights_on,
    gdc_launch_dependents,
    gdc_wait,
    pdl_enter,
    pdl_on,
)
from tidal.kernels.tiles import tile_dot
from tidal.kernels.topk_softmax import topk_softmax_rows

MAX_TOKENS = 16384  # above this the torch ops are used (the offsets program walks every chunk of pairs)
# Up to this many tokens (and tokens x experts) one program routes and aligns;
# past it the top-k runs on a grid and the placement in parallel. H100,
# bench_kernels.py, one program against two launches: 64 experts 14.3 / 20.3
# us at 64 tokens, 26.4 / 20.2 at 128; 128 experts 18.8 / 41.8 at 32 tokens,
# 31.6 / 28.1 at 64.
ONE_LAUNCH_MAX_TOKENS = 64
ONE_LAUNCH_MAX_ELEMENTS = 4096
TILE_ELEMENTS = 16384  # the largest [rows, experts] tile a program scans at once (8 warps: 64 values a thread)


@triton.jit
def _route_align_kernel(
    Logits, Weights, Ids, Pairs, BlockExpert, Counts,
    tokens, stride_l, nblocks, tokens_per_program,
    E: tl.constexpr, K: tl.constexpr, BLOCK_T: tl.constexpr, BM: tl.constexpr, CH: tl.constexpr, FILL: tl.constexpr, BFILL: tl.constexpr,
    TOPK: tl.constexpr, ALIGN: tl.constexpr, RENORM: tl.constexpr, COUNT: tl.constexpr,
):
    e = tl.arange(0, E)
    kk = tl.arange(0, K)
    if TOPK:
        _topk_softmax(Logits, Weights, Ids, tokens, stride_l, tl.program_id(0) * tokens_per_program, tokens_per_program, e, kk, E, K, BLOCK_T, RENORM)
    if COUNT:  # this program's pairs per expert, for the parallel alignment (_place_kernel)
        tl.debug_barrier()
        p = tl.program_id(0) * BLOCK_T * K + tl.arange(0, BLOCK_T * K)
        ids = tl.load(Ids + p, mask=p < tokens * K, other=E).to(tl.int32)
        tl.store(Counts + tl.program_id(0) * E + e, tl.sum((ids[:, None] == e[None, :]).to(tl.int32), axis=0))
    if ALIGN:
        if TOPK:
            tl.debug_barrier()  # this program's ids are visible to all its threads from here
        _align(Ids, Pairs, BlockExpert, tokens, nblocks, e, E, K, BM, CH, FILL, BFILL)


@triton.jit
def _topk_softmax(Logits, Weights, Ids, tokens, stride_l, lo, tokens_per_program, e, kk, E: tl.constexpr, K: tl.constexpr, BLOCK_T: tl.constexpr, RENORM: tl.constexpr):
    """Top-k and softmax of tokens lo .. lo + tokens_per_program, BLOCK_T at a time."""
    hi = tl.minimum(lo + tokens_per_program, tokens)
    for t0 in range(lo, hi, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        tm = t < hi
        logits = tl.load(Logits + t[:, None] * stride_l + e[None, :], mask=tm[:, None], other=0.0).to(tl.float32)
        w, ids = topk_softmax_rows(logits, e, kk, E, K, RENORM)
        out = t[:, None] * K + kk[None, :]
        tl.store(Ids + out, ids.to(Ids.dtype.element_ty), mask=tm[:, None])
        tl.store(Weights + out, w.to(Weights.dtype.element_ty), mask=tm[:, None])


@triton.jit
def _align(Ids, Pairs, BlockExpert, tokens, nblocks, e, E: tl.constexpr, K: tl.constexpr, BM: tl.constexpr, CH: tl.constexpr, FILL: tl.constexpr, BFILL: tl.constexpr):
    """The expert-sorted, padded layout of all pairs (one program; pairs CH at
    a time, padding entries FILL at a time, block entries BFILL at a time)."""
    num_pairs = tokens * K
    for i0 in range(0, nblocks * BM, FILL):  # padding entries name no pair
        i = i0 + tl.arange(0, FILL)
        tl.store(Pairs + i, num_pairs, mask=i < nblocks * BM)
    tl.debug_barrier()  # the fill is visible to every thread before pairs land on it
    # -- pairs per expert, padded runs ---------------------------------------------------------
    counts = tl.zeros([E], tl.int32)
    for p0 in range(0, num_pairs, CH):
        p = p0 + tl.arange(0, CH)
        ids = tl.load(Ids + p, mask=p < num_pairs, other=E).to(tl.int32)
        counts += tl.sum((ids[:, None] == e[None, :]).to(tl.int32), axis=0)
    padded = (counts + BM - 1) // BM * BM
    pad_end = tl.cumsum(padded, axis=0)
    pad_start = pad_end - padded
    # -- each pair's place: its expert's run start + its rank among that expert's pairs --
    running = tl.zeros([E], tl.int32)
    for p0 in range(0, num_pairs, CH):
        p = p0 + tl.arange(0, CH)
        pm = p < num_pairs
        ids = tl.load(Ids + p, mask=pm, other=E).to(tl.int32)
        onehot = (ids[:, None] == e[None, :]).to(tl.int32)
        before = tl.cumsum(onehot, axis=0) - 1 + running[None, :] + pad_start[None, :]
        dest = tl.sum(onehot * before, axis=1)
        tl.store(Pairs + dest, p.to(Pairs.dtype.element_ty), mask=pm & (ids < E))  # (a NaN router row names no expert)
        running += tl.sum(onehot, axis=0)
    for b0 in range(0, nblocks, BFILL):
        b = b0 + tl.arange(0, BFILL)
        expert = tl.sum((pad_end[None, :] <= (b * BM)[:, None]).to(tl.int32), axis=1)
        tl.store(BlockExpert + b, expert, mask=b < nblocks)


@triton.jit
def _place_kernel(Ids, Counts, Pairs, BlockExpert, num_pairs, nchunks, nblocks, E: tl.constexpr, K: tl.constexpr, BLOCK_T: tl.constexpr, BM: tl.constexpr, FILL: tl.constexpr):
    """The alignment in parallel: program c places the pairs of chunk c (the
    top-k program c's, BLOCK_T * K of them) at its expert's run start + the
    expert's pairs in earlier chunks + its rank in the chunk (stable: pair
    order)."""
    CH: tl.constexpr = BLOCK_T * K
    c = tl.program_id(0)
    e = tl.arange(0, E)
    total = tl.zeros([E], tl.int32)
    before = tl.zeros([E], tl.int32)
    for chunk in range(0, nchunks):  # (not `i`: the padding loop below makes `i` a block, and a name's type is fixed per kernel)
        n = tl.load(Counts + chunk * E + e)
        total += n
        before += tl.where(chunk < c, n, 0)
    padded = (total + BM - 1) // BM * BM
    pad_end = tl.cumsum(padded, axis=0)
    pad_start = pad_end - padded
    p = c * CH + tl.arange(0, CH)
    pm = p < num_pairs
    ids = tl.load(Ids + p, mask=pm, other=E).to(tl.int32)
    onehot = (ids[:, None] == e[None, :]).to(tl.int32)
    rank = tl.cumsum(onehot, axis=0) - 1 + (pad_start + before)[None, :]
    tl.store(Pairs + tl.sum(onehot * rank, axis=1), p.to(Pairs.dtype.element_ty), mask=pm & (ids < E))  # a NaN router row names no expert: it must not land on another pair's place
    # the padding entries (which no pair takes: no race) and each block's
    # expert, strided over all programs (program 0 alone walking every entry
    # took 224 us a layer in a two-image mixed step on an H100)
    used_end = pad_start + total  # each expert's run: pairs, then padding up to pad_end
    for i0 in range(c * FILL, nblocks * BM, nchunks * FILL):
        i = i0 + tl.arange(0, FILL)
        owner = tl.sum((pad_end[None, :] <= i[:, None]).to(tl.int32), axis=1)  # E past the last run
        pad_from = tl.sum(tl.where(e[None, :] == owner[:, None], used_end[None, :], 0), axis=1)
        is_pad = (owner == E) | (i >= pad_from)
        tl.store(Pairs + i, num_pairs, mask=(i < nblocks * BM) & is_pad)
    for b0 in range(c * FILL, nblocks, nchunks * FILL):
        b = b0 + tl.arange(0, FILL)
        expert = tl.sum((pad_end[None, :] <= (b * BM)[:, None]).to(tl.int32), axis=1)
        tl.store(BlockExpert + b, expert, mask=b < nblocks)


@triton.jit
def _align_expert_kernel(Ids, Pairs, BlockExpert, num_pairs, nblocks, E: tl.constexpr, BM: tl.constexpr, CH: tl.constexpr, FILL: tl.constexpr):
    """The alignment with one program an expert: every program counts all
    pairs per expert (a histogram, CH pairs at a time) for its run's start,
    then places its own pairs in pair order (stable), pads its run, names
    its blocks, and takes a strided share of the entries past the last run.
    Each program's work is a few vector passes over the pairs, where the
    chunked form's programs each scan a [pairs, E] one-hot tile."""
    me = tl.program_id(0)
    e = tl.arange(0, E)
    counts = tl.zeros([E], tl.int32)
    for p0 in range(0, num_pairs, CH):
        p = p0 + tl.arange(0, CH)
        ids = tl.load(Ids + p, mask=p < num_pairs, other=E).to(tl.int32)
        valid = ids < E  # (past the end, and a NaN router row's pairs, name no expert)
        invalid = CH - tl.sum(valid.to(tl.int32))
        counts += tl.histogram(tl.where(valid, ids, 0), E) - tl.where(e == 0, invalid, 0)
    padded = (counts + BM - 1) // BM * BM
    pad_end = tl.cumsum(padded, axis=0)
    start = tl.sum(tl.where(e == me, pad_end - padded, 0))
    end = tl.sum(tl.where(e == me, pad_end, 0))
    used = start + tl.sum(tl.where(e == me, counts, 0))
    runs_end = tl.sum(padded)
    at = start
    for p0 in range(0, num_pairs, CH):
        p = p0 + tl.arange(0, CH)
        mine = tl.load(Ids + p, mask=p < num_pairs, other=E).to(tl.int32) == me
        rank = tl.cumsum(mine.to(tl.int32), axis=0) - 1
        tl.store(Pairs + at + rank, p.to(Pairs.dtype.element_ty), mask=mine)
        at += tl.sum(mine.to(tl.int32))
    pad = used + tl.arange(0, BM)  # fewer than BM entries end a run
    tl.store(Pairs + pad, num_pairs, mask=pad < end)
    for b0 in range(start // BM, end // BM, FILL):
        blk = b0 + tl.arange(0, FILL)
        tl.store(BlockExpert + blk, me, mask=blk < end // BM)
    for i0 in range(runs_end + me * FILL, nblocks * BM, E * FILL):  # past the last run: no pair
        tail = i0 + tl.arange(0, FILL)
        tl.store(Pairs + tail, num_pairs, mask=tail < nblocks * BM)
    for b0 in range(runs_end // BM + me * FILL, nblocks, E * FILL):  # and no expert (E)
        blk = b0 + tl.arange(0, FILL)
        tl.store(BlockExpert + blk, E, mask=blk < nblocks)


ROUTER_MAX_TOKENS = 16  # the fused router's rows: one [16, E] tile
# The router's product inside the routing launch at decode sizes (one launch
# instead of two); numerically the same routing up to the product's summation
# order. bench_kernels.py on an H100, 128-wide K slices: Moondream (E 64)
# 8.7 -> 6.8 us at 1 token, 10.8 -> 8.8 at 8; Qwen3-30B (E 128) 9.3 -> 8.9,
# 14.0 -> 13.2.
FUSED_ROUTER = True


@triton.jit
def _router_route_kernel(
    X, W, Bias, Partial, Logits, Weights, Ids, Pairs, BlockExpert, Counter,
    tokens, dim, k_per_program, stride_x, stride_w, nblocks,
    E: tl.constexpr, K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BM: tl.constexpr, CH: tl.constexpr, BFILL: tl.constexpr,
    HAS_BIAS: tl.constexpr, RENORM: tl.constexpr, IEEE: tl.constexpr, PDL: tl.constexpr, EARLY: tl.constexpr, TAIL: tl.constexpr,
):
    """The router product and the routing in one launch: program p takes the
    slice [p * k_per_program, +k_per_program) of the hidden size for all rows
    ([BLOCK_T, E] float32 partial); the last program to finish (a ticket)
    sums the partials in program order, adds the bias, rounds to the
    activation dtype as the router's linear does, then routes and aligns as
    the one-program routing kernel. With PDL, EARLY (tidal.kernels.pdl's
    early-weights form): each program releases its successor and loads its
    first weight tile (by default its whole slice) before it waits for x,
    its predecessor's output; else it waits first. Without TAIL the programs
    only store their partials (the experts' up kernel sums and routes them:
    fused_moe's one-token routing)."""
    p = tl.program_id(0)
    t = tl.arange(0, BLOCK_T)
    tm = t < tokens
    e = tl.arange(0, E)
    acc = tl.zeros([BLOCK_T, E], tl.float32)
    lo = p * k_per_program
    k_first = lo
    if EARLY:  # (only with PDL)
        gdc_launch_dependents()  # the successor may be placed now: it waits for all of our writes
        k = lo + tl.arange(0, BLOCK_K)
        km = k < dim
        w = tl.load(W + e[None, :] * stride_w + k[:, None], mask=km[:, None], other=0.0)
        gdc_wait()  # x is the predecessor's output: read only past this
        x = tl.load(X + t[:, None] * stride_x + k[None, :], mask=tm[:, None] & km[None, :], other=0.0)
        acc = tile_dot(acc, x, w, IEEE)
        k_first += BLOCK_K
    else:
        pdl_enter(PDL)
    for k0 in range(k_first, tl.minimum(lo + k_per_program, dim), BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        km = k < dim
        x = tl.load(X + t[:, None] * stride_x + k[None, :], mask=tm[:, None] & km[None, :], other=0.0)
        w = tl.load(W + e[None, :] * stride_w + k[:, None], mask=km[:, None], other=0.0)
        acc = tile_dot(acc, x, w, IEEE)
    tl.store(Partial + p * BLOCK_T * E + t[:, None] * E + e[None, :], acc, mask=tm[:, None])  # the rows there are: 1 of 16 at batch 1
    if TAIL:
        _ticket_tail(Partial, Bias, Logits, Weights, Ids, Pairs, BlockExpert, Counter, tokens, nblocks, t, tm, e, E, K, BLOCK_T, BM, CH, BFILL, HAS_BIAS, RENORM)


@triton.jit
def _ticket_tail(
    Partial, Bias, Logits, Weights, Ids, Pairs, BlockExpert, Counter, tokens, nblocks, t, tm, e,
    E: tl.constexpr, K: tl.constexpr, BLOCK_T: tl.constexpr, BM: tl.constexpr, CH: tl.constexpr, BFILL: tl.constexpr, HAS_BIAS: tl.constexpr, RENORM: tl.constexpr,
):
    """The fused router's routing: the last program to store its partial
    sums them all in program order, then routes and aligns."""
    tl.debug_barrier()  # every thread's partial stored before the ticket
    if tl.atomic_add(Counter, 1, sem="acq_rel") == tl.num_programs(0) - 1:
        total = tl.zeros([BLOCK_T, E], tl.float32)
        for q in range(0, tl.num_programs(0)):
            total += tl.load(Partial + q * BLOCK_T * E + t[:, None] * E + e[None, :], mask=tm[:, None], other=0.0, cache_modifier=".cg")
        if HAS_BIAS:
            total += tl.load(Bias + e).to(tl.float32)[None, :]
        tl.store(Logits + t[:, None] * E + e[None, :], total.to(Logits.dtype.element_ty), mask=tm[:, None])
        tl.debug_barrier()  # the logits visible to every thread of this program
        kk = tl.arange(0, K)
        _topk_softmax(Logits, Weights, Ids, tokens, E, 0, tokens, e, kk, E, K, BLOCK_T, RENORM)
        tl.debug_barrier()
        _align(Ids, Pairs, BlockExpert, tokens, nblocks, e, E, K, BM, CH, 256, BFILL)
        tl.atomic_xchg(Counter, 0)  # ready for the next launch (or replay)


def _routing_outputs(tokens: int, experts: int, top_k: int, block_m: int, dtype: torch.dtype, dev: torch.device) -> tuple[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(nblocks, weights [T, k] in dtype, ids [T, k] int64, pairs [NB * block_m]
    int32, block_expert [NB] int32), unwritten."""
    assert experts & (experts - 1) == 0 and top_k & (top_k - 1) == 0, "experts and top-k must be powers of two"
    nblocks = max_blocks(tokens * top_k, experts, block_m)
    return (
        nblocks,
        torch.empty((tokens, top_k), dtype=dtype, device=dev),
        torch.empty((tokens, top_k), dtype=torch.int64, device=dev),
        torch.empty(nblocks * block_m, dtype=torch.int32, device=dev),
        torch.empty(nblocks, dtype=torch.int32, device=dev),
    )


def _tiles(tokens: int, top_k: int, experts: int, nblocks: int) -> tuple[int, int, int]:
    """(wide, pairs chunk, block-entry chunk) of a one-program alignment:
    [rows, E] tiles of at most TILE_ELEMENTS (past that they spill out of
    registers: with 128 experts a [256, E] block-expert scan made the batch-1
    kernel 37 us a layer, 7x the 64-expert one), and no larger than the work
    (at decode sizes a [256, E] scan for 8 pairs was most of the kernel)."""
    wide = max(16, min(256, TILE_ELEMENTS // experts))
    return wide, min(wide, max(16, triton.next_power_of_2(tokens * top_k))), min(wide, max(16, triton.next_power_of_2(nblocks)))


# The router kernel's pipelined K loop keeps ~3 copies of its [16 + E,
# BLOCK_K] operand tiles in shared memory: at 256-wide slices float32 tiles
# do not fit (two float32 router tests failed on an H100 at 256, bf16 ran).
# Half the card's shared memory keeps clear of that; in bf16 128 and 256
# measured the same (bench_kernels.py, H100: 6.8 / 6.9 us at one token).
ROUTER_SMEM_BUDGET = 110 << 10
# Warps of the fused router's programs. Its ticket program's tail (top-k,
# softmax, alignment) is a chain of cross-warp reductions over [16, E] tiles.
# bench_kernels.py's router table, H100 (2aefbeb), us at 8 / 4 / 2 warps:
# Qwen3-30B (E 128) one token 8.5 / 8.0 / 10.0, eight 12.7 / 14.4 / 15.9;
# Moondream (E 64) one token 6.9 / 7.2 / 7.6 (Qwen3-30B decode at batch 1:
# 3.98 ms with 4 warps at one token against 4.02). Four warps are not used:
# their [16, E] tiles spill registers (ptxas, sm_90a: 212 bytes at bf16 and
# E 128), which tests/test_kernel_resources.py forbids.
ROUTER_WARPS = 8


def router_block_k(experts: int, itemsize: int) -> int:
    """The fused router's K slice a program: the widest power of two up to 256
    whose pipelined tiles fit ROUTER_SMEM_BUDGET (bf16: 128 for 64 or 128
    experts; float32: 64)."""
    fit = ROUTER_SMEM_BUDGET // (3 * (ROUTER_MAX_TOKENS + experts) * itemsize)
    return max(16, min(256, 1 << (fit.bit_length() - 1)))


# Programs of the fused router: None, one a BLOCK_K slice of the hidden size
# (16 for Moondream 3: many SMs read the weight at once). Fewer take several
# slices each. Inside a batch-1 step, beside the attention branch's kernels,
# the 16-program launch took 13.5 us on an H100 against 6.9 alone (Moondream
# 3, 2026-12-07): each program waits for an SM, and the ticket for the last.
# A knob to time that trade (benchmarks/with_setting.py); not yet timed.
ROUTER_PROGRAMS: int | None = None


def router_route_and_align(
    x: torch.Tensor, router_w: torch.Tensor, router_b: torch.Tensor | None, top_k: int, block_m: int, renormalize: bool = True, block_k: int | None = None,
    num_warps: int | None = None, programs: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """route_and_align(linear(x, router_w, router_b), ...) in one launch, for at
    most ROUTER_MAX_TOKENS rows: x [T, D], router_w [E, D] -> (weights [T, k]
    in x's dtype, ids [T, k] int64, pairs, block_expert). block_k: the K
    tile (default router_block_k's); num_warps: default ROUTER_WARPS;
    programs: how many share the hidden size (default ROUTER_PROGRAMS, else one a tile)."""
    *outputs, _ = _launch_router(x, router_w, router_b, top_k, block_m, renormalize, block_k, num_warps, programs, tail=True)
    return tuple(outputs)  # type: ignore[return-value]


# One token's routing inside the experts' up kernel (fused_moe.experts_up's
# `route`): the router's programs only store their partial products, and
# every up program sums them, takes the top k and finds its own expert, so
# the ticket, the one-program alignment and a launch boundary leave the
# chain. The same experts and weights as the fused router's (the partials
# summed in program order, topk_softmax_rows). Off until timed on a device
# (`device_run.sh route-in-up`).
ROUTE_IN_UP = False


class UpRouting(NamedTuple):
    """What the up kernel needs to route one token itself: the router
    programs' partials ([programs, rows_per_program, E] float32, row 0
    written), how many programs, the router's bias, renormalization; and
    where it writes the routing weights [k] and ids [k] for the down kernel
    and the caller."""

    partial: torch.Tensor
    programs: int
    rows_per_program: int
    bias: torch.Tensor | None
    renormalize: bool
    weights: torch.Tensor
    ids: torch.Tensor


def router_for_up(
    x: torch.Tensor, router_w: torch.Tensor, router_b: torch.Tensor | None, top_k: int, block_m: int, renormalize: bool = True,
    num_warps: int | None = None, programs: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, UpRouting]:
    """The router's product alone for one token (x [1, D]), its routing left
    to the up kernel -> (weights [1, k], ids [1, k], pairs, block_expert, the
    up kernel's UpRouting), the first four written by that kernel."""
    assert x.shape[0] == 1, "the up kernel routes one token"
    weights, ids, pairs, block_expert, (partial, n) = _launch_router(x, router_w, router_b, top_k, block_m, renormalize, None, num_warps, programs, tail=False)
    return weights, ids, pairs, block_expert, UpRouting(partial, n, ROUTER_MAX_TOKENS, router_b, renormalize, weights, ids)


def _launch_router(
    x: torch.Tensor, router_w: torch.Tensor, router_b: torch.Tensor | None, top_k: int, block_m: int, renormalize: bool, block_k: int | None,
    num_warps: int | None, programs: int | None, tail: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, tuple[torch.Tensor, int]]:
    """The fused router's launch (see router_route_and_align): with `tail`
    the routing outputs are written, else only the partials -> (weights,
    ids, pairs, block_expert, (partials, programs))."""
    tokens, dim = x.shape
    experts = router_w.shape[0]
    block_k = block_k or router_block_k(experts, x.element_size())
    assert tokens <= ROUTER_MAX_TOKENS and x.stride(1) == 1 and router_w.stride(1) == 1
    dev = x.device
    nblocks, weights, ids, pairs, block_expert = _routing_outputs(tokens, experts, top_k, block_m, x.dtype, dev)
    tiles = triton.cdiv(dim, block_k)
    programs = min(tiles, programs or ROUTER_PROGRAMS or tiles)  # by default one K tile each: many SMs read the router's weight at once
    k_per_program = triton.cdiv(tiles, programs) * block_k
    programs = triton.cdiv(dim, k_per_program)  # (none left without a slice)
    if tokens == 0:
        return weights, ids, pairs, block_expert, (torch.empty(0, dtype=torch.float32, device=dev), programs)
    partial = scratch_zeros("router partials", programs * ROUTER_MAX_TOKENS * experts, torch.float32, dev)
    ticket = scratch_zeros("router ticket", 1, torch.int32, dev) if tail else partial  # (without the tail: never touched)
    logits = torch.empty((tokens, experts), dtype=x.dtype, device=dev) if tail else partial
    _, pairs_chunk, block_chunk = _tiles(tokens, top_k, experts, nblocks)
    pdl = pdl_on(dev)
    early = pdl and early_weights_on(dev) and x.element_size() == 2  # (float32's early tile spills registers at 128 experts)
    _router_route_kernel[(programs,)](
        x, router_w, router_b if router_b is not None else router_w, partial, logits, weights, ids, pairs, block_expert, ticket,
        tokens, dim, k_per_program, x.stride(0), router_w.stride(0), nblocks,
        E=experts, K=top_k, BLOCK_T=ROUTER_MAX_TOKENS, BLOCK_K=block_k, BM=block_m, CH=pairs_chunk, BFILL=block_chunk,
        HAS_BIAS=router_b is not None, RENORM=renormalize, IEEE=x.dtype == torch.float32, PDL=pdl, EARLY=early, TAIL=tail, num_warps=num_warps or ROUTER_WARPS,
        launch_pdl=pdl,
    )
    return weights, ids, pairs, block_expert, (partial, programs)


FORMS = ("one program", "chunks", "experts")
# The alignment in one program, as chunks (each program a [pairs, E] one-hot
# scan of its chunk) or one program an expert (EXPERT_ALIGN_MAX_PAIRS pairs at
# most: every program counts them all). bench_kernels.py's routing table, H100:
# one program an expert is the fastest at every size timed (16-1024 tokens);
# Qwen3-30B (E 128) 5.6 / 6.4 / 8.4 / 17.5 us at 16 / 64 / 256 / 1024 tokens
# against 11.3 (one program) / 28.2 / 21.9 / 24.9 (chunks); Moondream (E 64)
# 4.8 us against 7.0 at 16.
EXPERT_ALIGN = True
EXPERT_ALIGN_MAX_PAIRS = 8192
EXPERT_ALIGN_CHUNK = 4096  # pairs an expert program reads at once (a power of two)


def one_launch_fits(tokens: int, experts: int) -> bool:
    """Whether route_and_align's one-program form suits this size (the default
    where the expert-per-program alignment is off)."""
    return tokens <= ONE_LAUNCH_MAX_TOKENS and tokens * experts <= ONE_LAUNCH_MAX_ELEMENTS


def default_form(tokens: int, experts: int, top_k: int) -> str:
    """The form route_and_align takes when none is named (see FORMS)."""
    if EXPERT_ALIGN and tokens * top_k <= EXPERT_ALIGN_MAX_PAIRS:
        return "experts"
    return "one program" if one_launch_fits(tokens, experts) else "chunks"


def route_and_align(
    router_logits: torch.Tensor, top_k: int, block_m: int, dtype: torch.dtype, renormalize: bool = True, form: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """router_logits [T, E] -> (weights [T, k] in dtype, ids [T, k] int64,
    pairs [NB * block_m] int32, block_expert [NB] int32); see align_by_expert.
    form (default: default_form's): "one program" for everything; "chunks":
    the top-k on a grid whose programs also count their pairs per expert,
    then the alignment in parallel over the same chunks; "experts": the
    top-k on a grid, then the alignment with one program an expert. The same
    result in every form."""
    tokens, experts = router_logits.shape
    form = form or default_form(tokens, experts, top_k)
    if form not in FORMS:
        raise ValueError(f"unknown routing form {form!r}; one of {FORMS}")
    dev = router_logits.device
    nblocks, weights, ids, pairs, block_expert = _routing_outputs(tokens, experts, top_k, block_m, dtype, dev)
    wide, pairs_chunk, block_chunk = _tiles(tokens, top_k, experts, nblocks)
    if form == "one program":
        block_t = 16 if tokens <= 16 else 32
        _route_align_kernel[(1,)](
            router_logits, weights, ids, pairs, block_expert, block_expert, tokens, router_logits.stride(0), nblocks, tokens,
            E=experts, K=top_k, BLOCK_T=block_t, BM=block_m, CH=pairs_chunk, FILL=256, BFILL=block_chunk,
            TOPK=True, ALIGN=True, RENORM=renormalize, COUNT=False, num_warps=8,
        )
        return weights, ids, pairs, block_expert
    # the top-k on a grid (for "chunks" each program also counts its pairs per
    # expert): one program walking ~6k pairs of a 737-position prefill took 112 us a layer
    block_t = max(1, min(32, wide // top_k))  # a chunk's pairs, block_t * top_k, in one [pairs, E] tile
    nchunks = triton.cdiv(tokens, block_t)
    chunks = form == "chunks"
    counts = torch.empty((nchunks, experts), dtype=torch.int32, device=dev) if chunks else block_expert
    _route_align_kernel[(nchunks,)](
        router_logits, weights, ids, pairs, block_expert, counts, tokens, router_logits.stride(0), nblocks, block_t,
        E=experts, K=top_k, BLOCK_T=block_t, BM=block_m, CH=block_t * top_k, FILL=256, BFILL=wide, TOPK=True, ALIGN=False, RENORM=renormalize, COUNT=chunks, num_warps=8,
    )
    if chunks:
        _place_kernel[(nchunks,)](ids, counts, pairs, block_expert, tokens * top_k, nchunks, nblocks, E=experts, K=top_k, BLOCK_T=block_t, BM=block_m, FILL=wide, num_warps=8)
    else:
        ch = min(EXPERT_ALIGN_CHUNK, max(16, triton.next_power_of_2(tokens * top_k)))
        _align_expert_kernel[(experts,)](ids, pairs, block_expert, tokens * top_k, nblocks, E=experts, BM=block_m, CH=ch, FILL=128, num_warps=4)
    return weights, ids, pairs, block_expert
