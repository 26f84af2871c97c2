"""Qwen3-VL (`Qwen3VLForConditionalGeneration`; the MoE variant's decoder too)
behind the runner's model protocol.

The decoder is Qwen3's (tidal.models.qwen3_moe: dense MLPs, or sparse MoE
blocks for Qwen3-VL-MoE) with multimodal rotary positions (3 axes, see mrope)
and deepstack: after decoder layer i, the i-th deepstack feature of each image
is added to that image's positions. Images sit anywhere in the prompt and
attend causally; the vision tower runs once per image (encode_image).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from tidal.core import ForwardBatch, ImageInput
from tidal.errors import CheckpointError
from tidal.models.qwen3_moe.config import Qwen3MoeConfig
from tidal.models.qwen3_moe.model import Qwen3MoeModel

from .mrope import image_advance, image_offsets, mrope_angles
from .processor import ImageProcessorConfig, process_image, smart_resize
from .video import (
    FrameGroup,
    PreparedVideo,
    VideoProcessorConfig,
    prepare_video,
    process_frame_group,
)
from .vision import VisionConfig, VisionModel


@dataclass(frozen=True)
class VideoTokens:
    """A video's special tokens (config.json) and its processor (video_preprocessor_config.json)."""

    video_token_id: int = 151656
    vision_start_id: int = 151652
    vision_end_id: int = 151653
    processor: VideoProcessorConfig = field(default_factory=VideoProcessorConfig)


