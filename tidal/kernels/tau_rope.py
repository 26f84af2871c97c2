"""Moondream 3's attention input in one pass: tau scaling of q and v, partial
rotary on q and k, and the K/V write into the paged cache.

For position t and head h, with lin = gelu(qkv) @ [wq; wv].T in float32
(given by the caller, or for small batches computed here: a program reads
its head's two rows of [wq; wv], which saves three launches per layer):
    pos_term = 1 + sigmoid(alpha[h] * log(pos + 1)) - 0.5
    q = rotary(round(q * (tanh(lin[h]) + pos_term)))
    k = rotary(k)
    v = round(v * (tanh(lin[H + h]) + pos_term))
where round() is the cast to the model dtype the torch path makes, and rotary
turns dims [0, R) as halves (real [0, R/2), imaginary [R/2, R)).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tidal.kernels.kv_store import cache_value, is_fp8
from tidal.kernels.pdl import pdl_enter, pdl_on


@triton.jit
def _tanh(x):
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _gelu_exact(x):
    return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))


@triton.jit
def _rotate(x, partner, cos, sin, d, HALF: tl.constexpr, ROT: tl.constexpr):
    """Rotated dims: x*cos -/+ partner*sin; the rest pass through."""
    sign = tl.where(d < HALF, -1.0, 1.0)
    return tl.where(d < ROT, x * cos + sign * partner * sin, x)


@triton.jit
def _tau_rope_kv_kernel(
    QKV, Lin, WTau, Alpha, Pos, Loc, Cos, Sin, QOut, KCache, VCache,
    tokens, stride_qkv, stride_lin, stride_w, stride_qo_t, stride_qo_h, stride_cs,
    stride_ks, stride_kh, stride_vs, stride_vh,
    H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, HALF: tl.constexpr, ROT: tl.constexpr, BLOCK_T: tl.constexpr,
    LIN_HERE: tl.constexpr, BLOCK_C: tl.constexpr, FP8: tl.constexpr, PDL: tl.constexpr,
):
    pdl_enter(PDL)
    h = tl.program_id(1)
    kv = tl.program_id(2)  # 0: head h's query; 1: its key and value (two programs: half the serial work each at batch 1)
    if kv == 1 and h >= HKV:
        return
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = t < tokens
    t64 = t.to(tl.int64)
    d = tl.arange(0, D)
    partner = tl.where(d < HALF, d + HALF, tl.where(d < ROT, d - HALF, d))
    freq = tl.where(d < HALF, d, d - HALF)
    pos = tl.load(Pos + t, mask=tmask, other=0)
    m2 = tmask[:, None]
    fmask = m2 & (d < ROT)[None, :]
    cos = tl.load(Cos + pos[:, None] * stride_cs + freq[None, :], mask=fmask, other=1.0)
    sin = tl.load(Sin + pos[:, None] * stride_cs + freq[None, :], mask=fmask, other=0.0)
    pos_term = 1.0 + tl.sigmoid(tl.load(Alpha + h).to(tl.float32) * tl.log(pos.to(tl.float32) + 1.0)) - 0.5
    row = QKV + t64[:, None] * stride_qkv
    lin_row = kv * H + h  # wq's row h, or wv's
    if LIN_HERE:
        lin = tl.zeros([BLOCK_T], tl.float32)
        for c0 in range(0, (H + 2 * HKV) * D, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            cm = c < (H + 2 * HKV) * D
            feat = _gelu_exact(tl.load(row + c[None, :], mask=m2 & cm[None, :], other=0.0).to(tl.float32))
            lin += tl.sum(feat * tl.load(WTau + lin_row * stride_w + c, mask=cm, other=0.0)[None, :], axis=1)
    else:
        lin = tl.load(Lin + t64 * stride_lin + lin_row, mask=tmask, other=0.0)
    tau = _tanh(lin) + pos_term
    if kv == 0:
        q = (tl.load(row + h * D + d[None, :], mask=m2, other=0.0).to(tl.float32) * tau[:, None]).to(QOut.dtype.element_ty).to(tl.float32)
        qp = (tl.load(row + h * D + partner[None, :], mask=m2, other=0.0).to(tl.float32) * tau[:, None]).to(QOut.dtype.element_ty).to(tl.float32)
        q = _rotate(q, qp, cos, sin, d[None, :], HALF, ROT)
        tl.store(QOut + t64[:, None] * stride_qo_t + h * stride_qo_h + d[None, :], q.to(QOut.dtype.element_ty), mask=m2)
    else:
        slot = tl.load(Loc + t, mask=tmask, other=0).to(tl.int64)
        k_off = H * D + h * D
        k = tl.load(row + k_off + d[None, :], mask=m2, other=0.0).to(tl.float32)
        kp = tl.load(row + k_off + partner[None, :], mask=m2, other=0.0).to(tl.float32)
        k = _rotate(k, kp, cos, sin, d[None, :], HALF, ROT)
        # through the model's dtype, as the torch path's k and v reach KVPool.write
        tl.store(KCache + slot[:, None] * stride_ks + h * stride_kh + d[None, :], cache_value(k.to(QOut.dtype.element_ty).to(tl.float32), KCache, FP8), mask=m2)
        v = tl.load(row + k_off + HKV * D + d[None, :], mask=m2, other=0.0).to(tl.float32) * tau[:, None]
        tl.store(VCache + slot[:, None] * stride_vs + h * stride_vh + d[None, :], cache_value(v.to(QOut.dtype.element_ty).to(tl.float32), VCache, FP8), mask=m2)


LIN_HERE_MAX_TOKENS = 64  # above: one product for all heads is cheaper

# Past LIN_HERE_MAX_TOKENS, tau's projection gelu(qkv) @ [wq; wv].T as one
# Triton kernel (the GELU on the loaded tile; with bf16 weights the float32
# features as three bf16 parts on the tensor cores, each part's products exact
# and summed in float32), instead of torch's float copy, GELU and float32 GEMM
# (a mixed step of two image prefixes on an H100: ~4 ms of its 49, 2.4 ms of
# it the float32 GEMM). Off until timed on the device: device_run.sh tau runs
# its tests and a mixed step's profile with it on and off.
LIN_KERNEL = False


@triton.jit
def _tau_lin_kernel(
    QKV, W, Out, tokens, C, stride_q, stride_w, stride_o,
    N: tl.constexpr, NP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT: tl.constexpr,
):
    """Out[t, n] = sum_c gelu(QKV[t, c]) * W[n, c] in float32, BLOCK_M tokens a program."""
    t = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    tm = t < tokens
    n = tl.arange(0, NP)
    nm = n < N
    acc = tl.zeros([BLOCK_M, NP], tl.float32)
    for k0 in range(0, C, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        km = k < C
        f = _gelu_exact(tl.load(QKV + t[:, None].to(tl.int64) * stride_q + k[None, :], mask=tm[:, None] & km[None, :], other=0.0).to(tl.float32))
        w = tl.load(W + n[None, :] * stride_w + k[:, None], mask=km[:, None] & nm[None, :], other=0.0)  # [BLOCK_K, NP]
        if SPLIT:  # bf16 weights: f = hi + mid + lo in bf16 (24 bits), every product exact
            hi = f.to(tl.bfloat16)
            rest = f - hi.to(tl.float32)
            mid = rest.to(tl.bfloat16)
            lo = (rest - mid.to(tl.float32)).to(tl.bfloat16)
            acc = tl.dot(hi, w, acc)
            acc = tl.dot(mid, w, acc)
            acc = tl.dot(lo, w, acc)
        else:
            acc = tl.dot(f, w.to(tl.float32), acc, input_precision="ieee")
    tl.store(Out + t[:, None].to(tl.int64) * stride_o + n[None, :], acc, mask=tm[:, None] & nm[None, :])


def tau_projection(qkv: torch.Tensor, w_tau: torch.Tensor, w_tau_bf16: torch.Tensor | None = None, kernel: bool | None = None) -> torch.Tensor:
    """gelu(qkv) @ w_tau.T in float32: qkv [T, C]; w_tau [2H, C] float32 -> [T, 2H].
    w_tau_bf16: the same weights in bfloat16 when they are exactly that (a
    bf16 checkpoint): the kernel then runs on the tensor cores. kernel:
    LIN_KERNEL by default (torch's float32 ops otherwise)."""
    if not (LIN_KERNEL if kernel is None else kernel):
        return torch.nn.functional.linear(torch.nn.functional.gelu(qkv.float()), w_tau)
    tokens, c = qkv.shape
    n = w_tau.shape[0]
    w = w_tau_bf16 if w_tau_bf16 is not None else w_tau
    assert qkv.stride(1) == 1 and w.stride(1) == 1 and w.shape[1] == c
    out = torch.empty((tokens, n), dtype=torch.float32, device=qkv.device)
    block_m = 32
    _tau_lin_kernel[(triton.cdiv(tokens, block_m),)](
        qkv, w, out, tokens, c, qkv.stride(0), w.stride(0), out.stride(0),
        N=n, NP=max(16, triton.next_power_of_2(n)), BLOCK_M=block_m, BLOCK_K=64, SPLIT=w_tau_bf16 is not None,
        num_warps=4, num_stages=3,
    )
    return out


def tau_rope_kv(
    qkv: torch.Tensor,
    w_tau: torch.Tensor,
    alpha: torch.Tensor,
    positions: torch.Tensor,
    out_cache_loc: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    n_heads: int,
    head_dim: int,
    launch: tuple[int, int] | None = None,
    w_tau_bf16: torch.Tensor | None = None,
) -> torch.Tensor:
    """qkv [T, (H + 2 Hkv) * D]; w_tau [2H, (H + 2 Hkv) * D] float32 ([wq; wv]);
    alpha [H]; positions, out_cache_loc [T]; cos/sin [max_pos, R/2];
    k/v_cache [S, Hkv, D] (one layer's) -> q [T, H, D]. Writes k and v at
    out_cache_loc. launch: (BLOCK_C, num_warps) instead of the defaults, for
    benchmarks/bench_kernels.py to compare. w_tau_bf16: see tau_projection."""
    tokens = qkv.shape[0]
    n_kv = k_cache.shape[1]
    assert qkv.stride(1) == 1 and w_tau.stride(1) == 1 and cos.stride(1) == 1
    q = torch.empty((tokens, n_heads, head_dim), dtype=qkv.dtype, device=qkv.device)
    if tokens == 0:
        return q
    half = cos.shape[1]
    lin_here = tokens <= LIN_HERE_MAX_TOKENS
    lin = w_tau if lin_here else tau_projection(qkv, w_tau, w_tau_bf16)
    # with the projection inside, many programs and wide chunks keep loads in
    # flight; at one token 4096-wide chunks over 8 warps measured 4.9 us against
    # 6.8 for 1024 over 4 (bench_kernels.py, H100)
    block_t = 1 if tokens == 1 else 4 if lin_here else 16
    default = (4096, 8) if tokens == 1 else (1024, 4) if lin_here else (256, 4)
    block_c, warps = launch or default
    pdl = pdl_on(qkv.device)
    _tau_rope_kv_kernel[(triton.cdiv(tokens, block_t), n_heads, 2)](
        qkv, lin, w_tau, alpha, positions, out_cache_loc, cos, sin, q, k_cache, v_cache,
        tokens, qkv.stride(0), lin.stride(0), w_tau.stride(0), q.stride(0), q.stride(1), cos.stride(0),
        k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        H=n_heads, HKV=n_kv, D=head_dim, HALF=half, ROT=2 * half, BLOCK_T=block_t,
        LIN_HERE=lin_here, BLOCK_C=block_c, FP8=is_fp8(k_cache), PDL=pdl, num_warps=warps, launch_pdl=pdl,
    )
    return q
