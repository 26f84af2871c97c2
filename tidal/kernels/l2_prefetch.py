"""Prefetching a program's weight slice into L2 (sm_90's bulk prefetch).

A decode step is a chain of short memory-bound kernels, and each pays a
ramp: its programs start, issue their first loads and wait a DRAM latency
before the pipeline fills, while the kernel before it drains. With
programmatic dependent launch (tidal.kernels.pdl) a kernel's programs are
placed during its predecessor's tail; a program that asks the copy engine
for its whole weight slice there (`cp.async.bulk.prefetch.L2`, one
instruction from one thread) has DRAM streaming its bytes into L2 while it
waits, and its own loads then hit L2. The prefetch is a hint: it changes no
value, only where the bytes come from.

Only kernels whose weights fit well inside L2 take it (PREFETCH_MAX_BYTES for
the whole launch): a larger weight, prefetched by every resident program at
once, would evict its own lines before they are read. Off until timed on the
device (`device_run.sh pdl-check`); under Triton's CPU interpreter it is
always off (inline PTX does not run there).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tidal.kernels.pdl import available

L2_PREFETCH = False
# A launch's weight bytes at most this many for its programs to prefetch them:
# half an H100's 50 MiB L2, leaving room for the predecessor's working set.
PREFETCH_MAX_BYTES = 24 << 20


@triton.jit
def l2_prefetch(ptr, nbytes):
    """Ask the copy engine to bring nbytes (a multiple of 16; ptr 16-byte
    aligned) at ptr into L2. One thread of the program issues it; nothing
    waits for it."""
    tl.inline_asm_elementwise(
        "{ .reg .pred first; .reg .u32 tid; mov.u32 tid, %tid.x; setp.eq.u32 first, tid, 0; "
        "@first cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0; }",
        "=r,l,r",
        [ptr, nbytes],
        dtype=tl.int32,
        is_pure=False,
        pack=1,
    )


@triton.jit
def row_block_span(pid, rows, row_elems, stride, BLOCK: tl.constexpr, ITEM: tl.constexpr):
    """Where rows [pid * BLOCK, min(pid * BLOCK + BLOCK, rows)) of a
    row-major weight lie: (element offset of the first, byte count), rows of
    row_elems elements of ITEM bytes, `stride` elements apart (contiguous
    when stride == row_elems, as prefetch_fits requires)."""
    here = tl.minimum(rows - pid * BLOCK, BLOCK)
    return (pid * BLOCK).to(tl.int64) * stride, here * row_elems * ITEM


def prefetch_fits(weight: torch.Tensor) -> bool:
    """Whether a launch reading all of `weight` (contiguous rows of 16-byte
    multiples) may prefetch it: L2_PREFETCH on, an sm_90+ GPU, and the
    weight within PREFETCH_MAX_BYTES."""
    row_bytes = weight.shape[-1] * weight.element_size()
    return (
        L2_PREFETCH
        and available(weight.device)
        and weight.is_contiguous()
        and row_bytes % 16 == 0
        and weight.data_ptr() % 16 == 0
        and weight.numel() * weight.element_size() <= PREFETCH_MAX_BYTES
    )
