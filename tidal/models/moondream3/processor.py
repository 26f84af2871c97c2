"""Overlap-crop image processing for the Moondream 3 vision encoder.

An image becomes one global crop (the whole image resized to 378x378) plus a
grid of up to `max_crops` local crops of 378x378 cut from a resized copy. Local
crops overlap by `overlap_margin` patches on each side; after encoding, the
crops' patch features are stitched back into one grid (dropping the overlap)
and pooled to 27x27.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from .config import VisionConfig


def select_tiling(height: int, width: int, crop_size: int, max_crops: int) -> tuple[int, int]:
    """Number of (rows, cols) of local crops for an image of `height` x `width`.

    `height`/`width` are the image size minus both margins; `crop_size` is the
    usable (non-overlap) window of one crop in pixels.
    """
    if height <= crop_size or width <= crop_size:
        return (1, 1)
    min_h = math.ceil(height / crop_size)
    min_w = math.ceil(width / crop_size)
    if min_h * min_w > max_crops:
        ratio = math.sqrt(max_crops / (min_h * min_w))
        return (max(1, math.floor(min_h * ratio)), max(1, math.floor(min_w * ratio)))
    h_tiles = max(math.floor(math.sqrt(max_crops * height / width)), min_h)
    w_tiles = max(math.floor(math.sqrt(max_crops * width / height)), min_w)
    if h_tiles * w_tiles > max_crops:
        if w_tiles > h_tiles:
            w_tiles = math.floor(max_crops / h_tiles)
        else:
            h_tiles = math.floor(max_crops / w_tiles)
    return (max(1, h_tiles), max(1, w_tiles))


@dataclass(frozen=True)
class Crops:
    """Crops of one image.

    pixels: uint8 [n_crops, crop, crop, 3]; index 0 is the global crop, then
        the local crops in row-major order.
    tiling: (rows, cols) of the local crops.
    """

    pixels: np.ndarray
    tiling: tuple[int, int]

    @property
    def n_crops(self) -> int:
        return int(self.pixels.shape[0])


def overlap_crops(image: Image.Image, config: VisionConfig) -> Crops:
    """Cut an RGB image into the global crop plus overlapping local crops."""
    rgb = np.asarray(image.convert("RGB"))
    size, patch, margin = config.crop_size, config.enc_patch_size, config.overlap_margin
    margin_px = patch * margin
    window = (size // patch - 2 * margin) * patch  # usable pixels per local crop
    orig_h, orig_w = rgb.shape[:2]
    tiling = select_tiling(orig_h - 2 * margin_px, orig_w - 2 * margin_px, window, config.max_crops)

    target_h = tiling[0] * window + 2 * margin_px
    target_w = tiling[1] * window + 2 * margin_px
    pil = Image.fromarray(rgb)
    resized = np.asarray(pil.resize((target_w, target_h), Image.Resampling.LANCZOS))
    crops = np.zeros((tiling[0] * tiling[1] + 1, size, size, 3), dtype=np.uint8)
    crops[0] = np.asarray(pil.resize((size, size), Image.Resampling.LANCZOS))
    for i in range(tiling[0]):
        for j in range(tiling[1]):
            y0, x0 = i * window, j * window
            region = resized[y0 : min(y0 + size, target_h), x0 : min(x0 + size, target_w)]
            crops[1 + i * tiling[1] + j, : region.shape[0], : region.shape[1]] = region
    return Crops(pixels=crops, tiling=tiling)


def crops_to_tensor(crops: Crops, device: torch.device | str, dtype: torch.dtype) -> torch.Tensor:
    """uint8 crops -> normalized [n_crops, 3, crop, crop] in [-1, 1], then `dtype`.

    The normalization runs in bfloat16 arithmetic on the CPU whatever the run
    dtype and device, as the authors' reference does; its rounding is part of
    the reference results.
    """
    x = torch.from_numpy(np.ascontiguousarray(crops.pixels.transpose(0, 3, 1, 2)))
    # On the CPU, where the reference ran: CUDA rounds bf16 division differently.
    x = x.to(dtype=torch.bfloat16).div_(255.0).sub_(0.5).div_(0.5)
    return x.to(device=device, dtype=dtype)


def stitch_crops(local: torch.Tensor, tiling: tuple[int, int], margin: int) -> torch.Tensor:
    """Stitch local crop features into one grid, keeping each overlap once.

    local: [n_local, g, g, C] patch features of the local crops, row-major.
    margin: overlap on each side, in patches.
    Returns [rows * (g - 2m) + 2m, cols * (g - 2m) + 2m, C]. Outer crops keep
    their outer margins; inner edges drop `margin` patches from each side.
    """
    rows, cols = tiling
    g = local.shape[1]
    step = g - 2 * margin
    out = local.new_zeros(rows * step + 2 * margin, cols * step + 2 * margin, local.shape[-1])
    for idx in range(rows * cols):
        r, c = divmod(idx, cols)
        y0 = 0 if r == 0 else margin
        y1 = g if r == rows - 1 else g - margin
        x0 = 0 if c == 0 else margin
        x1 = g if c == cols - 1 else g - margin
        out[r * step + y0 : r * step + y1, c * step + x0 : c * step + x1] = local[idx, y0:y1, x0:x1]
    return out
