"""The projections of the text decoders' fast path: torch's linear (cuBLAS),
or for decode-sized inputs on CUDA the Triton skinny product
(tidal.kernels.skinny_gemm), as EngineConfig.skinny_gemm says: "auto" where
the kernel measured faster than cuBLAS (skinny_gemm.prefers_skinny), "all"
for every decode-sized product, "off" never. linear_gelu_tanh: a product and
its GELU, in the product's epilogue on CUDA when asked (the vision MLPs).

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


def linear_gelu_tanh(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, epilogue: bool = False) -> torch.Tensor:
    """gelu(x @ weight.T + bias, approximate="tanh"), x [..., in] -> [..., out].

    epilogue (CUDA): the GELU inside the product's epilogue (cuBLASLt, through
    torch._addmm_activation, whose CUDA form is the tanh one; its CPU form is
    the exact erf GELU, so never there): one pass over the output fewer, and
    GELU on the float32 accumulator before the rounding."""
    if epilogue and x.is_cuda:
        out = torch._addmm_activation(bias, x.reshape(-1, x.shape[-1]), weight.t(), use_gelu=True)
        return out.view(*x.shape[:-1], weight.shape[0])
    return F.gelu(linear(x, weight, bias), approximate="tanh")
