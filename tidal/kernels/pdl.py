"""Programmatic dependent launch (PDL, sm_90+) for the decode chain's kernels.

A kernel launched with PDL may have its programs placed on the GPU while the
kernel before it in the stream still runs: its launch and placement overlap
the predecessor's tail. Most such kernels begin with `pdl_enter(PDL)`: they
wait there (gdc_wait) until the predecessor has finished and its writes are
visible, then let their own successor be placed (gdc_launch_dependents).
Nothing is read before the wait, so the results are the same bits as without
PDL; a kernel after a non-PDL one (cuBLAS, torch) simply starts after it.
With EARLY_WEIGHTS, two kernels whose weights never depend on their
predecessor, the skinny product and the fused router, release their
successor first and load their first weight tile before the wait (the
successor still waits for all of their writes): their weight stream starts
in the predecessor's tail. Only 16-bit weights with a small first tile take
that form (float32 tiles and an lm_head's wide ones spill registers). Without
EARLY_WEIGHTS, or outside that form, the router takes the plain form and the
skinny product launches without PDL: the configuration measured below.

On by default: measured on an H100 (2026-12-07, `device_run.sh matrix`), it
takes Qwen3-30B-A3B's batch-1 decode step from 4.03 to 3.84 ms and batch 8
from 10.98 to 10.82. Moondream 3's decode runs each block's two branches on
two streams, and there PDL cost ~1% (1.80 -> 1.81 ms at batch 1, 3.90 ->
3.94 at 8): a PDL kernel's programs, placed early and waiting, hold SMs the
other stream's branch could use. So a model can hold it off for the kernels
it launches inside `held_off` (Moondream: text.PDL_BRANCHES, which by
default holds it off on both streams). On the CPU, under Triton's interpreter, it is always off.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from functools import lru_cache

import torch
import triton
import triton.language as tl

try:  # Triton 3.3+
    from triton.language.extra.cuda.gdc import gdc_launch_dependents, gdc_wait

    HAS_GDC = True
except ImportError:  # pragma: no cover
    HAS_GDC = False

    @triton.jit
    def gdc_wait():
        pass

    @triton.jit
    def gdc_launch_dependents():
        pass


ENABLED = True
# The early-weights forms (above). Off until timed on a device
# (`device_run.sh pdl-check`): benchmarks/bench_pdl.py's chain measured the
# form at 6.73 us a 2048x2048 product against 6.93 for plain PDL (H100), but
# neither kernel has run it inside a model yet.
EARLY_WEIGHTS = False
# >0 inside held_off(): a context variable, so one engine thread's forward
# never turns PDL off for another's
_HELD_OFF: ContextVar[int] = ContextVar("tidal_pdl_held_off", default=0)


@lru_cache(maxsize=8)
def _sm90(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (9, 0)


def pdl_on(device: torch.device) -> bool:
    """Whether the kernels launched for `device` take PDL now (ENABLED, read
    at launch, outside `held_off`, on an sm_90+ GPU with Triton's
    grid-dependency ops)."""
    return ENABLED and _HELD_OFF.get() == 0 and available(device)


def available(device: torch.device) -> bool:
    """Whether kernels on `device` can take PDL at all: an sm_90+ GPU and
    Triton's grid-dependency ops."""
    return HAS_GDC and _sm90(device)


def early_weights_on(device: torch.device) -> bool:
    """Whether the skinny product and the fused router launch in the
    early-weights form (EARLY_WEIGHTS, where PDL is on)."""
    return EARLY_WEIGHTS and pdl_on(device)


@contextmanager
def held_off() -> Iterator[None]:
    """Launch without PDL inside this block (nested blocks too): for kernels
    on concurrent streams, where PDL's early-placed programs crowd the other
    stream's work."""
    token = _HELD_OFF.set(_HELD_OFF.get() + 1)
    try:
        yield
    finally:
        _HELD_OFF.reset(token)


@triton.jit
def pdl_enter(PDL: tl.constexpr):
    """A PDL kernel's first step: wait for the predecessor's writes, then let
    the successor be placed. Nothing when PDL is off."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
