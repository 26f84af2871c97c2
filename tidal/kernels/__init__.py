"""Triton kernels for the CUDA fast path. Each has a torch reference that its
test compares with (tests/test_kernels.py, on a GPU or under Triton's CPU
interpreter)."""

from __future__ import annotations

import functools


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
