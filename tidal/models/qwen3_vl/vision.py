"""Qwen3-VL's vision tower: patches -> merged image tokens and deepstack features.

Per image (grid t x h x w patches, in the processor's merge-window order):
a linear patch embedding (the checkpoint's Conv3d, whose kernel equals its
stride), plus learned position embeddings resampled bilinearly (corners
aligned) from their square grid to h x w; blocks of pre-LN attention (full
within each image, 2-D rotary: half the rotated pairs turn with the patch
row, half with its column; a video attends frame by frame) and a GELU-tanh MLP; after the blocks listed in
deepstack_visual_indexes, a merger of each 2x2 window (LayerNorm after the
shuffle) gives a deepstack feature; the final merger (LayerNorm before)
gives the tokens the decoder reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import groupby
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from tidal.layers.linear import linear_gelu_tanh
from tidal.layers.rotary import rotate_halves


@dataclass(frozen=True)
class VisionConfig:
    depth: int = 27
    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 16
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    out_hidden_size: int = 3584
    num_position_embeddings: int = 2304
    deepstack_visual_indexes: tuple[int, ...] = (8, 16, 24)
    rope_theta: float = 10000.0

    @classmethod
    def from_hf(cls, raw: dict[str, Any]) -> VisionConfig:
        rope = raw.get("rope_parameters") or {}
        return cls(
            **{k: raw[k] for k in ("depth", "hidden_size", "intermediate_size", "num_heads", "in_channels", "patch_size", "temporal_patch_size", "spatial_merge_size", "out_hidden_size", "num_position_embeddings") if k in raw},
            deepstack_visual_indexes=tuple(raw.get("deepstack_visual_indexes", cls.deepstack_visual_indexes)),
            rope_theta=float(rope.get("rope_theta", raw.get("rope_theta", cls.rope_theta))),
        )


class PatchEmbed(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        k = (cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        self.proj = nn.Conv3d(cfg.in_channels, cfg.hidden_size, kernel_size=k, stride=k, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, C * T * P * P] -> [N, hidden] (one kernel position per patch: a matmul)."""
        w = self.proj.weight
        return F.linear(x.to(w.dtype), w.reshape(w.shape[0], -1), self.proj.bias)


