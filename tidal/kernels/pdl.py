"""Programmatic dependent launch (PDL, Hopper and later) for the decode chain.

A decode step at small batch is a chain of short kernels, each of which waits
for the one before it to finish, then for its own launch and set-up: gaps of
a microsecond or more between kernels that each run for a few. Launched with
PDL, a kernel's programs may become resident while the kernel before it on
the stream is still running; they block in `gdc_wait` until it has finished
and its writes are visible, then run at once. CUDA graphs keep these
programmatic edges when the step is captured.

The rule every kernel launched this way keeps, so that ordering stays what
the stream promised: **wait first, then let the next kernel launch**
(`pdl_enter` at the top of the kernel, before any load or store, in every
program). A kernel therefore only starts once its predecessor has passed its
own wait, i.e. once everything before the predecessor has finished.

What a kernel may do before its wait: compute indices, and read memory that
no kernel still running writes: weights, and what kernels two or more
launches back wrote (the predecessor has passed its wait, so they are done).
The weight-streaming kernels use that time to pull their slice of the
weights into L2 (`prefetch_rows`) while the predecessor finishes.

`ENABLED` is off until the device benchmark times it (bench_moondream's
`pdl` part); kernels compiled under Triton's CPU interpreter never use it.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

ENABLED = False


@functools.cache
def _hopper_or_later(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def use_pdl(device: torch.device) -> bool:
    """Whether kernels launched on `device` now use PDL (pass it as their PDL constexpr)."""
    return ENABLED and device.type == "cuda" and _hopper_or_later(device.index if device.index is not None else torch.cuda.current_device())


def launch_options(pdl: bool) -> dict[str, bool]:
    """The launch keywords that go with a kernel's PDL constexpr (none without it,
    so Triton's interpreter, which knows no such option, never sees one)."""
    return {"launch_pdl": True} if pdl else {}


@triton.jit
def pdl_enter(PDL: tl.constexpr):
    """Top of a kernel launched with PDL: wait for the kernel before it, then
    let the kernel after it launch. A no-op when PDL is off."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def _l2_prefetch(ptrs):
    tl.inline_asm_elementwise("prefetch.global.L2 [$1];\n\tmov.b32 $0, 0;", "=r,l", [ptrs], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def prefetch_rows(Base, rows, row_mask, stride, k_start, k_end, LINES: tl.constexpr = 32):
    """Ask L2 for columns [k_start, k_end) of `rows` (a 1-D block of row
    indices, masked by row_mask) of a row-major matrix at Base: one prefetch a
    128-byte line, LINES lines of every row at a time. A hint: nothing waits
    for it. Only compiled for the GPU (inline PTX), so only under PDL."""
    line = 1024 // Base.dtype.element_ty.primitive_bitwidth  # elements in 128 bytes
    kl = tl.arange(0, LINES) * line
    base_rows = Base + rows[:, None].to(tl.int64) * stride
    for k0 in range(k_start, k_end, LINES * line):
        k = k0 + kl
        mask = row_mask[:, None] & (k < k_end)[None, :]
        _l2_prefetch(tl.where(mask, base_rows + k[None, :], Base))
