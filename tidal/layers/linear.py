"""The projections of the text decoders' fast path: torch's linear (cuBLAS),
or for decode-sized inputs on CUDA the Triton skinny product
(tidal.kernels.skinny_gemm), as EngineConfig.skinny_gemm says: "auto" where
the kernel measured faster than cuBLAS (skinny_gemm.prefers_skinny), "all"
for every decode-sized product, "off" never.

The switch is process-wide, like the kernel choice it belongs to: the last
engine made decides (an engine with kernels off turns it off). A CUDA graph
keeps the choice it was captured with.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SKINNY_MODES = ("off", "auto", "all")
_mode = "off"


def use_skinny(mode: str) -> None:
    """Set the process-wide choice: one of SKINNY_MODES."""
    global _mode
    if mode not in SKINNY_MODES:
        raise ValueError(f"skinny_gemm must be one of {', '.join(SKINNY_MODES)}, got {mode!r}")
    _mode = mode


def skinny_mode() -> str:
    return _mode


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, in] @ weight [out, in].T + bias -> [T, out]: F.linear, but the
    skinny kernel for at most 16 rows on CUDA where the switch takes it."""
    if _mode != "off" and x.is_cuda and x.dim() == 2 and x.stride(1) == 1 and weight.stride(1) == 1:
        from tidal.kernels.skinny_gemm import MAX_ROWS, prefers_skinny, skinny_linear

        if x.shape[0] <= MAX_ROWS and (_mode == "all" or prefers_skinny(*weight.shape)):
            return skinny_linear(x, weight, bias)
    return F.linear(x, weight, bias)
