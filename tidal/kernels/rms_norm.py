"""Qwen-style RMSNorm kernels, one program per position (or per head):

    add_rms_norm: x = x + sum_j parts[t, j] (the attention output, k = 1, or
        the MoE's k weighted expert outputs, summed in float32 and rounded
        once, as torch's sum over them is), rounded to the model dtype; then
        h = RMSNorm(x) with the next norm's weight. Replaces the top-k sum, the
        residual add and the norm's five launches.
    qk_norm_rope_kv: Qwen3's attention input from the fused q/k/v projection:
        per-head RMSNorm of q and k, rotary (halves layout) on both, q out,
        k and v written into the paged cache. Replaces ~16 launches a layer.

RMSNorm as the torch layer computes it (tidal.layers.norm): in float32,
rounded to the model dtype, then times the weight (rounded again).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tidal.kernels.kv_store import cache_value, is_fp8
from tidal.kernels.pdl import pdl_enter, pdl_on


@triton.jit
def _add_rms_norm_kernel(
    X, Parts, W, XOut, HOut,
    dim, stride_x, stride_p, stride_pj, stride_xo, stride_h, eps,
    K: tl.constexpr, ADD: tl.constexpr, NORM: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr,
):
    pdl_enter(PDL)
    t = tl.program_id(0).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    dm = d < dim
    dtype = HOut.dtype.element_ty
    x = tl.load(X + t * stride_x + d, mask=dm, other=0.0)
    if ADD:
        s = tl.zeros([BLOCK_D], tl.float32)
        for j in tl.static_range(K):
            s += tl.load(Parts + t * stride_p + j * stride_pj + d, mask=dm, other=0.0).to(tl.float32)
        x = (x.to(tl.float32) + s.to(dtype).to(tl.float32)).to(dtype)
        tl.store(XOut + t * stride_xo + d, x, mask=dm)
    if NORM:
        xf = x.to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / dim + eps)
        n = (xf * rstd).to(dtype).to(tl.float32)
        w = tl.load(W + d, mask=dm, other=0.0).to(tl.float32)
        tl.store(HOut + t * stride_h + d, (w * n).to(dtype), mask=dm)


def add_rms_norm(x: torch.Tensor, parts: torch.Tensor | None, weight: torch.Tensor | None, eps: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x [T, D]; parts [T, k, D] or None (nothing added); weight [D] or None
    (no norm) -> (x + sum of parts [T, D], RMSNorm of it [T, D] or None)."""
    tokens, dim = x.shape
    add, norm = parts is not None, weight is not None
    x_out = torch.empty_like(x) if add else x
    h = torch.empty_like(x) if norm else None
    if tokens == 0 or not (add or norm):
        return x_out, h
    p = parts if add else x[:, None, :]
    assert x.stride(1) == p.stride(2) == 1
    block = triton.next_power_of_2(dim)
    hout = h if h is not None else x_out
    pdl = pdl_on(x.device)
    _add_rms_norm_kernel[(tokens,)](
        x, p, weight if norm else x, x_out, hout,
        dim, x.stride(0), p.stride(0), p.stride(1), x_out.stride(0), hout.stride(0), eps,
        K=p.shape[1], ADD=add, NORM=norm, BLOCK_D=block, PDL=pdl,
        num_warps=4 if block >= 1024 else 1, launch_pdl=pdl,
    )
    return x_out, h


@triton.jit
def _qk_norm_rope_kv_kernel(
    QKV, QW, KW, Cos, Sin, Loc, QOut, KCache, VCache,
    stride_qkv, stride_cs, stride_qo_t, stride_qo_h, stride_ks, stride_kh, stride_vs, stride_vh, eps,
    H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, HALF: tl.constexpr, FP8: tl.constexpr, PDL: tl.constexpr,
):
    pdl_enter(PDL)
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)  # q heads, then k heads, then v heads
    dtype = QOut.dtype.element_ty
    d = tl.arange(0, HALF)
    row = QKV + t * stride_qkv + h * D
    re = tl.load(row + d).to(tl.float32)
    im = tl.load(row + HALF + d).to(tl.float32)
    slot = tl.load(Loc + t).to(tl.int64)
    if h >= H + HKV:  # a v head: copied into the cache
        hv = h - H - HKV
        tl.store(VCache + slot * stride_vs + hv * stride_vh + d, cache_value(re, VCache, FP8))
        tl.store(VCache + slot * stride_vs + hv * stride_vh + HALF + d, cache_value(im, VCache, FP8))
    else:
        rstd = 1.0 / tl.sqrt((tl.sum(re * re, axis=0) + tl.sum(im * im, axis=0)) / D + eps)
        if h < H:
            w_re = tl.load(QW + d).to(tl.float32)
            w_im = tl.load(QW + HALF + d).to(tl.float32)
        else:
            w_re = tl.load(KW + d).to(tl.float32)
            w_im = tl.load(KW + HALF + d).to(tl.float32)
        re = (w_re * (re * rstd).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
        im = (w_im * (im * rstd).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
        cos = tl.load(Cos + t * stride_cs + d)
        sin = tl.load(Sin + t * stride_cs + d)
        out_re = re * cos - im * sin
        out_im = re * sin + im * cos
        if h < H:
            q_base = QOut + t * stride_qo_t + h * stride_qo_h
            tl.store(q_base + d, out_re.to(dtype))
            tl.store(q_base + HALF + d, out_im.to(dtype))
        else:  # (its own name: a float8 cache's pointer type differs from q's)
            k_base = KCache + slot * stride_ks + (h - H) * stride_kh
            # through the model's dtype, as the torch path's k reaches KVPool.write
            tl.store(k_base + d, cache_value(out_re.to(dtype).to(tl.float32), KCache, FP8))
            tl.store(k_base + HALF + d, cache_value(out_im.to(dtype).to(tl.float32), KCache, FP8))


def qk_norm_rope_kv(
    qkv: torch.Tensor,
    q_norm: torch.Tensor,
    k_norm: torch.Tensor,
    eps: float,
    cos: torch.Tensor,
    sin: torch.Tensor,
    out_cache_loc: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    n_heads: int,
) -> torch.Tensor:
    """qkv [T, (H + 2 Hkv) * D]; q_norm/k_norm [D] weights; cos/sin [T, D/2]
    float32 (each position's rotary angles); out_cache_loc [T]; k/v_cache
    [S, Hkv, D] (one layer's) -> q [T, H, D]. Writes k and v at out_cache_loc."""
    tokens = qkv.shape[0]
    n_kv, head_dim = k_cache.shape[1], k_cache.shape[2]
    assert qkv.stride(1) == 1 and cos.stride(1) == sin.stride(1) == 1 and sin.stride(0) == cos.stride(0)
    assert cos.dtype == sin.dtype == torch.float32, "rotary angles in float32"
    assert qkv.shape[1] == (n_heads + 2 * n_kv) * head_dim and head_dim & (head_dim - 1) == 0
    q = torch.empty((tokens, n_heads, head_dim), dtype=qkv.dtype, device=qkv.device)
    if tokens == 0:
        return q
    pdl = pdl_on(qkv.device)
    _qk_norm_rope_kv_kernel[(tokens, n_heads + 2 * n_kv)](
        qkv, q_norm, k_norm, cos, sin, out_cache_loc, q, k_cache, v_cache,
        qkv.stride(0), cos.stride(0), q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1), eps,
        H=n_heads, HKV=n_kv, D=head_dim, HALF=head_dim // 2, FP8=is_fp8(k_cache), PDL=pdl,
        num_warps=1, launch_pdl=pdl,
    )
    return q
