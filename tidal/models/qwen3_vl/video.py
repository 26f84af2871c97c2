"""Qwen3-VL's video input, value for value with transformers'
Qwen3VLVideoProcessor (and Qwen3VLProcessor's prompt expansion):

1. frames sampled at `fps` per second of video (video_fps: the clip's own
   rate, 24 when unknown, as transformers assumes): n = int(total / video_fps
   * fps) clamped to [min_frames, max_frames] and to the frames given, at
   round(linspace(0, total - 1, n));
2. every frame resized to one size (smart resize over frames x height x
   width: sides multiples of patch x merge, the pixel budget counted over the
   frames rounded to the temporal patch) with torch's antialiased bicubic on
   uint8 (the path torchvision takes for uint8 tensors on the CPU), on the CPU;
3. padded to a multiple of the temporal patch by repeating the last frame and
   cut into groups of temporal_patch_size frames; each group is one "frame"
   of the prompt: `<{t:.1f} seconds>` (the mean time of its frames) then
   <|vision_start|> + its tokens + <|vision_end|>, inside the template's own
   vision_start/vision_end;
4. each group normalized as (x - mean * 255) / (std * 255) in float32 and
   flattened into patches like an image's, its two frames as the temporal
   patch.

The vision tower attends within a frame group, so each group is encoded on
its own (and cached by its content) with grid (1, h, w), and takes M-RoPE
indices like an image: transformers splits a video's grid per group too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from tidal.errors import InvalidRequestError
from tidal.models.checkpoint import read_json

DEFAULT_VIDEO_FPS = 24.0  # assumed for frames given without their rate (as transformers does)


@dataclass(frozen=True)
class VideoProcessorConfig:
    patch_size: int = 16
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 128 * 32 * 32  # size.shortest_edge: pixels over all frames
    max_pixels: int = 32 * 32 * 768  # size.longest_edge
    fps: float = 2.0
    min_frames: int = 4
    max_frames: int = 768
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    rescale_factor: float = 1 / 255

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> VideoProcessorConfig:
        size = raw.get("size") or {}
        d = cls()
        return cls(
            patch_size=int(raw.get("patch_size", d.patch_size)),
            temporal_patch_size=int(raw.get("temporal_patch_size", d.temporal_patch_size)),
            merge_size=int(raw.get("merge_size", d.merge_size)),
            min_pixels=int(size.get("shortest_edge") or d.min_pixels),
            max_pixels=int(size.get("longest_edge") or d.max_pixels),
            fps=float(raw.get("fps") or d.fps),
            min_frames=int(raw.get("min_frames", d.min_frames)),
            max_frames=int(raw.get("max_frames", d.max_frames)),
            image_mean=tuple(float(v) for v in raw.get("image_mean", d.image_mean)),
            image_std=tuple(float(v) for v in raw.get("image_std", d.image_std)),
            rescale_factor=float(raw.get("rescale_factor", d.rescale_factor)),
        )

    @classmethod
    def from_folder(cls, folder: Path) -> VideoProcessorConfig:
        """video_preprocessor_config.json if the checkpoint has one, else the defaults."""
        if (folder / "video_preprocessor_config.json").is_file():
            return cls.from_dict(read_json(folder, "video_preprocessor_config.json"))
        return cls()


@dataclass(frozen=True)
class FrameGroup:
    """One temporal patch of a video, resized: uint8 frames [T, h, w, 3]."""

    frames: np.ndarray


@dataclass(frozen=True)
class PreparedVideo:
    groups: list[FrameGroup]
    timestamps: list[float]  # seconds, one per group
    grid: tuple[int, int]  # patches (h, w) of every group


def sample_indices(total: int, video_fps: float, cfg: VideoProcessorConfig) -> np.ndarray:
    """Indices of the frames kept from `total` frames at video_fps."""
    n = int(total / video_fps * cfg.fps)
    n = min(max(n, cfg.min_frames), cfg.max_frames, total)
    return np.linspace(0, total - 1, n).round().astype(int)


def smart_resize_video(frames: int, height: int, width: int, cfg: VideoProcessorConfig) -> tuple[int, int]:
    """The size every frame is resized to (see the module docstring)."""
    factor, temporal = cfg.patch_size * cfg.merge_size, cfg.temporal_patch_size
    if frames < temporal:
        raise InvalidRequestError(f"a video needs at least {temporal} frames after sampling, got {frames}")
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    if max(height, width) / min(height, width) > 200:
        raise InvalidRequestError(f"the video's frames are {width}x{height}: an aspect ratio over 200 is not accepted")
    h = round(height / factor) * factor
    w = round(width / factor) * factor
    t = round(frames / temporal) * temporal
    if t * h * w > cfg.max_pixels:
        beta = math.sqrt(frames * height * width / cfg.max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif t * h * w < cfg.min_pixels:
        beta = math.sqrt(cfg.min_pixels / (frames * height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def group_timestamps(indices: list[int], video_fps: float, temporal: int) -> list[float]:
    """Each group's time: the mean of its first and last frame's (indices padded like the frames)."""
    idx = list(indices)
    if len(idx) % temporal:
        idx += [idx[-1]] * (temporal - len(idx) % temporal)
    times = [i / video_fps for i in idx]
    return [(times[i] + times[i + temporal - 1]) / 2 for i in range(0, len(times), temporal)]


def prepare_video(frames: np.ndarray, video_fps: float | None, cfg: VideoProcessorConfig) -> PreparedVideo:
    """uint8 frames [T, H, W, 3] -> sampled, resized frame groups and their times (CPU)."""
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise InvalidRequestError(f"a video is uint8 frames of shape (T, H, W, 3), got {frames.dtype} {tuple(frames.shape)}")
    fps = DEFAULT_VIDEO_FPS if video_fps is None else float(video_fps)
    if not fps > 0:
        raise InvalidRequestError(f"a video's fps must be positive, got {video_fps}")
    indices = sample_indices(frames.shape[0], fps, cfg)
    kept = torch.from_numpy(np.ascontiguousarray(frames[indices])).permute(0, 3, 1, 2)  # [n, 3, H, W]
    h, w = smart_resize_video(kept.shape[0], kept.shape[2], kept.shape[3], cfg)
    if (h, w) != tuple(kept.shape[2:]):
        kept = F.interpolate(kept, size=(h, w), mode="bicubic", antialias=True, align_corners=False)  # uint8 in, uint8 out
    tp = cfg.temporal_patch_size
    if pad := -kept.shape[0] % tp:
        kept = torch.cat([kept, kept[-1:].expand(pad, -1, -1, -1)])
    out = kept.permute(0, 2, 3, 1).contiguous().numpy()
    groups = [FrameGroup(out[i : i + tp]) for i in range(0, out.shape[0], tp)]
    return PreparedVideo(groups, group_timestamps(indices.tolist(), fps, tp), (h // cfg.patch_size, w // cfg.patch_size))


def process_frame_group(frames: torch.Tensor, cfg: VideoProcessorConfig) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """uint8 frames [T, h, w, 3] (one resized group, any device) -> (patches
    float32 [gh * gw, 3 * T * P * P], grid (1, gh, gw)), laid out as an image's
    (tidal.models.qwen3_vl.processor.process_image) with real frames as the
    temporal patch."""
    p, m = cfg.patch_size, cfg.merge_size
    t, height, width = frames.shape[0], frames.shape[1], frames.shape[2]
    x = frames.permute(0, 3, 1, 2).to(torch.float32)  # [T, 3, h, w]
    mean = torch.tensor(cfg.image_mean, dtype=torch.float32, device=x.device) * (1.0 / cfg.rescale_factor)
    std = torch.tensor(cfg.image_std, dtype=torch.float32, device=x.device) * (1.0 / cfg.rescale_factor)
    x = (x - mean[:, None, None]) / std[:, None, None]
    gh, gw = height // p, width // p
    x = x.reshape(t, 3, gh // m, m, p, gw // m, m, p).permute(2, 5, 3, 6, 1, 0, 4, 7)  # [gh/m, gw/m, m, m, 3, T, p, p]
    return x.reshape(gh * gw, 3 * t * p * p), (1, gh, gw)