class Qwen3VLModel(nn.Module):
    rope_axes = 3  # the runner gives rotary indices [3, T] (ForwardBatch.rope_positions)

    def __init__(
        self,
        text: Qwen3MoeConfig,
        vision: VisionConfig,
        processor: ImageProcessorConfig,
        image_token_id: int,
        mrope_section: tuple[int, int, int],
        video: VideoTokens | None = None,
    ) -> None:
        super().__init__()
        self.language_model = Qwen3MoeModel(text)
        self.visual = VisionModel(vision)
        self.processor, self.image_token_id, self.mrope_section = processor, image_token_id, mrope_section
        self.video = video or VideoTokens()
        self.kv_layout = self.language_model.kv_layout
        self.max_context = self.language_model.max_context
        self.vocab_size = self.language_model.vocab_size
        d = text.head_dim
        self.register_buffer("inv_freq", 1.0 / (text.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d)), persistent=False)

    @property
    def hidden_size(self) -> int:
        return self.language_model.config.hidden_size

    @property
    def image_extra_layers(self) -> int:
        """Deepstack features per image (ImageInput.extra's first dimension)."""
        return len(self.visual.cfg.deepstack_visual_indexes)

    @property
    def cuda_graphs_ok(self) -> bool:
        return self.language_model.cuda_graphs_ok

    @property
    def device(self) -> torch.device:
        return self.language_model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.language_model.dtype

    def setup_runtime(self, device: torch.device | str) -> None:
        self.language_model.setup_runtime(device)
        d = self.language_model.config.head_dim
        self.inv_freq = 1.0 / (self.language_model.config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32, device=device) / d))

    # -- images ------------------------------------------------------------------
    def image_tokens(self, height: int, width: int) -> tuple[int, tuple[int, int, int]]:
        """(decoder positions, patch grid) of an image of height x width pixels, before processing it."""
        p = self.processor
        h, w = smart_resize(height, width, p.patch_size * p.merge_size, p.min_pixels, p.max_pixels)
        grid = (1, h // p.patch_size, w // p.patch_size)
        return grid[1] * grid[2] // p.merge_size**2, grid

    def image_rope(self, grid: tuple[int, int, int]) -> tuple[torch.Tensor, int]:
        m = self.visual.cfg.spatial_merge_size  # the tower's merge decides the tokens' layout
        return image_offsets(grid, m), image_advance(grid, m)

    def prepare_video(self, frames: np.ndarray, fps: float | None) -> PreparedVideo:
        """uint8 frames [T, H, W, 3] at fps -> the frame groups the prompt holds (see .video)."""
        return prepare_video(frames, fps, self.video.processor)

    @torch.inference_mode()
    def encode_image(self, payload: np.ndarray | FrameGroup) -> ImageInput:
        """RGB pixels uint8 [H, W, 3], or one frame group of a video -> tokens
        [n, hidden], deepstack [k, n, hidden], rotary offsets."""
        return self.encode_images([payload])[0]

    @torch.inference_mode()
    def encode_images(self, payloads: list[np.ndarray | FrameGroup]) -> list[ImageInput]:
        """Several images (or frame groups) through one run of the vision
        tower (attention stays within each): one launch of each layer for all
        of them. -> one ImageInput each, in order."""
        patches, grids = [], []
        for payload in payloads:
            pixels = torch.tensor(payload.frames if isinstance(payload, FrameGroup) else payload, device=self.device)  # a copy: the array may be read-only
            p, grid = process_frame_group(pixels, self.video.processor) if isinstance(payload, FrameGroup) else process_image(pixels, self.processor)
            patches.append(p)
            grids.append(grid)
        tokens, deep = self.visual(torch.cat(patches).to(self.visual.pos_embed.weight.dtype), grids)
        sizes = [t * h * w // self.visual.cfg.spatial_merge_size**2 for t, h, w in grids]
        extra = torch.stack(deep).to(self.dtype) if deep else None  # [k, N, hidden]
        out = []
        for (start, n), grid in zip(_spans(sizes), grids):
            rope, advance = self.image_rope(grid)
            # copies, not views: a cached image must not hold the whole batch's tensors
            mine = extra[:, start : start + n].clone() if extra is not None else None
            out.append(ImageInput(tokens[start : start + n].to(self.dtype).clone(), "", extra=mine, rope=rope, rope_advance=advance))
        return out

    # -- the model protocol ------------------------------------------------------
    def embed(self, batch: ForwardBatch) -> torch.Tensor:
        x = F.embedding(batch.input_ids, self.language_model.embed_tokens)
        if batch.image_rows is not None:  # static buffers (a graph-captured step)
            x = torch.where(batch.image_rows[:, None], batch.image_embeds, x)
        for start, image in batch.image_spans:
            x[start : start + len(image)] = image.embeds.to(device=x.device, dtype=x.dtype)
        return x

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """-> hidden states [T, hidden] before the final norm."""
        assert batch.rope_positions is not None, "the runner gives 3-axis rotary positions to this model"
        angles = mrope_angles(batch.rope_positions, self.inv_freq, self.mrope_section)
        deep = [(start, image) for start, image in batch.image_spans if image.extra is not None]
        rows, extra = batch.image_rows, batch.image_extra

        def deepstack(i: int, x: torch.Tensor) -> None:
            """After decoder layer i: each image's i-th deepstack feature joins its positions."""
            if rows is not None and extra is not None:  # static buffers
                x.copy_(torch.where(rows[:, None], x + extra[i], x))
            for start, image in deep:
                if i < image.extra.shape[0]:
                    x[start : start + len(image)] += image.extra[i].to(x.dtype)

        hooked = max([image.extra.shape[0] for _, image in deep] + [extra.shape[0] if rows is not None and extra is not None else 0])
        return self.language_model.decode(self.embed(batch), angles.cos(), angles.sin(), batch, deepstack, hooked)

    def heads(self, hidden: torch.Tensor) -> tuple[torch.Tensor, None, dict[str, torch.Tensor]]:
        return self.language_model.heads(hidden)

    def extras_to_result(self, extras: list[int]) -> dict[str, Any]:
        return {}

    def use_kernels(self, enabled: bool) -> None:
        """The decoder's fused path (see tidal.models.qwen3_moe.model); the vision
        tower's rotary (its other parts are torch's)."""
        self.language_model.use_kernels(enabled)
        self.visual.use_kernels(enabled)

    # -- weights -----------------------------------------------------------------
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Checkpoint keys `model.language_model.*`, `model.visual.*`, `lm_head.weight`; strict."""
        text, visual, unexpected = [], {}, []
        for key, tensor in weights:
            if key.startswith("model.language_model."):
                text.append((key.removeprefix("model.language_model."), tensor))
            elif key == "lm_head.weight":
                text.append((key, tensor))
            elif key.startswith("model.visual."):
                visual[key.removeprefix("model.visual.")] = tensor
            else:
                unexpected.append(key)
        if unexpected:
            raise CheckpointError(f"checkpoint does not match the Qwen3-VL architecture: unexpected weights ({len(unexpected)}): {', '.join(unexpected[:8])}")
        self.language_model.load_weights(text)
        missing, extra = self.visual.load_state_dict({k: v.to(self.visual.pos_embed.weight.dtype) for k, v in visual.items()}, strict=False, assign=False)
        if missing or extra:
            raise CheckpointError(f"the vision tower's weights do not match: missing {missing[:8]}, unexpected {extra[:8]}")
        self.visual.clear_grid_cache()


def _spans(sizes: list[int]) -> list[tuple[int, int]]:
    """(start, size) of consecutive pieces."""
    out, start = [], 0
    for n in sizes:
        out.append((start, n))
        start += n
    return out
