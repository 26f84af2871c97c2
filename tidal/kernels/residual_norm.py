"""The end of a parallel block and the start of the next, in one pass per
position:

    mlp = sum over j of parts[t, j]          (the MoE's k weighted expert
                                              outputs, in order; k = 1 for a
                                              dense MLP)
    x = (x + attn) + mlp                     (rounded to the model dtype after
                                              each add, as the torch path does)
    h = LayerNorm(x) with the next block's weights (if there is one)

Replaces the top-k sum, two adds and a LayerNorm: four launches and three
round trips through memory per layer. Without parts (a sequential block's
residual add, as in the vision encoders) it is x + attn, then the LayerNorm.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tidal.kernels.pdl import pdl_enter, pdl_on


@triton.jit
def _residual_norm_kernel(
    X, Attn, Parts, W, B, XOut, HOut,
    dim, stride_x, stride_a, stride_p, stride_pj, stride_xo, stride_h, eps,
    K: tl.constexpr, BLOCK_D: tl.constexpr, NORM: tl.constexpr, PDL: tl.constexpr,
):
    pdl_enter(PDL)
    t = tl.program_id(0).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    dm = d < dim
    mlp = tl.zeros([BLOCK_D], tl.float32)
    for j in tl.static_range(K):
        mlp += tl.load(Parts + t * stride_p + j * stride_pj + d, mask=dm, other=0.0).to(tl.float32)
    dtype = XOut.dtype.element_ty
    mlp = mlp.to(dtype).to(tl.float32)
    x = tl.load(X + t * stride_x + d, mask=dm, other=0.0).to(tl.float32)
    a = tl.load(Attn + t * stride_a + d, mask=dm, other=0.0).to(tl.float32)
    x = ((x + a).to(dtype).to(tl.float32) + mlp).to(dtype)
    tl.store(XOut + t * stride_xo + d, x, mask=dm)
    if NORM:
        xf = tl.where(dm, x.to(tl.float32), 0.0)
        mean = tl.sum(xf, axis=0) / dim
        diff = tl.where(dm, xf - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(diff * diff, axis=0) / dim + eps)
        w = tl.load(W + d, mask=dm, other=0.0).to(tl.float32)
        b = tl.load(B + d, mask=dm, other=0.0).to(tl.float32)
        tl.store(HOut + t * stride_h + d, (diff * rstd * w + b).to(HOut.dtype.element_ty), mask=dm)


def residual_norm(x: torch.Tensor, attn: torch.Tensor, parts: torch.Tensor | None, norm: torch.nn.LayerNorm | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x, attn [T, D]; parts [T, k, D] or None (nothing more added) ->
    (new x [T, D], norm(new x) [T, D] or None)."""
    tokens, dim = x.shape
    k = parts.shape[1] if parts is not None else 0
    if parts is None:
        parts = x[:, None, :]  # never read (K = 0): any tensor with the strides the launch takes
    assert x.stride(1) == attn.stride(1) == parts.stride(2) == 1
    x_out = torch.empty_like(x)
    h = torch.empty_like(x) if norm is not None else None
    if tokens == 0:
        return x_out, h
    w = norm.weight if norm is not None else x
    b = norm.bias if norm is not None else x
    block = triton.next_power_of_2(dim)
    pdl = pdl_on(x.device)
    _residual_norm_kernel[(tokens,)](
        x, attn, parts, w, b, x_out, h if h is not None else x_out,
        dim, x.stride(0), attn.stride(0), parts.stride(0), parts.stride(1), x_out.stride(0), (h if h is not None else x_out).stride(0),
        norm.eps if norm is not None else 0.0,
        K=k, BLOCK_D=block, NORM=norm is not None, PDL=pdl,
        num_warps=4 if block >= 1024 else 1, launch_pdl=pdl,
    )
    return x_out, h
