"""Programmatic dependent launch (PDL, sm_90+) for the decode chain's kernels.

A kernel launched with PDL may have its programs placed on the GPU while the
kernel before it in the stream still runs: its launch and placement overlap
the predecessor's tail. Each such kernel begins with `pdl_enter(PDL)`: it
waits there (gdc_wait) until the predecessor has finished and its writes are
visible, then lets its own successor be placed (gdc_launch_dependents).
Nothing is read before the wait, so the results are the same bits as without
PDL; a kernel after a non-PDL one (cuBLAS, torch) simply starts after it.

Off until measured on a device (`device_run.sh pdl`: benchmarks/bench_pdl.py,
then the models' decode with it on and off). On the CPU, under Triton's
interpreter, it is always off.
"""

from __future__ import annotations

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


ENABLED = False


@lru_cache(maxsize=8)
def _sm90(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (9, 0)


def pdl_on(device: torch.device) -> bool:
    """Whether the kernels launched for `device` take PDL now (ENABLED, read
    at launch, on an sm_90+ GPU with Triton's grid-dependency ops)."""
    return ENABLED and HAS_GDC and _sm90(device)


@triton.jit
def pdl_enter(PDL: tl.constexpr):
    """A PDL kernel's first step: wait for the predecessor's writes, then let
    the successor be placed. Nothing when PDL is off."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
