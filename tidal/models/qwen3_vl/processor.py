"""Qwen3-VL's image processor, value for value: smart resize (both sides
multiples of patch x merge, pixel count within [min, max]) with Pillow's
bicubic filter, rescale by 1/255 (in float64, then float32), normalize in
float32, and patches flattened as the vision tower reads them.

Runs on any torch device (the resize is tidal.resample's exact Pillow port),
equal to transformers' Qwen2VLImageProcessorPil on the same image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tidal.errors import CheckpointError, ImageError
from tidal.models.checkpoint import read_json
from tidal.resample import resize_like_pillow

_FILTERS = {2: "bilinear", 3: "bicubic", 1: "lanczos"}  # PIL's resample codes


@dataclass(frozen=True)
class ImageProcessorConfig:
    patch_size: int = 16
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 65536
    max_pixels: int = 16777216
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    rescale_factor: float = 1 / 255
    resample: str = "bicubic"

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ImageProcessorConfig:
        size = raw.get("size") or {}
        resample = int(raw.get("resample", 3))
        if resample not in _FILTERS:
            raise CheckpointError(f"preprocessor_config.json: resample {resample} is not supported (bicubic 3, bilinear 2, lanczos 1)")
        return cls(
            patch_size=int(raw.get("patch_size", cls.patch_size)),
            temporal_patch_size=int(raw.get("temporal_patch_size", cls.temporal_patch_size)),
            merge_size=int(raw.get("merge_size", cls.merge_size)),
            min_pixels=int(raw.get("min_pixels") or size.get("shortest_edge") or cls.min_pixels),
            max_pixels=int(raw.get("max_pixels") or size.get("longest_edge") or cls.max_pixels),
            image_mean=tuple(float(v) for v in raw.get("image_mean", cls.image_mean)),
            image_std=tuple(float(v) for v in raw.get("image_std", cls.image_std)),
            rescale_factor=float(raw.get("rescale_factor", cls.rescale_factor)),
            resample=_FILTERS[resample],
        )

    @classmethod
    def from_folder(cls, folder: Path) -> ImageProcessorConfig:
        return cls.from_dict(read_json(folder, "preprocessor_config.json"))


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """The size an image is resized to: sides multiples of `factor`, nearest
    the original (Python's round: halves to even), scaled down to at most
    max_pixels or up to at least min_pixels keeping the aspect ratio."""
    if max(height, width) / min(height, width) > 200:
        raise ImageError(f"the image is {width}x{height}: an aspect ratio over 200 is not accepted")
    h = round(height / factor) * factor
    w = round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def process_image(pixels: torch.Tensor, cfg: ImageProcessorConfig) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """pixels: uint8 [H, W, 3] on any device -> (patches float32
    [grid_h * grid_w, 3 * T * P * P], grid (1, grid_h, grid_w)).

    Rows run over merge windows (grid_h / m, grid_w / m) and within each over
    (m, m); columns over (channel, temporal copy, patch row, patch column).
    """
    p, m, t = cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size
    height, width = smart_resize(int(pixels.shape[0]), int(pixels.shape[1]), p * m, cfg.min_pixels, cfg.max_pixels)
    resized = resize_like_pillow(pixels, (width, height), cfg.resample)
    x = (resized.permute(2, 0, 1).to(torch.float64) * cfg.rescale_factor).to(torch.float32)  # [3, H, W]
    mean = torch.tensor(cfg.image_mean, dtype=torch.float32, device=x.device)[:, None, None]
    std = torch.tensor(cfg.image_std, dtype=torch.float32, device=x.device)[:, None, None]
    x = (x - mean) / std
    gh, gw = height // p, width // p
    x = x.reshape(3, gh // m, m, p, gw // m, m, p).permute(1, 4, 2, 5, 0, 3, 6)  # [gh/m, gw/m, m, m, 3, p, p]
    x = x[:, :, :, :, :, None].expand(-1, -1, -1, -1, -1, t, -1, -1)  # an image is T copies of one frame
    return x.reshape(gh * gw, 3 * t * p * p), (1, gh, gw)
