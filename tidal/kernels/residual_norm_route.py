"""A residual add, the norm after it and the MoE routing that reads the norm's
output, in one launch, at decode sizes (at most ROUTER_MAX_TOKENS rows):

    x = (x + attn) + sum_j parts[:, j]       as tidal.kernels.residual_norm
                                              (Moondream 3's block end), or
    x = x + sum_j parts[:, j]                 as tidal.kernels.rms_norm's
                                              add_rms_norm (Qwen3, attn None)
    h = LayerNorm(x) or RMSNorm(x)
    weights, ids, pairs, block_expert = route_and_align(linear(h, router))

At decode sizes the routing launch sits on the critical path of every MoE
layer; here it rides in the residual launch instead. Program p owns the hidden slice [p *
BLOCK_K, +BLOCK_K): every program reduces the whole rows for the LayerNorm's
statistics (two passes over L2-resident rows), writes its slice of x and h
and its partial router logits; the last program to finish (a ticket) sums the
partials in program order and routes, as moe_route's fused router does.
Numerically x is the residual kernels' bit for bit; h and the logits may differ
from the two-launch path in the last bit (the row sums are taken in chunks).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tidal.kernels import scratch_zeros
from tidal.kernels.moe_route import (
    ROUTER_MAX_TOKENS,
    _last_program_routes,
    _routing_outputs,
    _tiles,
    router_block_k,
)

# Models route their MoE blocks here at decode sizes when this is on (Moondream
# 3's text decoder, Qwen3-MoE). Off until bench_kernels.py's norm-route table
# and bench_moondream.py's `norm_route` part measure it on the device. In bf16
# h may differ from the residual kernels' in the last bit (row sums taken in
# chunks), so a near-tie between two experts can route differently.
FUSED_NORM_ROUTE = False


@triton.jit
def _new_x(X, Attn, Parts, t, d, tm, dm, stride_x, stride_a, stride_p, stride_pj, dtype: tl.constexpr, KP: tl.constexpr, HAS_ATTN: tl.constexpr):
    """The new residual stream at rows t, columns d, float32 of the
    dtype-rounded value (0 where masked)."""
    m = tm[:, None] & dm[None, :]
    x = tl.load(X + t[:, None] * stride_x + d[None, :], mask=m, other=0.0).to(tl.float32)
    if HAS_ATTN:
        x = (x + tl.load(Attn + t[:, None] * stride_a + d[None, :], mask=m, other=0.0).to(tl.float32)).to(dtype).to(tl.float32)
    mlp = tl.zeros_like(x)
    for j in tl.static_range(KP):
        mlp += tl.load(Parts + t[:, None] * stride_p + j * stride_pj + d[None, :], mask=m, other=0.0).to(tl.float32)
    return (x + mlp.to(dtype).to(tl.float32)).to(dtype).to(tl.float32)


@triton.jit
def _residual_norm_route_kernel(
    X, Attn, Parts, LnW, LnB, XOut, HOut, W, Bias, Partial, Logits, Weights, Ids, Pairs, BlockExpert, Counter,
    tokens, dim, stride_x, stride_a, stride_p, stride_pj, stride_xo, stride_h, stride_w, eps, nblocks,
    KP: tl.constexpr, E: tl.constexpr, K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    BM: tl.constexpr, CH: tl.constexpr, BFILL: tl.constexpr, HAS_BIAS: tl.constexpr, RENORM: tl.constexpr, IEEE: tl.constexpr,
    HAS_ATTN: tl.constexpr, RMS: tl.constexpr,
):
    p = tl.program_id(0)
    t = tl.arange(0, BLOCK_T)
    tm = t < tokens
    dtype = XOut.dtype.element_ty
    # the norm's statistics over whole rows: LayerNorm's mean, then the centred
    # variance; RMSNorm's mean square (mean 0)
    mean = tl.zeros([BLOCK_T], tl.float32)
    if not RMS:
        total = tl.zeros([BLOCK_T], tl.float32)
        for d0 in range(0, dim, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            total += tl.sum(_new_x(X, Attn, Parts, t, d, tm, d < dim, stride_x, stride_a, stride_p, stride_pj, dtype, KP, HAS_ATTN), axis=1)
        mean = total / dim
    sq = tl.zeros([BLOCK_T], tl.float32)
    for d0 in range(0, dim, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        dm = d < dim
        diff = tl.where(tm[:, None] & dm[None, :], _new_x(X, Attn, Parts, t, d, tm, dm, stride_x, stride_a, stride_p, stride_pj, dtype, KP, HAS_ATTN) - mean[:, None], 0.0)
        sq += tl.sum(diff * diff, axis=1)
    rstd = 1.0 / tl.sqrt(sq / dim + eps)
    # this program's slice: x and h stored, h's partial router logits
    k = p * BLOCK_K + tl.arange(0, BLOCK_K)
    km = k < dim
    m = tm[:, None] & km[None, :]
    xs = _new_x(X, Attn, Parts, t, k, tm, km, stride_x, stride_a, stride_p, stride_pj, dtype, KP, HAS_ATTN)
    tl.store(XOut + t[:, None] * stride_xo + k[None, :], xs.to(dtype), mask=m)
    lw = tl.load(LnW + k, mask=km, other=0.0).to(tl.float32)
    if RMS:  # as add_rms_norm: normalized, rounded, times the weight, rounded
        h = tl.where(m, lw[None, :] * (xs * rstd[:, None]).to(dtype).to(tl.float32), 0.0).to(dtype)
    else:
        lb = tl.load(LnB + k, mask=km, other=0.0).to(tl.float32)
        h = tl.where(m, (xs - mean[:, None]) * rstd[:, None] * lw[None, :] + lb[None, :], 0.0).to(dtype)
    tl.store(HOut + t[:, None] * stride_h + k[None, :], h, mask=m)
    e = tl.arange(0, E)
    w = tl.load(W + e[None, :] * stride_w + k[:, None], mask=km[:, None], other=0.0)
    if IEEE:
        acc = tl.dot(h, w, input_precision="ieee")
    else:
        acc = tl.dot(h, w)
    tl.store(Partial + p * BLOCK_T * E + t[:, None] * E + e[None, :], acc)
    _last_program_routes(Partial, Bias, Logits, Weights, Ids, Pairs, BlockExpert, Counter, tokens, nblocks, t, tm, e, E, K, BLOCK_T, BM, CH, BFILL, HAS_BIAS, RENORM)


def fits(tokens: int, experts: int, top_k: int) -> bool:
    """Whether residual_norm_route takes a step of `tokens` rows."""
    return 0 < tokens <= ROUTER_MAX_TOKENS and experts & (experts - 1) == 0 and top_k & (top_k - 1) == 0


def launch_sizes(parts: int, experts: int, dim: int, itemsize: int) -> tuple[int, int]:
    """(BLOCK_K, BLOCK_D): each program's hidden slice and the row chunk of
    its statistics passes. Each program re-reads the rows for the statistics:
    wider slices mean fewer programs and fewer re-reads. Register use, from
    ptxas for sm_90 (Triton 3.9, 8 warps, bf16): one part, 256-wide slices and
    512-wide row chunks, 210 registers, no spills; eight parts spill at
    256-wide slices (156 bytes) or 512-wide chunks (~10 KB), not at 128 and
    128 (255); float32 takes the narrow sizes. tests/test_kernel_resources.py
    checks them."""
    wide = parts <= 1 and itemsize == 2  # float32 with one part spilled 4 bytes at 512
    block_k = 256 if wide else router_block_k(experts, itemsize)
    return block_k, min(512 if wide else 128, triton.next_power_of_2(dim))


def residual_norm_route(
    x: torch.Tensor,
    attn: torch.Tensor | None,
    parts: torch.Tensor,
    norm_weight: torch.Tensor,
    norm_bias: torch.Tensor | None,
    eps: float,
    router_w: torch.Tensor,
    router_b: torch.Tensor | None,
    top_k: int,
    block_m: int,
    renormalize: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """x [T, D]; attn [T, D] or None; parts [T, k, D]; a LayerNorm's weight
    and bias, or an RMSNorm's weight (norm_bias None); router_w [E, D] ->
    (new x [T, D], norm(new x) [T, D], (weights [T, top_k], ids [T, top_k]
    int64, pairs, block_expert) as route_and_align gives them for
    linear(h, router_w, router_b)). T <= ROUTER_MAX_TOKENS (see fits)."""
    tokens, dim = x.shape
    experts = router_w.shape[0]
    assert fits(tokens, experts, top_k), "residual_norm_route: at most ROUTER_MAX_TOKENS rows, power-of-two experts and top-k"
    assert x.stride(1) == parts.stride(2) == router_w.stride(1) == 1 and (attn is None or attn.stride(1) == 1)
    dev = x.device
    nblocks, weights, ids, pairs, block_expert = _routing_outputs(tokens, experts, top_k, block_m, x.dtype, dev)
    x_out = torch.empty_like(x)
    h = torch.empty_like(x)
    block_k, block_d = launch_sizes(parts.shape[1], experts, dim, x.element_size())
    programs = triton.cdiv(dim, block_k)
    partial = scratch_zeros("norm-route partials", programs * ROUTER_MAX_TOKENS * experts, torch.float32, dev)
    ticket = scratch_zeros("norm-route ticket", 1, torch.int32, dev)
    logits = torch.empty((tokens, experts), dtype=x.dtype, device=dev)
    _, pairs_chunk, block_chunk = _tiles(tokens, top_k, experts, nblocks)
    a = attn if attn is not None else x
    _residual_norm_route_kernel[(programs,)](
        x, a, parts, norm_weight, norm_bias if norm_bias is not None else norm_weight, x_out, h, router_w, router_b if router_b is not None else router_w,
        partial, logits, weights, ids, pairs, block_expert, ticket,
        tokens, dim, x.stride(0), a.stride(0), parts.stride(0), parts.stride(1), x_out.stride(0), h.stride(0), router_w.stride(0), eps, nblocks,
        KP=parts.shape[1], E=experts, K=top_k, BLOCK_T=ROUTER_MAX_TOKENS, BLOCK_K=block_k, BLOCK_D=block_d,
        BM=block_m, CH=pairs_chunk, BFILL=block_chunk, HAS_BIAS=router_b is not None, RENORM=renormalize, IEEE=x.dtype == torch.float32,
        HAS_ATTN=attn is not None, RMS=norm_bias is None, num_warps=8,
    )
    return x_out, h, (weights, ids, pairs, block_expert)
