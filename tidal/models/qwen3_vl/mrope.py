"""Qwen3-VL's multimodal rotary positions (M-RoPE).

Each position has three rotary indices (temporal, height, width). Text
positions use the same index three times, counting on from the previous
position; an image of grid (t, h, w) patches gives its (h/m) x (w/m) merged
tokens the indices (start + frame, start + row, start + column), and the text
after it continues at start + max(h, w) / m: an image advances the rotary
index by its longer side in tokens, not by its token count (the "delta" a
cached prefix must carry).

The rotary angles interleave the three: frequency pair i rotates with the
height index when i % 3 == 1 and i < 3 * section[1], with the width index
when i % 3 == 2 and i < 3 * section[2], else with the temporal index.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

# an image in a sequence: (number of merged tokens, grid (t, h, w) in patches)
ImageSpan = tuple[int, tuple[int, int, int]]


def image_offsets(grid: tuple[int, int, int], merge: int) -> torch.Tensor:
    """[3, t * h/m * w/m] rotary offsets of an image's tokens from its start index."""
    t, h, w = grid[0], grid[1] // merge, grid[2] // merge
    tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack([tt, hh, ww]).reshape(3, -1)


def image_advance(grid: tuple[int, int, int], merge: int) -> int:
    """How far the rotary index moves past an image."""
    return max(grid[1], grid[2]) // merge


def rope_positions(segments: Sequence[int | ImageSpan], merge: int) -> torch.Tensor:
    """[3, L] rotary indices of a sequence given as text runs (an int: that
    many text tokens) and images ((tokens, grid))."""
    out, pos = [], 0
    for seg in segments:
        if isinstance(seg, int):
            out.append(torch.arange(pos, pos + seg).expand(3, -1))
            pos += seg
        else:
            n, grid = seg
            offsets = image_offsets(grid, merge)
            if offsets.shape[1] != n:
                raise ValueError(f"an image of grid {grid} has {offsets.shape[1]} tokens, not {n}")
            out.append(offsets + pos)
            pos += image_advance(grid, merge)
    return torch.cat(out, dim=1) if out else torch.zeros(3, 0, dtype=torch.long)


def mrope_angles(positions: torch.Tensor, inv_freq: torch.Tensor, section: Sequence[int]) -> torch.Tensor:
    """positions [3, L], inv_freq [D/2] -> angles [L, D/2] (float32), interleaved as above."""
    freqs = positions[..., None].float() * inv_freq.float()  # [3, L, D/2]
    idx = torch.arange(freqs.shape[-1], device=freqs.device)
    axis = torch.zeros_like(idx)  # which index each frequency pair turns with (no masked writes: no host sync)
    for a in (1, 2):
        axis = torch.where((idx % 3 == a) & (idx < 3 * section[a]), a, axis)
    return freqs.gather(0, axis.expand(1, freqs.shape[1], -1))[0]
