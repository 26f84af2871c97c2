"""Matrix products with few rows (decode steps: batch 1 to 16), y = x @ W.T + b.

At batch 1 a projection is a pass over its weight: time is bytes over
bandwidth, and what counts is keeping enough loads in flight on every SM.
cuBLAS reaches ~60-80% of copy bandwidth on these shapes (the 2026-12-06
profiles), some through split-K plus a reduce launch. Here each program owns
BLOCK_N output columns and walks the whole K dimension in BLOCK_K tiles,
software-pipelined (num_stages), so there is one launch, no partial sums in
memory, and a fixed summation order (deterministic). x's rows are padded to
16 for the tensor-core product; the padding rows are masked out.

Split-K (opt-in through the config, for bench_kernels.py to weigh): with
few column blocks (2048 outputs make 128 programs of 16: one an SM, too few
loads in flight) each column block's K is cut into SPLIT ranges on a second
grid axis; each program writes a float32 partial, and the last of a column
block's programs to finish (a ticket, the only atomic) sums them in range
order, so the result does not depend on scheduling.

With programmatic dependent launch in its early-weights form
(tidal.kernels.pdl.EARLY_WEIGHTS, for 16-bit weights and first tiles up to
EARLY_TILE_BYTES; otherwise no PDL here), each program lets
its successor be placed at once and loads its first weight tile before it
waits for its predecessor (the weights never depend on it; x, the previous
kernel's output, is read only after the wait): the weight stream starts in
the predecessor's tail. The tiles are summed in the same order either way.
With tidal.kernels.l2_prefetch on, a program first asks for its whole slice
of W in L2 (one K range, weights within its bound).

The models reach it through tidal.layers.linear, behind
EngineConfig(skinny_gemm): "auto" (the default) takes it only for the shapes
where benchmarks/bench_kernels.py measured it ahead of cuBLAS on the H100
(prefers_skinny), "all" for every decode-sized projection, "off" never.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tidal.kernels import scratch_zeros
from tidal.kernels.fused_moe import shared_memory_bytes
from tidal.kernels.l2_prefetch import l2_prefetch, prefetch_fits, row_block_span
from tidal.kernels.pdl import early_weights_on, gdc_launch_dependents, gdc_wait
from tidal.kernels.tiles import tile_dot

MAX_ROWS = 16  # one tensor-core tile of rows; larger batches go to cuBLAS


@triton.jit
def _skinny_kernel(
    X, W, B, Y, Partial, Ticket,
    M, N, K, k_per_split,
    stride_xm, stride_wn, stride_ym,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr, SPLIT: tl.constexpr,
    PDL: tl.constexpr, PREFETCH: tl.constexpr,
):
    pid = tl.program_id(0)
    s = tl.program_id(1)
    if PREFETCH:  # (one K range: the program's slice is BLOCK_N whole rows, contiguous) into L2 while we wait
        first, nbytes = row_block_span(pid, N, K, stride_wn, BLOCK_N, W.dtype.element_ty.primitive_bitwidth // 8)
        l2_prefetch(W + first, nbytes)
    m = tl.arange(0, BLOCK_M)
    n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    mmask = m < M
    nmask = n < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    k_end = tl.minimum(K, (s + 1) * k_per_split)
    k_first = s * k_per_split
    if PDL:
        # the successor may be placed now (it waits for all of our writes);
        # the first weight tile streams in while the predecessor finishes
        gdc_launch_dependents()
        k = k_first + tl.arange(0, BLOCK_K)
        kmask = k < k_end
        w = tl.load(W + n[None, :].to(tl.int64) * stride_wn + k[:, None], mask=nmask[None, :] & kmask[:, None], other=0.0)
        gdc_wait()  # x is the predecessor's output: read only past this
        x = tl.load(X + m[:, None] * stride_xm + k[None, :], mask=mmask[:, None] & kmask[None, :], other=0.0)
        acc = tile_dot(acc, x, w, IEEE)
        k_first += BLOCK_K
    for k0 in range(k_first, k_end, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        kmask = k < k_end
        x = tl.load(X + m[:, None] * stride_xm + k[None, :], mask=mmask[:, None] & kmask[None, :], other=0.0)
        w = tl.load(W + n[None, :].to(tl.int64) * stride_wn + k[:, None], mask=nmask[None, :] & kmask[:, None], other=0.0)
        acc = tile_dot(acc, x, w, IEEE)
    out_mask = mmask[:, None] & nmask[None, :]
    if SPLIT > 1:
        # this range's partial, then the column block's last program sums all in range order
        part = Partial + (s * BLOCK_M + m[:, None]) * N + n[None, :]
        tl.store(part, acc, mask=out_mask)
        tl.debug_barrier()  # every thread's partial stored before the ticket
        if tl.atomic_add(Ticket + pid, 1, sem="acq_rel") == SPLIT - 1:
            acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            for r in tl.static_range(SPLIT):
                acc += tl.load(Partial + (r * BLOCK_M + m[:, None]) * N + n[None, :], mask=out_mask, other=0.0, cache_modifier=".cg")
            tl.atomic_xchg(Ticket + pid, 0)  # ready for the next launch (or replay)
        else:
            return
    if HAS_BIAS:
        acc += tl.load(B + n, mask=nmask, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + m[:, None] * stride_ym + n[None, :], acc.to(Y.dtype.element_ty), mask=out_mask)


def prefers_skinny(n: int, k: int) -> bool:
    """Where the skinny product beat cuBLAS at 1 and 8 rows on the H100
    (2026-12-06, bench_kernels.py, weights rotated past L2): routers (a few
    hundred columns: cuBLAS 4.7 us, skinny 4.1), lm_heads (tens of thousands
    of columns: 3-6% faster) and products with both sides at least 4096
    (Qwen3-VL-8B's q/k/v, o, gate/up, down: 0-6% faster). For the other
    K = 2048 projections of Moondream and Qwen3-30B cuBLAS was level or up
    to 12% ahead."""
    return n <= 256 or n >= 32768 or (n >= 4096 and k >= 4096)


H100_SHARED = 227 << 10  # bytes a block may opt into


def skinny_config(n: int, k: int, num_sms: int = 132, itemsize: int = 2, shared_bytes: int = H100_SHARED) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps, num_stages): the widest column block that
    still gives every SM at least two programs, so each SM streams its share
    of W with several tiles in flight. A router's few columns: one narrow
    block with long K tiles (the fastest launch measured for 64-128 x 2048).
    Stages, then BLOCK_K, shrink until the tiles fit shared memory (float32
    weights take twice bf16's bytes): the pipeline holds stages - 1 tiles of
    x and W (a bf16 lm_head at 4 stages compiles on the H100, float32 did not),
    less 4 KiB of the kernel's own scratch."""
    if n <= 256:
        block_n, block_k, stages = 16, 512 if k >= 512 else max(16, triton.next_power_of_2(k)), 3
    else:
        block_n = 16
        while block_n < 128 and triton.cdiv(n, block_n * 2) >= 2 * num_sms:
            block_n *= 2
        block_k, stages = (256 if k >= 256 else max(16, triton.next_power_of_2(k))), 4
    while (block_n + MAX_ROWS) * block_k * itemsize * (stages - 1) > shared_bytes - 4096:
        if stages > 2:
            stages -= 1
        else:
            block_k //= 2
    return block_n, block_k, 4, stages


# The early-weights form holds a program's first W tile in registers across
# the wait: at most this many bytes. Compiled for sm_90 with Triton 3.9
# (ptxas, 4 warps), bf16 tiles up to 64 x 256 spill nothing (16 x 512 takes
# 255 registers); a bf16 lm_head's 128 x 256 tile spilled 136 bytes, and
# float32 tiles (with the IEEE product) spilled from 16 x 256. The device's
# Triton 3.6 needs fewer (a reviewer's count: 80 registers at 16 x 512, 56 at
# 16 x 256), so the bound may be conservative there.
EARLY_TILE_BYTES = 16 << 10


def takes_early_form(block_n: int, block_k: int, itemsize: int) -> bool:
    """Whether a launch with these tiles may take PDL's early-weights form
    (where tidal.kernels.pdl has it on): 16-bit weights, a small first tile."""
    return itemsize == 2 and block_n * block_k * itemsize <= EARLY_TILE_BYTES


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, config: tuple[int, ...] | None = None) -> torch.Tensor:
    """x [M, K] (M <= MAX_ROWS); weight [N, K]; bias [N] or None -> [M, N] in x's dtype.
    config: (BLOCK_N, BLOCK_K, num_warps, num_stages[, SPLIT]) instead of
    skinny_config's (which never splits K)."""
    rows, k = x.shape
    n = weight.shape[0]
    assert rows <= MAX_ROWS, f"at most {MAX_ROWS} rows; use torch's linear for more"
    assert weight.shape[1] == k and x.stride(1) == 1 and weight.stride(1) == 1
    y = torch.empty((rows, n), dtype=x.dtype, device=x.device)
    if rows == 0:
        return y
    shared = min(H100_SHARED, shared_memory_bytes(x.device)) if x.is_cuda else H100_SHARED
    block_n, block_k, warps, stages, *rest = config or skinny_config(n, k, itemsize=weight.element_size(), shared_bytes=shared)
    split = rest[0] if rest else 1
    pdl = early_weights_on(x.device) and takes_early_form(block_n, block_k, weight.element_size())
    prefetch = split == 1 and prefetch_fits(weight)
    blocks = triton.cdiv(n, block_n)
    k_per_split = triton.cdiv(triton.cdiv(k, split), block_k) * block_k  # whole tiles per range
    if split > 1:
        partial = scratch_zeros("skinny partials", split * MAX_ROWS * n, torch.float32, x.device)
        ticket = scratch_zeros("skinny tickets", blocks, torch.int32, x.device)
    else:
        partial = ticket = y  # never read
    _skinny_kernel[(blocks, split)](
        x, weight, bias if bias is not None else weight, y, partial, ticket,
        rows, n, k, k_per_split,
        x.stride(0), weight.stride(0), y.stride(0),
        HAS_BIAS=bias is not None, BLOCK_M=MAX_ROWS, BLOCK_N=block_n, BLOCK_K=block_k, IEEE=x.dtype == torch.float32, SPLIT=split,
        PDL=pdl, PREFETCH=prefetch, num_warps=warps, num_stages=stages, launch_pdl=pdl,
    )
    return y
