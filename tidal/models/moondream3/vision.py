"""Moondream 3 vision encoder (SigLIP-style ViT) and its projection into the text model."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from tidal.kernels import triton_available
from tidal.layers.linear import linear, linear_gelu_tanh

from .config import VisionConfig
from .processor import stitch_crops

if triton_available():
    from tidal.kernels.residual_norm import residual_norm


class MLP(nn.Module):
    """fc1 -> GELU (tanh approximation) -> fc2."""

    def __init__(self, dim: int, inner: int, out: int | None = None) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, inner)
        self.fc2 = nn.Linear(inner, out or dim)
        self.gelu_epilogue = False  # the vision encoder's fast path on CUDA (linear_gelu_tanh)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(linear_gelu_tanh(x, self.fc1.weight, self.fc1.bias, self.gelu_epilogue), self.fc2.weight, self.fc2.bias)


class VisionAttention(nn.Module):
    def __init__(self, dim: int, n_heads: int) -> None:
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.n_heads = n_heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, N, C] -> [B, N, C], full (unmasked) attention within each crop."""
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.n_heads, c // self.n_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.enc_dim)
        self.attn = VisionAttention(cfg.enc_dim, cfg.enc_n_heads)
        self.ln2 = nn.LayerNorm(cfg.enc_dim)
        self.mlp = MLP(cfg.enc_dim, cfg.enc_ff_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class VisionModel(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        patch_dim = cfg.in_channels * cfg.enc_patch_size**2
        self.patch_emb = nn.Linear(patch_dim, cfg.enc_dim)
        self.pos_emb = nn.Parameter(torch.empty(1, cfg.n_image_tokens, cfg.enc_dim))
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.enc_n_layers))
        self.post_ln = nn.LayerNorm(cfg.enc_dim)
        self.proj_mlp = MLP(2 * cfg.enc_dim, cfg.proj_inner_dim, cfg.proj_out_dim)
        self.fused_norms = False  # see use_kernels

    def use_kernels(self, enabled: bool) -> None:
        """The fast path (the model turns it on on CUDA only: the CPU
        interpreter runs a program per patch): each residual add with the
        LayerNorm after it in one kernel, the MLPs' GELU in their first
        product's epilogue."""
        self.fused_norms = enabled
        for mlp in [b.mlp for b in self.blocks] + [self.proj_mlp]:
            mlp.gelu_epilogue = enabled

    def encode_crops(self, crops: torch.Tensor) -> torch.Tensor:
        """crops [N, 3, S, S] in [-1, 1] -> patch features [N, grid*grid, enc_dim]."""
        n, c, h, w = crops.shape
        p = self.cfg.enc_patch_size
        x = crops.reshape(n, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
        x = self.patch_emb(x.reshape(n, (h // p) * (w // p), c * p * p)) + self.pos_emb
        if self.fused_norms:
            return self._fused_blocks(x)
        for block in self.blocks:
            x = block(x)
        return self.post_ln(x)

    def _fused_blocks(self, x: torch.Tensor) -> torch.Tensor:
        """The blocks and post_ln with each residual add and the LayerNorm
        after it in one kernel (tidal.kernels.residual_norm): the same sums
        and norms as VisionBlock.forward, two passes over the activations
        fewer per block. x [N, P, C] -> post_ln output [N, P, C]."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        h = self.blocks[0].ln1(x)
        for i, block in enumerate(self.blocks):
            x, h = residual_norm(x, block.attn(h.view(shape)).reshape(x.shape), None, block.ln2)
            following = self.blocks[i + 1].ln1 if i + 1 < len(self.blocks) else self.post_ln
            x, h = residual_norm(x, block.mlp(h), None, following)
        return h.view(shape)

    def project(self, features: torch.Tensor, tiling: tuple[int, int]) -> torch.Tensor:
        """Features of [global, *local] crops [N, grid*grid, C] -> image embeddings [grid*grid, proj_out].

        Local features are stitched into one grid, average-pooled back to
        grid x grid, and concatenated with the global crop's features.
        """
        g, c = self.cfg.grid, self.cfg.enc_dim
        local = features[1:].reshape(-1, g, g, c)
        stitched = stitch_crops(local, tiling, self.cfg.overlap_margin)
        pooled = F.adaptive_avg_pool2d(stitched.permute(2, 0, 1), (g, g)).permute(1, 2, 0).reshape(g * g, c)
        return self.proj_mlp(torch.cat([features[0], pooled], dim=-1))
