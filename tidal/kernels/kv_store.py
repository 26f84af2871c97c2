"""Values into the KV cache from inside a kernel. The cache holds the model's
dtype, or with EngineConfig.kv_dtype="fp8" float8 e4m3 (no scale: values
beyond its finite range, +-448, are clamped to it first, as KVPool.write does
on the torch path, so both paths store the same bits)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

FP8_MAX = tl.constexpr(448.0)  # torch.finfo(torch.float8_e4m3fn).max (a constexpr: jit code may read no other global)


def is_fp8(cache: torch.Tensor) -> bool:
    """Whether a cache tensor holds float8 (the kernels' FP8 constexpr)."""
    return cache.dtype == torch.float8_e4m3fn


@triton.jit
def _nearest_e4m3(x):
    """x (float32, within +-448) rounded to the nearest float8 e4m3 value, ties
    to even, still float32: adding and taking away 1.5 * 2^23 steps of x's
    binade (3 fraction bits; below 2^-6 the subnormals' fixed step) leaves x
    on that step. The cast after it is then exact everywhere: Triton's CPU
    interpreter rounds float32 to float8 wrongly near a power of two (1.98 to
    1.0 instead of 2.0), the GPU's conversion does not, and both agree here."""
    bits = x.to(tl.int32, bitcast=True)
    binade = tl.maximum(((bits >> 23) & 0xFF) - 127, -6)
    step = ((binade - 3 + 127) << 23).to(tl.float32, bitcast=True)
    magic = step * 12582912.0  # 1.5 * 2^23
    r = (tl.abs(x) + magic) - magic
    return tl.where(bits < 0, r * -1.0, r)  # the sign kept, -0.0 included (compiled, -r is 0 - r: +0.0)


@triton.jit
def cache_value(x, Cache, FP8: tl.constexpr):
    """x (float32) as Cache's element type; into float8 clamped to its finite
    range and rounded to nearest (ties to even), as torch's cast rounds."""
    if FP8:
        x = _nearest_e4m3(tl.minimum(tl.maximum(x, -FP8_MAX), FP8_MAX))
    return x.to(Cache.dtype.element_ty)
