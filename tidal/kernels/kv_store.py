"""Values into and out of the KV cache inside a kernel. The cache holds the
model's dtype, or with EngineConfig.kv_dtype="fp8" float8 e4m3 (no scale:
values beyond its finite range, +-448, are clamped to it first, as
KVPool.write does on the torch path, so both paths store the same bits); the
attention kernels read a float8 cache through float16 products."""

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


# -- reading a float8 cache --------------------------------------------------------

# Over a float8 cache with bf16 queries, the grouped decode kernel's and the
# extend kernel's products take float16 operands (see their F16). Compiled
# for sm_90 a loop converts 3x fewer values a tile (64 e4m3x2 -> f16x2
# conversions a thread instead of those plus 128 f16 -> bf16).
# bench_kernels attention-large, H200 (895380d), Qwen3-VL-8B batch 128 at
# 1000 keys: 119.4 us against 132.3 with bf16 operands.
FP8_F16_PRODUCTS = True


def f16_products(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """Whether the attention kernels take float16 product operands (their F16):
    a float8 cache under 16-bit queries, with FP8_F16_PRODUCTS on."""
    return FP8_F16_PRODUCTS and is_fp8(k_cache) and q.dtype != torch.float32


@triton.jit
def f16_operand(q):
    """Queries as float16 product operands beside a float8 cache (the attention
    kernels' F16): clamped to float16's range, where a bf16 query past it
    would turn inf; bf16 -> f16 is exact from f16's smallest normal (6e-5) up."""
    return tl.clamp(q.to(tl.float32), -65504.0, 65504.0).to(tl.float16)


@triton.jit
def key_scores(q, K, slot, kvh, stride_ks, stride_kh, mask, D: tl.constexpr, OP_TY: tl.constexpr, IEEE: tl.constexpr):
    """q [M, D] (in OP_TY) times the keys of KV head kvh at `slot` [N] (masked
    rows read as 0), read from the cache and upcast to OP_TY -> [M, N]
    float32 products, unscaled. The grouped decode and the extend kernels'
    first product."""
    d = tl.arange(0, D)
    k = tl.load(K + slot[:, None] * stride_ks + kvh * stride_kh + d[None, :], mask=mask[:, None], other=0.0).to(OP_TY)  # (a float8 cache: upcast)
    if IEEE:
        sc = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        sc = tl.dot(q, tl.trans(k))
    return sc
