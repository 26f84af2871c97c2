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
