"""Tile helpers shared by the Triton kernels."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def tile_dot(acc, a, b, IEEE: tl.constexpr):
    """acc + a @ b: IEEE float32 where IEEE (float32 operands), else on the
    tensor cores. The one form of a tile's product, so a kernel's peeled
    first tile (PDL's early-weights form) and its loop sum alike."""
    if IEEE:
        return acc + tl.dot(a, b, input_precision="ieee")
    return acc + tl.dot(a, b)
