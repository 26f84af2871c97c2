"""Rotary embedding, halves layout, in one pass: x [T, H, D] (any row and
head strides) with per-position cos/sin [T, D/2] -> rotated [T, H, D].

The torch form (tidal.layers.rotary.rotate_halves) makes a float32 copy and
eight more float32 passes; over a Qwen3-VL-8B prefill step's 28,800 vision
patches x 32 q/k heads that was the largest share of its elementwise time
(H100 profile). Here the math is the same float32, in registers, rounded
once to x's dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rope_halves_kernel(
    X, Cos, Sin, Y,
    heads, half, stride_xt, stride_xh, stride_ct, stride_yt, stride_yh,
    BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_HALF)
    m = (h < heads)[:, None] & (d < half)[None, :]
    c = tl.load(Cos + t * stride_ct + d, mask=d < half, other=0.0)[None, :]
    s = tl.load(Sin + t * stride_ct + d, mask=d < half, other=0.0)[None, :]
    src = X + t * stride_xt + h[:, None] * stride_xh + d[None, :]
    re = tl.load(src, mask=m, other=0.0).to(tl.float32)
    im = tl.load(src + half, mask=m, other=0.0).to(tl.float32)
    dst = Y + t * stride_yt + h[:, None] * stride_yh + d[None, :]
    dtype = Y.dtype.element_ty
    tl.store(dst, (re * c - im * s).to(dtype), mask=m)
    tl.store(dst + half, (re * s + im * c).to(dtype), mask=m)


def rope_halves(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, H, D] (last dim contiguous); cos, sin [T, D/2] float32 -> [T, H, D]
    contiguous, x's dtype: the first half re*cos - im*sin, the second re*sin + im*cos."""
    tokens, heads, dim = x.shape
    half = dim // 2
    assert dim == 2 * half and x.stride(2) == 1 and cos.shape == (tokens, half) and cos.stride() == sin.stride() and cos.stride(1) == 1
    y = torch.empty((tokens, heads, dim), dtype=x.dtype, device=x.device)
    if tokens == 0:
        return y
    block_h = min(32, triton.next_power_of_2(heads))
    _rope_halves_kernel[(tokens, triton.cdiv(heads, block_h))](
        x, cos, sin, y, heads, half, x.stride(0), x.stride(1), cos.stride(0), y.stride(0), y.stride(1),
        BLOCK_H=block_h, BLOCK_HALF=triton.next_power_of_2(half), num_warps=4,
    )
    return y
