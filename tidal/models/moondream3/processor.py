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

from tidal.resample import resize_like_pillow

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


@dataclass(frozen=True)
class CropPlan:
    """Where an image's local crops come from: the image is resized to
    (height, width) and cut every `window` pixels into `tiling` crops."""

    tiling: tuple[int, int]
    height: int
    width: int
    window: int


def crop_plan(height: int, width: int, config: VisionConfig) -> CropPlan:
    """The local-crop layout for an image of `height` x `width` pixels."""
    size, patch, margin = config.crop_size, config.enc_patch_size, config.overlap_margin
    margin_px = patch * margin
    window = (size // patch - 2 * margin) * patch  # usable pixels per local crop
    tiling = select_tiling(height - 2 * margin_px, width - 2 * margin_px, window, config.max_crops)
    return CropPlan(tiling, tiling[0] * window + 2 * margin_px, tiling[1] * window + 2 * margin_px, window)


def overlap_crops(image: Image.Image, config: VisionConfig) -> Crops:
    """Cut an RGB image into the global crop plus overlapping local crops (Pillow, on the CPU)."""
    rgb = np.asarray(image.convert("RGB"))
    size = config.crop_size
    plan = crop_plan(rgb.shape[0], rgb.shape[1], config)
    pil = Image.fromarray(rgb)
    resized = np.asarray(pil.resize((plan.width, plan.height), Image.Resampling.LANCZOS))
    crops = np.zeros((plan.tiling[0] * plan.tiling[1] + 1, size, size, 3), dtype=np.uint8)
    crops[0] = np.asarray(pil.resize((size, size), Image.Resampling.LANCZOS))
    for idx, (y0, x0) in enumerate(_crop_origins(plan)):
        region = resized[y0 : y0 + size, x0 : x0 + size]
        crops[1 + idx, : region.shape[0], : region.shape[1]] = region
    return Crops(pixels=crops, tiling=plan.tiling)


def overlap_crops_tensor(pixels: torch.Tensor, config: VisionConfig) -> tuple[torch.Tensor, tuple[int, int]]:
    """overlap_crops on any torch device, equal to it pixel for pixel.

    pixels: uint8 [H, W, 3]. -> (uint8 crops [n_crops, crop, crop, 3] on the
    same device, global crop first; tiling (rows, cols)).
    """
    size = config.crop_size
    plan = crop_plan(int(pixels.shape[0]), int(pixels.shape[1]), config)
    resized = resize_like_pillow(pixels, (plan.width, plan.height))
    crops = pixels.new_zeros((plan.tiling[0] * plan.tiling[1] + 1, size, size, 3))
    crops[0] = resize_like_pillow(pixels, (size, size))
    for idx, (y0, x0) in enumerate(_crop_origins(plan)):
        region = resized[y0 : y0 + size, x0 : x0 + size]
        crops[1 + idx, : region.shape[0], : region.shape[1]] = region
    return crops, plan.tiling


def _crop_origins(plan: CropPlan) -> list[tuple[int, int]]:
    return [(i * plan.window, j * plan.window) for i in range(plan.tiling[0]) for j in range(plan.tiling[1])]


def crops_to_tensor(crops: Crops, device: torch.device | str, dtype: torch.dtype) -> torch.Tensor:
    """uint8 crops -> normalized [n_crops, 3, crop, crop] in [-1, 1], then `dtype`.

    The normalization runs in bfloat16 arithmetic on the CPU whatever the run
    dtype and device, as the authors' reference does; its rounding is part of
    the reference results.
    """
    x = torch.from_numpy(np.ascontiguousarray(crops.pixels.transpose(0, 3, 1, 2)))
    return _normalize_on_cpu(x).to(device=device, dtype=dtype)


def _normalize_on_cpu(x: torch.Tensor) -> torch.Tensor:
    # On the CPU, where the reference ran: CUDA rounds bf16 division differently.
    return x.to(dtype=torch.bfloat16).div_(255.0).sub_(0.5).div_(0.5)


_LUTS: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def normalize_crops(crops: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """crops_to_tensor for uint8 crops already on their device.

    crops: uint8 [n, crop, crop, 3] -> [n, 3, crop, crop] in [-1, 1], `dtype`.
    Each value is looked up in a 256-entry table computed with crops_to_tensor's
    own CPU arithmetic, so the results are identical on any device.
    """
    key = (crops.device, dtype)
    lut = _LUTS.get(key)
    if lut is None:
        lut = _LUTS[key] = _normalize_on_cpu(torch.arange(256, dtype=torch.uint8)).to(device=crops.device, dtype=dtype)
    return lut[crops.permute(0, 3, 1, 2).long()]


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
