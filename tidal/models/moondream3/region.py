"""Moondream 3 region head: Fourier-feature encoders and linear decoders for
coordinates (1024 bins over [0, 1]) and sizes (1024 log-scale bins per axis)."""

from __future__ import annotations

import functools
import math

import torch
import torch.nn as nn

from .config import RegionConfig


def fourier_features(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """x [N, k] @ freqs [k, F] -> [N, 2F] = cat(cos(2 pi x f), sin(2 pi x f))."""
    f = (2 * math.pi * x) @ freqs
    return torch.cat([f.cos(), f.sin()], dim=-1)


def size_from_bins(bins: torch.Tensor) -> torch.Tensor:
    """Size bins (0..1023) -> sizes 2 ** (bin / 1023 * 10 - 10), in float32."""
    return torch.pow(2.0, bins.float() / 1023.0 * 10.0 - 10.0)


def coord_from_bin(b, n_bins: int = 1024):
    """A coordinate bin (int, or int tensor as float32) -> its value in [0, 1]: b / n_bins, exact in float32."""
    return b / n_bins


@functools.cache
def size_values() -> tuple[float, ...]:
    """size_from_bins of every bin, computed as the skills compute a size (a
    (width, height) pair at a time, on the CPU), so a size looked up here
    equals theirs to the last bit (pow on another device may differ in it)."""
    return tuple(size_from_bins(torch.tensor([b, b]))[0].item() for b in range(1024))


class RegionHead(nn.Module):
    def __init__(self, cfg: RegionConfig, text_dim: int, has_ln: bool = False) -> None:
        super().__init__()
        self.coord_features = nn.Parameter(torch.empty(1, cfg.coord_feat_dim // 2))
        self.coord_encoder = nn.Linear(cfg.coord_feat_dim, text_dim)
        self.coord_decoder = nn.Linear(text_dim, cfg.coord_out_dim)
        self.size_features = nn.Parameter(torch.empty(2, cfg.size_feat_dim // 2))
        self.size_encoder = nn.Linear(cfg.size_feat_dim, text_dim)
        self.size_decoder = nn.Linear(text_dim, cfg.size_out_dim)
        # The authors' engine ships a LayerNorm that the decoders read through.
        self.ln = nn.LayerNorm(text_dim) if has_ln else None

    def encode_coordinate(self, coord: torch.Tensor) -> torch.Tensor:
        """coord [N, 1] in [0, 1] -> embeddings [N, dim]."""
        return self.coord_encoder(fourier_features(coord.to(self.coord_features.dtype), self.coord_features))

    def encode_size(self, size: torch.Tensor) -> torch.Tensor:
        """size [N, 2] (width, height) -> embeddings [N, dim]."""
        return self.size_encoder(fourier_features(size.to(self.size_features.dtype), self.size_features))

    def _decoder_input(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden if self.ln is None else self.ln(hidden)

    def decode_coordinate(self, hidden: torch.Tensor) -> torch.Tensor:
        """Raw hidden states [N, dim] -> coordinate logits [N, 1024]."""
        return self.coord_decoder(self._decoder_input(hidden))

    def decode_size(self, hidden: torch.Tensor) -> torch.Tensor:
        """Raw hidden states [N, dim] -> size logits [N, 2 (w, h), 1024]."""
        return self.size_decoder(self._decoder_input(hidden)).view(hidden.shape[0], 2, -1)
