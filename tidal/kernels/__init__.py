"""Triton kernels for the CUDA fast path. Each has a torch reference that its
test compares with (tests/test_kernels.py, on a GPU or under Triton's CPU
interpreter)."""

from __future__ import annotations

import functools

import torch


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


_SCRATCH: dict[tuple[str, torch.dtype, torch.device], torch.Tensor] = {}
_RETIRED: list[torch.Tensor] = []  # outgrown scratch: graphs captured earlier still point at it


def scratch_zeros(name: str, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zeroed buffer of at least numel elements (at least 65,536), one per
    (name, dtype, device), kept for the process: kernels that count tickets
    across programs put their counters back to zero after each launch, so it
    can be captured in CUDA graphs. Made (or grown) outside graph capture; a
    grown buffer's predecessor is kept alive, not freed."""
    key = (name, dtype, device)
    buf = _SCRATCH.get(key)
    if buf is None or buf.numel() < numel:
        assert not (device.type == "cuda" and torch.cuda.is_current_stream_capturing()), f"the {name} scratch must exist before a graph is captured"
        if buf is not None:
            _RETIRED.append(buf)
        buf = _SCRATCH[key] = torch.zeros(max(numel, 1 << 16), dtype=dtype, device=device)
    return buf
