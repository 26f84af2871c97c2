"""Partial rotary position embedding (the first `rotary_dim` dims of each head)."""

from __future__ import annotations

import torch


class PartialRotary:
    """Rotates dims [0, rotary_dim) of each head; the rest pass through.

    The rotated part is split in halves (real = first half, imaginary = second
    half). The authors' reference writes the rotated pairs back interleaved;
    that is a fixed permutation of the same dims applied to both q and k, so
    q.k, and therefore attention, is unchanged. We keep the halves layout.
    """

    def __init__(self, rotary_dim: int, max_positions: int, theta: float, device: torch.device | str) -> None:
        half = rotary_dim // 2
        inv_freq = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32)[:half] / rotary_dim))
        angles = torch.arange(max_positions, dtype=torch.float32)[:, None] * inv_freq[None, :]
        self.cos = angles.cos().to(device)  # [max_positions, half]
        self.sin = angles.sin().to(device)
        self.rotary_dim = rotary_dim

    def __call__(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x [T, H, D], positions [T] -> x rotated, same dtype (math in float32)."""
        half = self.rotary_dim // 2
        cos = self.cos[positions][:, None, :]
        sin = self.sin[positions][:, None, :]
        xf = x.float()
        re, im = xf[..., :half], xf[..., half : self.rotary_dim]
        out = torch.cat([re * cos - im * sin, re * sin + im * cos, xf[..., self.rotary_dim :]], dim=-1)
        return out.to(x.dtype)


def rotate_halves(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Full-dim rotary, halves layout: x [T, H, D]; cos/sin [T, D/2] float32
    (each position's angles, gathered once per step) -> x rotated, same dtype
    (math in float32)."""
    half = x.shape[-1] // 2
    xf = x.float()
    re, im = xf[..., :half], xf[..., half:]
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.cat([re * c - im * s, re * s + im * c], dim=-1).to(x.dtype)
