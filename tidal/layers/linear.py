"""The projections of the text decoders' fast path: torch's linear (cuBLAS),
or for decode-sized inputs on CUDA the Triton skinny product
(tidal.kernels.skinny_gemm) where the engine turned it on
(EngineConfig.skinny_gemm, off until benchmarks/bench_kernels.py and a decode
run on the device show it faster).

The switch is process-wide, like the kernel choice it belongs to: the last
engine made decides (an engine with kernels off turns it off). A CUDA graph
keeps the choice it was captured with.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_skinny = False


def use_skinny(enabled: bool) -> None:
    global _skinny
    _skinny = enabled


def skinny_enabled() -> bool:
    return _skinny


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, in] @ weight [out, in].T + bias -> [T, out]: F.linear, but the
    skinny kernel for at most 16 rows on CUDA while it is switched on."""
    if _skinny and x.is_cuda and x.dim() == 2 and x.stride(1) == 1 and weight.stride(1) == 1:
        from tidal.kernels.skinny_gemm import MAX_ROWS, skinny_linear

        if x.shape[0] <= MAX_ROWS:
            return skinny_linear(x, weight, bias)
    return F.linear(x, weight, bias)
