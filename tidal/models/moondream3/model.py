"""The Moondream 3 model: vision encoder, text decoder and region head."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

from tidal.core import (
    FEED_COORD,
    FEED_SAMPLED,
    FEED_SIZE,
    FEED_TOKEN,
    CoordInput,
    ForwardBatch,
    InputItem,
    KVLayout,
    SizeInput,
    StepResult,
    h2d,
)
from tidal.models.checkpoint import raise_weight_problems

from .config import MoondreamConfig
from .processor import (
    Crops,
    crops_to_tensor,
    normalize_crops,
    overlap_crops,
    overlap_crops_tensor,
)
from .region import RegionHead, coord_from_bin, size_values
from .text import TextModel
from .vision import VisionModel

WEIGHT_PREFIX = "model."


class Moondream3Model(nn.Module):
    """Moondream 3 behind the runner's model protocol (tidal.core.Model).

    Parameter names match the official checkpoint's keys minus the `model.` prefix.
    """

    def __init__(self, config: MoondreamConfig, has_region_ln: bool = False) -> None:
        super().__init__()
        self.config = config
        self.vision = VisionModel(config.vision)
        self.text = TextModel(config.text)
        self.region = RegionHead(config.region, config.text.dim, has_ln=has_region_ln)
        tc = config.text
        self.kv_layout = KVLayout(tc.n_layers, tc.n_kv_heads, tc.head_dim)
        self.max_context = tc.max_context
        self.vocab_size = tc.vocab_size
        self._coord_id, self._eos_id = config.tokenizer.coord_id, config.tokenizer.eos_id
        self.encoder_graphs = None  # a ShapeGraphs of the vision encoder once captured (capture_graphs)
        self.fast = False  # see use_kernels
        self._size_table: torch.Tensor | None = None  # size_values on the device (fed_back_on_device)

    @property
    def hidden_size(self) -> int:
        return self.config.text.dim

    @property
    def device(self) -> torch.device:
        return self.text.wte.device

    @property
    def dtype(self) -> torch.dtype:
        return self.text.wte.dtype

    # -- the model protocol ------------------------------------------------------
    def embed(self, batch: ForwardBatch) -> torch.Tensor:
        """[T, dim]: token embeddings, with image rows and coordinate/size feedback in place."""
        x = self.text.embed(batch.input_ids)
        if batch.image_rows is not None:  # static buffers (a graph-captured step)
            x = torch.where(batch.image_rows[:, None], batch.image_embeds, x)
        for start, image in batch.image_spans:
            x[start : start + len(image)] = image.embeds.to(device=x.device, dtype=x.dtype)
        if batch.feedback_kind is not None:
            assert batch.feedback_values is not None
            kind = batch.feedback_kind[:, None]
            coord = self.region.encode_coordinate(batch.feedback_values[:, :1]).to(x.dtype)
            size = self.region.encode_size(batch.feedback_values).to(x.dtype)
            x = torch.where(kind == FEED_COORD, coord, torch.where(kind == FEED_SIZE, size, x))
        return x

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """-> raw hidden states [T, dim] for every position of the batch."""
        return self.text(self.embed(batch), positions, batch)

    def heads(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """hidden [N, dim] -> (logits [N, vocab] float32, extras int64 [N, 4]:
        coordinate bin, width bin, height bin, logit(coord) >= logit(eos); and
        the raw heads)."""
        logits = self.text.logits(hidden)
        coord = self.region.decode_coordinate(hidden).float()
        size = self.region.decode_size(hidden).float()
        size_bins = size.argmax(dim=-1)
        coord_over_eos = logits[:, self._coord_id] >= logits[:, self._eos_id]
        extras = torch.stack([coord.argmax(dim=-1), size_bins[:, 0], size_bins[:, 1], coord_over_eos.long()], dim=1)
        return logits, extras, {"logits": logits, "coord": coord, "size": size}

    def extras_to_result(self, extras: list[int]) -> dict[str, Any]:
        coord_bin, width_bin, height_bin, coord_over_eos = extras
        return {"coord_bin": coord_bin, "size_bins": (width_bin, height_bin), "coord_over_eos": bool(coord_over_eos)}

    def fed_back(self, kind: int, result: StepResult) -> InputItem:
        """What a skill feeds back after `result` for a Guess.feed kind, as
        detect, point and reasoning make it: the coordinate (FEED_COORD), the
        size (FEED_SIZE), or for FEED_SAMPLED the token, unless it is the
        coordinate token (reasoning's grounding): then its coordinate."""
        if kind == FEED_SAMPLED:
            kind = FEED_COORD if result.token == self._coord_id else FEED_TOKEN
        if kind == FEED_TOKEN:
            return result.token
        if kind == FEED_COORD:
            return CoordInput(coord_from_bin(result.coord_bin))
        if kind == FEED_SIZE and result.size_bins is not None:
            sizes = size_values()
            return SizeInput(sizes[result.size_bins[0]], sizes[result.size_bins[1]])
        raise ValueError(f"nothing of an output is fed back as kind {kind}")

    def fed_back_on_device(self, packed: torch.Tensor, kinds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """fed_back on the device: packed outputs [n, 5] (token, then heads'
        extras) and Guess.feed kinds [n] -> (the ForwardBatch feedback kinds
        [n] int64, FEED_SAMPLED resolved by the token; float32 values [n, 2]:
        (coordinate, 0) on FEED_COORD rows, (width, height) on FEED_SIZE
        rows, as the model's embedding reads feedback_values; other rows'
        values are unread)."""
        table = self._size_table_on(packed.device)
        sampled = kinds == FEED_SAMPLED
        kinds = torch.where(sampled & (packed[:, 0] == self._coord_id), FEED_COORD, torch.where(sampled, FEED_TOKEN, kinds))
        coord = coord_from_bin(packed[:, 1].to(torch.float32))
        last = table.shape[0] - 1  # a head of more bins than the table (no such checkpoint) must not read past it: its guess is dropped
        width, height = table[packed[:, 2].clamp(0, last)], table[packed[:, 3].clamp(0, last)]
        size = kinds == FEED_SIZE
        return kinds, torch.stack([torch.where(size, width, coord), torch.where(size, height, torch.zeros_like(height))], dim=1)

    def _size_table_on(self, device: torch.device) -> torch.Tensor:
        """size_values as a float32 device tensor, made once (~20 ms of CPU:
        capture_graphs makes it at start-up, not in the first detect's step)."""
        if self._size_table is None or self._size_table.device != device:
            self._size_table = h2d(size_values(), torch.float32, device)  # no wait on a running step
        return self._size_table

    def use_kernels(self, enabled: bool) -> None:
        """The Triton fast path (fused tau/rotary/KV write, fused MoE, on CUDA
        the encoder's fused residual norms and GELU epilogues, and the
        encoder's graphs once captured) or the torch reference."""
        self.text.use_kernels(enabled)
        self.vision.use_kernels(enabled and self.device.type == "cuda")
        self.fast = enabled

    @torch.inference_mode()
    def encode_image(self, payload: Crops | np.ndarray) -> torch.Tensor:
        """One image -> image embeddings [729, text dim] in the model dtype.

        payload: its RGB pixels, uint8 [H, W, 3] (cropped here: on a GPU by
        resampling there, equal to Pillow's crops pixel for pixel, else with
        Pillow), or its crops already made.
        """
        if isinstance(payload, Crops):
            pixels, tiling = crops_to_tensor(payload, self.device, self.dtype), payload.tiling
        elif self.device.type == "cuda":
            # ~6 MB for 1080p; Pillow would take tens of ms of CPU per image
            host = torch.empty(payload.shape, dtype=torch.uint8, pin_memory=True)
            host.numpy()[...] = payload  # one copy into pinned memory (the array may be read-only)
            src = host.to(self.device, non_blocking=True)
            crops, tiling = overlap_crops_tensor(src, self.config.vision)
            pixels = normalize_crops(crops, self.dtype)
        else:
            crops_np = overlap_crops(Image.fromarray(payload), self.config.vision)
            pixels, tiling = crops_to_tensor(crops_np, self.device, self.dtype), crops_np.tiling
        encode = self.encoder_graphs if self.encoder_graphs is not None and self.fast else self.vision.encode_crops
        features = encode(pixels)  # (a graph's static output: used at once)
        return self.vision.project(features, tiling)

    def capture_graphs(self) -> None:
        """CUDA graphs of the vision encoder, one per crop count (a global
        crop and 0 to max_crops local ones): an image's encoder run becomes one
        replay instead of ~15 launches per layer. Also makes the size table a
        decode step queued ahead reads (fed_back_on_device)."""
        from tidal.runner.shape_graphs import ShapeGraphs

        self._size_table_on(self.device)

        v = self.config.vision
        graphs = ShapeGraphs(self.vision.encode_crops)
        graphs.capture([(n, v.in_channels, v.crop_size, v.crop_size) for n in range(1, v.max_crops + 2)], self.dtype, self.device)
        self.encoder_graphs = graphs

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy checkpoint tensors (keys under `model.`) into the parameters.

        Strict: a missing or unexpected key or a shape mismatch raises a
        CheckpointError that names it. Tensors are cast to the model dtype.
        """
        params = dict(self.named_parameters())
        seen: set[str] = set()
        unexpected: list[str] = []
        mismatched: list[str] = []
        for key, tensor in weights:
            name = key[len(WEIGHT_PREFIX) :] if key.startswith(WEIGHT_PREFIX) else key
            param = params.get(name)
            if param is None:
                unexpected.append(key)
                continue
            if tuple(param.shape) != tuple(tensor.shape):
                mismatched.append(f"{key}: checkpoint {tuple(tensor.shape)}, model {tuple(param.shape)}")
                continue
            with torch.no_grad():
                param.copy_(tensor.to(device=param.device, dtype=param.dtype))
            seen.add(name)
        missing = sorted(WEIGHT_PREFIX + n for n in params if n not in seen)
        raise_weight_problems("Moondream 3", missing, sorted(unexpected), mismatched)