class Attention(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.heads = cfg.num_heads
        self.kernels = False  # the Triton rotary (VisionModel.use_kernels)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        n, dim = x.shape
        qkv = self.qkv(x).view(n, 3, self.heads, dim // self.heads)
        rotate = rotate_halves
        if self.kernels:
            from tidal.kernels.rope import rope_halves as rotate
        qk = rotate(qkv[:, :2].reshape(n, 2 * self.heads, -1), cos, sin).view(n, 2, self.heads, -1)  # q and k in one pass
        q, k, v = qk[:, 0], qk[:, 1], qkv[:, 2]
        out = torch.empty_like(q)
        start = 0
        for length, count in _runs(lengths):  # attention stays within each image (video frame)
            # a run of equal-length images (a video's frames, same-size images) in one batched call
            s = slice(start, start + length * count)
            view = lambda t: t[s].view(count, length, self.heads, -1).transpose(1, 2)  # noqa: E731  [count, heads, length, head_dim]
            o = F.scaled_dot_product_attention(view(q), view(k), view(v))
            out[s] = o.transpose(1, 2).reshape(count * length, self.heads, -1)
            start += length * count
        return self.proj(out.reshape(n, dim))


def _runs(lengths: list[int]) -> list[tuple[int, int]]:
    """Consecutive equal lengths as (length, count): [4, 4, 9, 4] -> [(4, 2), (9, 1), (4, 1)]."""
    return [(length, len(list(run))) for length, run in groupby(lengths)]


class MLP(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.linear_fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.linear_fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.gelu_epilogue = False  # VisionModel.use_kernels, on CUDA (linear_gelu_tanh)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fc1 = self.linear_fc1
        return self.linear_fc2(linear_gelu_tanh(x, fc1.weight, fc1.bias, self.gelu_epilogue))


class Block(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=1e-6)
        self.attn = Attention(cfg)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=1e-6)
        self.mlp = MLP(cfg)


class Merger(nn.Module):
    """Each 2x2 (merge x merge) window of patches -> one token of out_hidden_size."""

    def __init__(self, cfg: VisionConfig, norm_after_shuffle: bool) -> None:
        super().__init__()
        width = cfg.hidden_size * cfg.spatial_merge_size**2
        self.norm = nn.LayerNorm(width if norm_after_shuffle else cfg.hidden_size, eps=1e-6)
        self.linear_fc1 = nn.Linear(width, width)
        self.linear_fc2 = nn.Linear(width, cfg.out_hidden_size)
        self.width, self.norm_after_shuffle = width, norm_after_shuffle

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x.reshape(-1, self.width)) if self.norm_after_shuffle else self.norm(x).reshape(-1, self.width)
        return self.linear_fc2(F.gelu(self.linear_fc1(x)))


class VisionModel(nn.Module):
    """Parameter names follow the checkpoint's (under `model.visual.`)."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.pos_embed = nn.Embedding(cfg.num_position_embeddings, cfg.hidden_size)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.merger = Merger(cfg, norm_after_shuffle=False)
        self.deepstack_merger_list = nn.ModuleList(Merger(cfg, norm_after_shuffle=True) for _ in cfg.deepstack_visual_indexes)
        # per grid (h, w): its resampled position embeddings and rotary cos/sin;
        # images of one size recur (the resample alone took 1.6 ms an image on the H100)
        self._grid_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.fused_norms = False  # residual adds with their LayerNorms in one kernel (use_kernels, CUDA)

    def forward(self, patches: torch.Tensor, grids: list[tuple[int, int, int]]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """patches [N, C*T*P*P] of the images (or videos) with grids (t, h, w),
        concatenated -> (tokens [N / m^2, out], deepstack features: each [N / m^2, out])."""
        x = self.patch_embed(patches)
        x = x + self._positions(grids).to(x.dtype)
        cos, sin = self._rotary(grids)
        lengths = [h * w for t, h, w in grids for _ in range(t)]  # attention within each frame
        deep = []
        if self.fused_norms:
            from tidal.kernels.residual_norm import residual_norm

            h = self.blocks[0].norm1(x)
        for i, block in enumerate(self.blocks):
            if self.fused_norms:  # the same sums and norms, two passes over the activations fewer a block
                x, h = residual_norm(x, block.attn(h, cos, sin, lengths), None, block.norm2)
                x, h = residual_norm(x, block.mlp(h), None, self.blocks[i + 1].norm1 if i + 1 < len(self.blocks) else None)
            else:
                x = x + block.attn(block.norm1(x), cos, sin, lengths)
                x = x + block.mlp(block.norm2(x))
            if i in self.cfg.deepstack_visual_indexes:
                deep.append(self.deepstack_merger_list[self.cfg.deepstack_visual_indexes.index(i)](x))
        return self.merger(x), deep

    def _merge_order(self, grid: torch.Tensor) -> torch.Tensor:
        """[h, w, ...] -> [h * w, ...] in merge-window order (the processor's patch order)."""
        m = self.cfg.spatial_merge_size
        h, w = grid.shape[:2]
        return grid.reshape(h // m, m, w // m, m, *grid.shape[2:]).transpose(1, 2).reshape(h * w, *grid.shape[2:])

    def _positions(self, grids: list[tuple[int, int, int]]) -> torch.Tensor:
        """Learned position embeddings, bilinearly resampled (corners aligned) to each grid: [N, C] float32."""
        return torch.cat([self._grid_tables(h, w)[0].repeat(t, 1) for t, h, w in grids])

    def _rotary(self, grids: list[tuple[int, int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [N, head_dim / 2]: the first half of the angles from the patch row, the second from its column."""
        tables = [self._grid_tables(h, w) for _, h, w in grids]
        cos = torch.cat([c.repeat(t, 1) for (t, _, _), (_, c, _) in zip(grids, tables)])
        sin = torch.cat([s.repeat(t, 1) for (t, _, _), (_, _, s) in zip(grids, tables)])
        return cos, sin

    def _grid_tables(self, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One frame of an (h, w) patch grid, in merge-window order: position
        embeddings [h*w, C] float32, rotary cos and sin [h*w, head_dim / 2].
        Cached per grid; the key holds the table's storage and version, so new
        weights (loaded or edited in place) are resampled afresh (an inference
        tensor has no version: loading clears the cache, clear_grid_cache)."""
        weight = self.pos_embed.weight
        key = (h, w, weight.device, weight.data_ptr(), -1 if weight.is_inference() else weight._version)
        hit = self._grid_cache.get(key)
        if hit is not None:
            return hit
        side = int(self.cfg.num_position_embeddings**0.5)
        table = weight.float().reshape(side, side, -1).permute(2, 0, 1)[None]  # [1, C, side, side]
        grid = F.interpolate(table, size=(h, w), mode="bilinear", align_corners=True)[0].permute(1, 2, 0)  # [h, w, C]
        device = weight.device
        head_dim = self.cfg.hidden_size // self.cfg.num_heads
        spatial = head_dim // 2
        inv_freq = 1.0 / (self.cfg.rope_theta ** (torch.arange(0, spatial, 2, dtype=torch.float32, device=device) / spatial))
        rows = torch.arange(h, device=device)[:, None].expand(h, w)
        cols = torch.arange(w, device=device)[None, :].expand(h, w)
        pos = self._merge_order(torch.stack([rows, cols], dim=-1)).float()  # [h*w, 2]
        angles = torch.cat([pos[:, :1] * inv_freq, pos[:, 1:] * inv_freq], dim=-1)
        if len(self._grid_cache) >= 64:  # a bound: many sizes seen once each
            self._grid_cache.clear()
        hit = self._grid_cache[key] = (self._merge_order(grid), angles.cos(), angles.sin())
        return hit

    def use_kernels(self, enabled: bool) -> None:
        """Rotary through the Triton kernel (tidal.kernels.rope); on CUDA also
        each residual add with the LayerNorm after it (tidal.kernels.residual_norm:
        the CPU interpreter would run a program per patch) and the MLPs' GELU
        in their first product's epilogue; the rest stays torch."""
        cuda = enabled and self.pos_embed.weight.device.type == "cuda"
        for block in self.blocks:
            block.attn.kernels = enabled
            block.mlp.gelu_epilogue = cuda
        self.fused_norms = cuda

    def clear_grid_cache(self) -> None:
        """Forget the per-grid tables (the loader calls it after writing weights)."""
        self._grid_cache.clear()
