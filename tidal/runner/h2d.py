"""Host-to-device copies that do not wait for the GPU.

A plain torch.tensor(list, device="cuda") synchronizes the stream; staging
through pinned memory and copying non-blocking keeps an engine step to its one
deliberate device-to-host read.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def h2d(values: Sequence, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    t = torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t
